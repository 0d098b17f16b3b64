"""The processors' path into the norm + RoPE + pack kernel (FLUX.1; Qwen-Image, its Edit-2511 and Layered), on CPU
with gloo.

The kernel needs CUDA, so here a torch stand-in takes its place: it does what the kernel's contract says (each
stream's q/k through its own norm modules, rotated with the `Rotation` rows the processor built, the text stream in
front, packed with v into the send buffers). What runs unchanged is the processors' wiring: which projections go
where, the rotation tables' split per stream, the head dim, the output's split back into text and image. The
parallel model must equal the single-process one, and the stand-in must have been called.
"""
import functools
import re

import pytest
import torch

import fastusp
from _dist import run_distributed
from test_models import MODELS


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: bool) -> torch.Tensor:
    """x [B, S, H, D] -> (even, odd) pairs rotated: even * cos - odd * sin, odd * cos + even * sin, in float32.
    cos / sin [S, D] (one value per dim), or [S, D/2] with pairs (one per pair)."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None], sin[None, :, None]
    cos_even, cos_odd = (cos, cos) if pairs else (cos[..., 0::2], cos[..., 1::2])
    sin_even, sin_odd = (sin, sin) if pairs else (sin[..., 0::2], sin[..., 1::2])
    rotated = torch.stack([even * cos_even - odd * sin_even, odd * cos_odd + even * sin_odd], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _torch_pack(calls: list, image, text, image_norms, text_norms, rotation, heads, group_size, chunks):
    from fastusp.distributed.ulysses import pack_head_chunks

    calls.append(text is not None)
    streams = [(image, image_norms, rotation.image_cos, rotation.image_sin)]
    if text is not None:
        streams.insert(0, (text, text_norms, rotation.text_cos, rotation.text_sin))
    joined = []
    for qkv, norms, cos, sin in streams:
        q, k, v = (x.unflatten(-1, (heads, -1)) for x in qkv)
        joined.append((_rotated(norms[0](q), cos, sin, rotation.pairs),
                       _rotated(norms[1](k), cos, sin, rotation.pairs), v))
    return pack_head_chunks([torch.cat(parts, dim=1) for parts in zip(*joined)], group_size, chunks)


def _with_random_norm_weights(build):
    """The model with random q/k RMSNorm weights: they start as ones, and a swap of two norms would go unseen."""
    model = build()
    g = torch.Generator().manual_seed(1)
    for name, weight in model.named_parameters():
        if re.search(r"\.norm_(added_)?[qk]\.weight$", name):
            weight.data = torch.rand(weight.shape, generator=g) + 0.5
    return model


def _forward_through_stand_in(build, inputs, ulysses, ring, chunks):
    from fastusp.kernels import norm_rope_pack as kernel
    from fastusp.processors import norm_rope_pack

    calls = []
    # The real `applies` asks for CUDA and Triton; here every Ulysses > 1 call with RoPE takes the stand-in
    norm_rope_pack.applies = lambda config, heads, image, text, image_norms, text_norms, rotation: (
        config.ulysses > 1 and rotation is not None)
    kernel.pack = lambda *args: _torch_pack(calls, *args)
    model = build()
    fastusp.parallelize(model, ulysses=ulysses, ring=ring, ulysses_chunks=chunks)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out, calls


@pytest.mark.parametrize("layout", [(2, 1, 1), (2, 1, 2), (2, 2, 1)], ids=lambda l: f"u{l[0]}r{l[1]}c{l[2]}")
@pytest.mark.parametrize("name", ["flux", "qwen", "qwen-edit-2511", "qwen-layered"])
def test_processors_fused_path_matches_single_process(name, layout):
    build, make_inputs = MODELS[name]
    build = functools.partial(_with_random_norm_weights, build)
    # uneven tokens per rank; Qwen-Image's variants with a padded text mask on one sample, Edit-2511 with a reference
    # image's tokens after the edited image's (in the image stream's RoPE rows too), Layered with four images
    extra = {"qwen": dict(valid_lens=[3, 5]), "qwen-edit-2511": dict(valid_lens=[3, 5], reference_hw=(2, 4)),
             "qwen-layered": dict(valid_lens=[3, 5])}.get(name, {})
    inputs = make_inputs(batch=2, height=3, width=5, text_len=5, **extra)
    model = build()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    # every block goes through the stand-in: double-stream blocks with text, FLUX's single-stream ones without
    want = [True] * len(model.transformer_blocks) + [False] * len(getattr(model, "single_transformer_blocks", []))
    for rank, (out, calls) in enumerate(run_distributed(_forward_through_stand_in, layout[0] * layout[1], build,
                                                        inputs, *layout)):
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-4, f"rank {rank}: relative error {err:.2e}"
        assert calls == want, calls


@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_fused_path_with_a_rank_that_holds_no_text(name):
    # 3 text tokens over 4 ranks: one rank's text stream is empty, and its q/k/v and RoPE rows have no text rows
    build, make_inputs = MODELS[name]
    build = functools.partial(_with_random_norm_weights, build)
    inputs = make_inputs(text_len=3, height=2, width=3)
    with torch.no_grad():
        ref = build()(**inputs, return_dict=False)[0]
    for out, calls in run_distributed(_forward_through_stand_in, 4, build, inputs, 2, 2, 1):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4
        assert calls
