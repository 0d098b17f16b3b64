"""Encode the prompt on one rank and broadcast what it returns, so the other ranks need not hold a text encoder.

apply_text_encoder_rank(pipe, rank) wraps the pipeline's methods that run its text encoders (encode_prompt, and
FLUX.2's prompt upsampling / Qwen-Image-Layered's captioning where present): the encoding rank runs the method and
broadcasts its outputs (tensors, None, strings) to every rank; the others run nothing and return what they receive,
so every rank gets the same embeddings. On the other ranks the pipeline's text encoders are dropped (set to None); a
script that loads them with `text_encoder=None` there (and `text_encoder_2=None` for FLUX.1) never allocates them.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from ._forward import patch_attribute

logger = logging.getLogger("fastusp")

# pipeline methods that run a text encoder: their outputs are what the other ranks receive
TEXT_ENCODER_METHODS = ("encode_prompt", "upsample_prompt", "get_image_caption")


def check_text_encoder_rank(pipe, rank: int) -> None:
    """Raise ValueError unless `pipe`'s text encoders can run on `rank` alone."""
    world = dist.get_world_size()
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise ValueError(f"text_encoder_rank must be a rank from 0 to {world - 1} (or None: every rank encodes), "
                         f"got {rank!r}")
    name = type(pipe).__name__
    if not callable(getattr(pipe, "encode_prompt", None)):
        raise ValueError(f"text_encoder_rank: {name} has no encode_prompt to run on one rank; pass "
                         f"text_encoder_rank=None")
    if _uses_text_encoder_in_call(type(pipe)):
        raise ValueError(f"text_encoder_rank: {name} uses its text encoder outside encode_prompt, so every rank "
                         f"needs it; pass text_encoder_rank=None")


def apply_text_encoder_rank(pipe, rank: int) -> None:
    """Run the text encoders of `pipe` on `rank` only (checked by check_text_encoder_rank); every rank gets the
    embeddings by broadcast."""
    name = type(pipe).__name__
    for method in TEXT_ENCODER_METHODS:
        original = getattr(pipe, method, None)
        if callable(original):
            patch_attribute(pipe, method, _broadcast_from(rank, original, pipe))
    if dist.get_rank() != rank:
        # not recorded for unparallelize: the record would keep the weights alive, and freeing them is the point
        for component in [n for n, m in pipe.components.items() if n.startswith("text_encoder") and m is not None]:
            setattr(pipe, component, None)
    if dist.get_rank() == 0:
        logger.info("fastusp: %s encodes prompts on rank %d and broadcasts the embeddings", name, rank)


def _uses_text_encoder_in_call(cls) -> bool:
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    code = "\n".join(line.split("#")[0] for line in source.splitlines() if not line.strip().startswith(("`", "[")))
    return re.search(r"self\.text_encoder\w*\s*[.(\[]", code) is not None


def _transport_device() -> torch.device:
    """Where broadcast buffers live: the rank's GPU under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_from(src: int, method, pipe):
    @functools.wraps(method)
    def run_on_one_rank(*args, **kwargs):
        transport = _transport_device()
        if dist.get_rank() == src:
            return _send(method, args, kwargs, src, transport)
        return _receive(src, transport, pipe, method.__name__)
    return run_on_one_rank


def _send(method, args, kwargs, src: int, transport: torch.device):
    try:
        out = method(*args, **kwargs)
    except Exception as ex:  # the other ranks wait for this broadcast: tell them, rather than leave them hanging
        dist.broadcast_object_list([("error", f"{type(ex).__name__}: {ex}")], src=src, device=transport)
        raise
    leaves, spec = pytree.tree_flatten(out)
    described = [("tensor", t.shape, t.dtype, t.device.type) if isinstance(t, torch.Tensor) else ("value", t)
                 for t in leaves]
    dist.broadcast_object_list([("ok", (described, pytree.treespec_dumps(spec)))], src=src, device=transport)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            dist.broadcast(leaf.detach().to(transport).contiguous(), src=src)
    return out


def _receive(src: int, transport: torch.device, pipe, name: str):
    message = [None]
    dist.broadcast_object_list(message, src=src, device=transport)
    status, payload = message[0]
    if status == "error":
        raise RuntimeError(f"{name} failed on rank {src}, which runs the text encoders: {payload}")
    described, spec = payload
    leaves = []
    for kind, *rest in described:
        if kind == "value":
            leaves.append(rest[0])
            continue
        shape, dtype, device_type = rest
        buffer = torch.empty(shape, dtype=dtype, device=transport)
        dist.broadcast(buffer, src=src)
        leaves.append(buffer.to(pipe._execution_device if device_type != "cpu" else "cpu"))
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(spec))
