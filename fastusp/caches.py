"""diffusers' caches under fastusp: on every rank, the decisions and measurements one device makes; First Block
Cache under CUDA graphs.

`transformer.enable_cache(FirstBlockCacheConfig(threshold=...))` runs the first block, then skips the others when its
output residual r changed little since the last full step: mean|r - r_prev| / mean|r_prev| <= threshold. Under
sequence parallelism each rank holds only its tokens, so each would decide from its own shard: ranks that disagree
run different collectives (one runs the remaining blocks' all-to-alls, the other does not) and hang, and even when they
agree the decision is not the one a single device makes. fastusp computes the two means over the whole sequence
(one small all-reduce per step, beside the host sync the cache makes anyway).

The caches that decide from the step index (TaylorSeer, MagCache with given ratios, Pyramid Attention Broadcast)
decide alike on every rank without help. MagCache's calibration mode, which measures those ratios as a mean over the
tokens, takes its mean over the whole sequence too, so every rank prints the ratios one device would.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook
from diffusers.hooks.mag_cache import MagCacheBlockHook

from ._forward import patch_attribute


def share_cache_decisions(transformer, group) -> None:
    """Make a First Block Cache on `transformer` decide, and a calibrating MagCache measure, on the whole sequence
    over `group` (the ranks that share it; None: this process holds the whole sequence). Called before every sharded
    forward, since a cache can be enabled after parallelize; costs a look at the first and the last block of each of
    the transformer's block lists."""
    hook = first_block_cache_hook(transformer)
    if hook is not None and getattr(hook, "_fastusp_group", False) is not group:
        patch_attribute(hook, "_fastusp_group", group, owner=transformer)
        patch_attribute(hook, "_fastusp_forced", None, owner=transformer)  # set by FirstBlockCacheGraphs in a branch
        patch_attribute(hook, "_should_compute_remaining_blocks", _whole_sequence_decision(hook, group),
                        owner=transformer)
    tail = _mag_cache_tail_hook(transformer)
    if tail is not None and tail.config.calibrate and getattr(tail, "_fastusp_group", False) is not group:
        patch_attribute(tail, "_fastusp_group", group, owner=transformer)
        patch_attribute(tail, "_perform_calibration_step", _whole_sequence_calibration(group), owner=transformer)


def first_block_cache_hook(transformer) -> FBCHeadBlockHook | None:
    """The cache's head hook: it sits on the first block of the first block list."""
    return next((hook for hook in _end_block_hooks(transformer, last=False) if isinstance(hook, FBCHeadBlockHook)),
                None)


def _mag_cache_tail_hook(transformer) -> MagCacheBlockHook | None:
    """MagCache's tail hook: it sits on the last block of the last block list."""
    return next((hook for hook in _end_block_hooks(transformer, last=True)
                 if isinstance(hook, MagCacheBlockHook) and hook.is_tail), None)


def _end_block_hooks(transformer, last: bool):
    """diffusers' hooks on the first block of each of the transformer's block lists, in order; last: on the last
    block of each, last list first."""
    lists = [blocks for blocks in transformer.children() if isinstance(blocks, torch.nn.ModuleList) and len(blocks)]
    for blocks in reversed(lists) if last else lists:
        registry = getattr(blocks[-1 if last else 0], "_diffusers_hook", None)
        yield from getattr(registry, "hooks", {}).values()


def is_first_block_cache_hook(hook) -> bool:
    return isinstance(hook, (FBCHeadBlockHook, FBCBlockHook))


def relative_change(residual: torch.Tensor, previous: torch.Tensor, group) -> torch.Tensor:
    """mean|residual - previous| / mean|previous| over the whole sequence (the sums and the element count added over
    group), a 0-d tensor. Each mean is rounded to the residual's dtype, as diffusers' .mean() does, so bf16
    decisions match a single device's too."""
    totals = _totals_over(group, [(residual - previous).abs().sum(dtype=torch.float32),
                                  previous.abs().sum(dtype=torch.float32)], residual.numel())
    change, scale = (totals[:2] / totals[2]).to(residual.dtype)
    return change / scale


def _totals_over(group, sums: list[torch.Tensor], count: int) -> torch.Tensor:
    """[*sums, count] (0-d float32 sums of this rank's tokens, and how many were summed) added over group: the
    whole sequence's. group None: this process holds the whole sequence."""
    totals = torch.stack([*sums, torch.full((), count, dtype=torch.float32, device=sums[0].device)])
    if group is not None:
        dist.all_reduce(totals, group=group)
    return totals


def _whole_sequence_decision(hook, group):
    @torch.compiler.disable
    def should_compute_remaining_blocks(residual: torch.Tensor) -> bool:
        """FBCHeadBlockHook's test, on the whole sequence; or the branch FirstBlockCacheGraphs forces."""
        if hook._fastusp_forced is not None:
            branch, stored = hook._fastusp_forced
            return stored.decide(branch, residual, group)
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        return relative_change(residual, previous, group).item() > hook.threshold

    return should_compute_remaining_blocks


