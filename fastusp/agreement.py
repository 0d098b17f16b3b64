"""Every rank must run the same call: check that they do, in one small collective, and raise the same error on every
rank when they do not.

Ranks that disagree do not fail by themselves: ranks given different prompts, guidance or seeds exchange shards of
different images and return one blend of them; different degrees, sizes or steps leave the ranks issuing
mismatched collectives, which hang until the process group's timeout (or, on gloo, abort the process).

A fingerprint is what one rank was given, as named values: plain values (numbers, strings, sizes, shapes, a
generator's state) are hashed on the host, tensors are summed on their own device. Every rank contributes three
int64 (a 128-bit digest of the host values, the bits of a weighted float64 sum of the tensors' sums) to one
all_gather. Only when the rows differ does a second exchange (all_gather_object) bring every rank's readable
values, so that the error can name each argument that differs and its value on every rank.

Checked: the settings of parallelize (degrees, fp8, model class and config, dtype) once; then every pipeline call
(its arguments bound to the signature, defaults applied; callables and output options skipped) or, when
parallelize was given a bare transformer, every transformer call (its inputs; a collective per step, see
`check_calls`). Neither check runs inside torch.compile'd code or CUDA graphs: a pipeline's runs around the call, a
transformer's as a forward pre-hook, outside whatever forward compile_pipeline installs.
"""
from __future__ import annotations

import hashlib
import inspect

import torch
import torch.distributed as dist

from ._forward import forward_of, original_call, record_change, wrap_call
from .config import on_device

# pipeline call arguments that change only what a rank does with the result, not the computation
_UNSTEERING = frozenset({"output_type", "return_dict", "callback_on_step_end_tensor_inputs"})
# pipeline call arguments whose values every rank takes from rank 0 (apply_rank_consistency): their shapes count
_FROM_RANK_0 = frozenset({"latents"})


class Fingerprint:
    """Named values of one call (or one parallelize) on this rank."""

    def __init__(self):
        self.host: dict[str, str] = {}                  # name -> readable value (hashed into the digest)
        self.tensors: dict[str, torch.Tensor] = {}      # name -> tensor (summed on its device)

    def add(self, name: str, value, values_count: bool = True) -> None:
        # None counts as not given, and callables (callbacks) are each rank's own: rank 0 keeps them when it drives
        if value is None or callable(value):
            return
        if isinstance(value, torch.Tensor):
            self.host[name] = f"tensor of shape {tuple(value.shape)}, {value.dtype}"
            if values_count and value.numel() and not value.is_complex():
                self.tensors[name] = value.detach()
        elif isinstance(value, torch.Generator):
            state = hashlib.blake2b(value.get_state().numpy().tobytes(), digest_size=4).hexdigest()
            self.host[name] = f"generator seeded {value.initial_seed()} (state {state})"
        elif isinstance(value, (list, tuple)) and any(_structured(v) for v in value):
            self.host[name] = f"{type(value).__name__} of {len(value)}"
            for i, item in enumerate(value):
                self.add(f"{name}[{i}]", item)
        elif isinstance(value, dict):
            self.host[name] = f"dict with keys {sorted(map(str, value))}"
            for key, item in value.items():
                self.add(f"{name}[{key!r}]", item)
        elif isinstance(value, (bool, int, float, str, list, tuple)):
            self.host[name] = repr(value)
        elif hasattr(value, "tobytes") and hasattr(value, "size"):  # a PIL image or a numpy array
            digest = hashlib.blake2b(value.tobytes(), digest_size=8).hexdigest()
            size = value.size if not callable(value.size) else None
            self.host[name] = f"{type(value).__name__} {getattr(value, 'shape', size)} (content {digest})"
        else:
            self.host[name] = type(value).__name__  # its repr may hold a per-process address

    def codes(self, device: torch.device) -> torch.Tensor:
        """int64 [3]: the host digest, and the bits of a weighted sum of the tensors' checksums."""
        digest = hashlib.blake2b(repr(sorted(self.host.items())).encode(), digest_size=16).digest()
        host = torch.tensor([int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8)])
        total = torch.zeros((), dtype=torch.float64, device=device)
        if self.tensors:  # weights 1, 2, ...: tensors that trade places change the total too
            sums = torch.nan_to_num(torch.stack([s.to(device) for s in self._checksums()]))  # NaN != NaN
            total = sums @ torch.arange(1, len(sums) + 1, dtype=torch.float64, device=device)
        return torch.cat([host.to(device), total.reshape(1).view(torch.int64)])

    def _checksums(self) -> list[torch.Tensor]:
        """One float64 per tensor, on its device: the sum of absolute values (of all floating tensors in one
        foreach kernel where they share a device: each separate op costs the host a launch), else the sum."""
        tensors = list(self.tensors.values())
        floats = [t for t in tensors if t.is_floating_point()]
        norms = iter(torch._foreach_norm(floats, 1, dtype=torch.float64) if floats else ())
        sums = [next(norms) if t.is_floating_point() else t.sum(dtype=torch.float64) for t in tensors]
        return sums

    def readable(self) -> dict[str, str]:
        values = dict(self.host)
        for name, checksum in zip(self.tensors, self._checksums()):
            values[name] += f", checksum {checksum.item()!r}"
        return values