def _whole_sequence_calibration(group):
    def perform_calibration_step(state, residual: torch.Tensor) -> None:
        """MagCacheBlockHook's calibration ratio, mean over tokens of |r| / (|r_prev| + 1e-8) with the per-token norms
        taken over channels (diffusers 0.42), the sum and the token count added over the group."""
        if state.previous_residual is None:  # the first step has nothing to compare with: 1.0, as diffusers logs
            state.calibration_ratios.append(1.0)
            return
        ratios = torch.linalg.norm(residual.float(), dim=-1) / (
            torch.linalg.norm(state.previous_residual.float(), dim=-1) + 1e-8)
        totals = _totals_over(group, [ratios.sum()], ratios.numel())
        state.calibration_ratios.append((totals[0] / totals[1]).item())

    return perform_calibration_step


class FirstBlockCacheGraphs:
    """CUDA graphs of a transformer whose First Block Cache decides, each step, whether to run the remaining blocks.

    A graph cannot stop in mid-forward for the host to decide, so each (cache context, input shapes) gets two
    whole-forward graphs, each captured with the decision forced:
      skip     the first block, its relative change against the last computed step (written to a tensor), and the
               output from the tail residuals that step stored;
      compute  the whole forward, which also stores the first block's residual and the tail residuals.
    A context's first call in a pipeline run (the cache resets after each) replays compute. Every later call replays
    skip, reads the change on the host (the one sync the cache makes anyway) and, above the threshold, replays
    compute too: a computed step runs the first block twice (one of FLUX's 57 blocks), a skipped one costs only the
    skip graph. Everything a replay reads from an earlier call lives in tensors of fastusp's own (_Stored), at
    addresses fixed at capture; diffusers' Python state is not used by replays (no Python runs in them).
    """

    def __init__(self, transformer, group):
        self.transformer, self.group = transformer, group
        self.stored: dict = {}  # (context, input shapes) -> _Stored: replays read its tensors, it lives with them
        self.steps = Counter()  # how many calls were "computed" and "skipped" (diffusers does not count them)

    def __call__(self, inputs: dict, run_branch):
        """The output of the forward on inputs, under the cache: run_branch(branch_inputs) runs the forward with the
        decision forced, branch_inputs being inputs plus `_first_block_cache=(branch, context)`."""
        hook = first_block_cache_hook(self.transformer)
        share_cache_decisions(self.transformer, self.group)
        state = hook.state_manager.get_state()  # raises outside a cache context, as the cache itself does
        context = hook.state_manager.context.name
        first_call = not getattr(state, "_fastusp_seen", False)  # the cache's reset drops its states
        state._fastusp_seen = True
        key = (context, _shapes(inputs))
        stored = self.stored.get(key)
        if stored is not None and stored.change is not None and not first_call:
            output = self._run(hook, "skip", stored, context, inputs, run_branch)
            if stored.change.item() <= hook.threshold:
                self.steps["skipped"] += 1
                return output
        stored = self.stored.setdefault(key, _Stored())
        self.steps["computed"] += 1
        return self._run(hook, "compute", stored, context, inputs, run_branch)

    def _run(self, hook, branch, stored, context, inputs, run_branch):
        hook._fastusp_forced = (branch, stored)  # read by the decision when Python runs (warm-up, capture, eager)
        try:
            return run_branch({**inputs, "_first_block_cache": (branch, context)})
        finally:
            hook._fastusp_forced = None

    def forced(self, forward):
        """forward(**inputs) made to take `_first_block_cache`: with it, the cache's tail residuals are this
        branch's stored ones (skip) or copied into them (compute)."""
        def run(_first_block_cache=None, **inputs):
            if _first_block_cache is None:
                return forward(**inputs)
            hook = first_block_cache_hook(self.transformer)
            branch, stored = hook._fastusp_forced
            state = hook.state_manager.get_state()
            if branch == "skip":
                state.tail_block_residuals = stored.tail
            output = forward(**inputs)
            if branch == "compute":
                stored.keep_tail(state.tail_block_residuals)
            return output

        return run


class _Stored:
    """What a skip replay reads from the last computed step of one context and shape: the first block's residual
    and the tail residuals; and where it writes the relative change for the host."""

    def __init__(self):
        self.residual = self.change = None
        self.tail: tuple = ()

    def decide(self, branch: str, residual: torch.Tensor, group) -> bool:
        if branch == "compute":
            if self.residual is None:
                self.residual = torch.empty_like(residual)
                self.change = torch.zeros((), dtype=torch.float32, device=residual.device)
            self.residual.copy_(residual)
            return True
        self.change.copy_(relative_change(residual, self.residual, group))
        return False

    def keep_tail(self, residuals) -> None:
        if not self.tail:
            self.tail = tuple(None if r is None else torch.empty_like(r) for r in residuals)
        for mine, new in zip(self.tail, residuals):
            if new is not None:
                mine.copy_(new)


def _shapes(inputs: dict) -> tuple:
    """The inputs' structure and tensor shapes: what the stored tensors' shapes depend on."""
    return tuple((name, tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__)
                 for name, v in sorted(inputs.items()))