def _structured(value) -> bool:
    return isinstance(value, (torch.Tensor, torch.Generator, dict, list, tuple)) or hasattr(value, "tobytes")


def check_same_on_every_rank(fingerprint: Fingerprint, what: str, fix: str, device: torch.device,
                             group=None) -> None:
    """Raise the same ValueError on every rank of `group` unless every rank's fingerprint is the same.
    what: what was compared ("the settings of fastusp.parallelize"); fix: the sentence that tells how to fix it."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = fingerprint.codes(device)
    rows = mine.new_empty(world * mine.numel())  # flat (gloo takes no [world, n] output): NCCL's own all-gather,
    dist.all_gather_into_tensor(rows, mine, group=group)  # no copies out of a list of outputs
    if bool((rows.view(world, -1) == mine).all()):
        return
    values = [None] * world
    with on_device(device):  # all_gather_object's buffers go to the current CUDA device: make it this rank's
        dist.all_gather_object(values, fingerprint.readable(), group=group)
    raise ValueError(_difference_message(values, what, fix))


def _difference_message(values: list[dict], what: str, fix: str) -> str:
    names = list(dict.fromkeys(name for ranks in values for name in ranks))
    lines = []
    for name in names:
        per_rank = [ranks.get(name, "not given") for ranks in values]
        if len(set(per_rank)) > 1:
            lines.append(f"  {name}: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(per_rank)))
    return f"the ranks disagree on {what}:\n" + "\n".join(lines) + f"\n{fix}"


# --- parallelize ---------------------------------------------------------------------------------------------------

def check_settings_agree(config, transformer, obj, device: torch.device, options: dict) -> None:
    """parallelize's settings (the config's and its other `options`), the model and its dtype, the same on every
    rank (before any group is built)."""
    fingerprint = Fingerprint()
    for name, value in {**config.settings(), **options}.items():
        fingerprint.add(name, value)
    fingerprint.add("pipeline", type(obj).__name__ if obj is not transformer else "none (a bare transformer)")
    fingerprint.add("model", type(transformer).__name__)
    # without private keys: _name_or_path may be each node's own cache directory
    fingerprint.add("model config", repr(sorted((k, v) for k, v in transformer.config.items() if k[0] != "_")))
    fingerprint.add("dtype", str(transformer.dtype))
    fingerprint.add("fastusp.quantize", repr(getattr(transformer, "_fastusp_quantized", None)))
    check_same_on_every_rank(fingerprint, "the settings of fastusp.parallelize", "every rank must call "
                             "parallelize with the same degrees and options, on the same model in the same dtype, "
                             "quantized alike",
                             device)


# --- calls ---------------------------------------------------------------------------------------------------------

_SAME_CALL = ("every rank must make the same call (same prompt, sizes, steps, guidance, and generators seeded "
              "alike); to serve requests on one process, let rank 0 drive the others (fastusp.follow)")


class CollectiveTimeout(RuntimeError):
    """A collective of a pipeline call waited past the process group's timeout for a rank that never joined it."""


def explain_collective_timeouts(call, *args, **kwargs):
    """Run a pipeline call; a collective that timed out (gloo raises; NCCL's watchdog ends the process instead)
    becomes a CollectiveTimeout that says what probably happened."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or "timed out" in str(e).lower()) or isinstance(e, CollectiveTimeout):
            raise
        raise CollectiveTimeout(
            f"rank {dist.get_rank()} waited past the process group's timeout (parallelize(timeout=...)) in a "
            f"collective that another rank did not join: that rank probably raised in this call (see its error) or "
            f"was not called. The ranks may now be out of step: restart the processes. ({e})") from e


def apply_call_checks(obj, transformer, device: torch.device, check_calls: bool) -> None:
    """A pipeline: a collective that times out in a call says why; with check_calls, every call compares its
    arguments across the ranks first. A bare transformer with check_calls: every forward compares its inputs (one
    all_gather per call)."""
    if obj is not transformer:
        wrap_call(obj, explain_collective_timeouts)
    if not check_calls:
        return
    if obj is not transformer:
        signature = inspect.signature(original_call(obj))

        def checked_call(call, *args, **kwargs):
            bound = signature.bind(obj, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in list(bound.arguments.items())[1:] if k not in _UNSTEERING}
            check_call(arguments, f"the arguments of this {type(obj).__name__} call", device)
            return call(*args, **kwargs)

        wrap_call(obj, checked_call)
        return
    signature = inspect.signature(forward_of(transformer))

    def check_inputs(module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.pop("return_dict", None)
        check_call(arguments, f"the inputs of this {type(module).__name__} call", device)
        return None

    handle = transformer.register_forward_pre_hook(check_inputs, with_kwargs=True)
    record_change(transformer, handle.remove)


def check_call(arguments: dict, what: str, device: torch.device) -> None:
    fingerprint = Fingerprint()
    for name, value in arguments.items():
        fingerprint.add(name, value, values_count=name not in _FROM_RANK_0)
    check_same_on_every_rank(fingerprint, what, _SAME_CALL, device)
