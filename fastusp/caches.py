"""diffusers' First Block Cache on a sharded sequence: one decision, the one-device one, on every rank.

`transformer.enable_cache(FirstBlockCacheConfig(threshold=...))` runs the first block, then skips the others when its
output residual r changed little since the last full step: mean|r - r_prev| / mean|r_prev| <= threshold. Under
sequence parallelism each rank holds only its tokens, so each would decide from its own shard: ranks that disagree
run different collectives (one runs the remaining blocks' all-to-alls, the other does not) and hang, and even when they
agree the decision is not the one a single device makes. fastusp computes the two means over the whole sequence
(one small all-reduce per step, beside the host sync the cache makes anyway).

The caches that decide from the step index (TaylorSeer, MagCache with given ratios, Pyramid Attention Broadcast)
decide alike on every rank without help.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffusers.hooks.first_block_cache import FBCHeadBlockHook


def share_cache_decisions(transformer, group) -> None:
    """Make a First Block Cache on `transformer` decide on the whole sequence over `group` (the ranks that share
    it). Called before every sharded forward, since the cache can be enabled after parallelize; costs a look at the
    first block of each of the transformer's block lists."""
    for hook in _first_block_cache_hooks(transformer):
        if getattr(hook, "_fastusp_group", None) is not group:
            hook._fastusp_group = group
            hook._should_compute_remaining_blocks = _whole_sequence_decision(hook, group)


def _first_block_cache_hooks(transformer):
    """The cache puts its head hook on the first block of the first block list."""
    for blocks in transformer.children():
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            registry = getattr(blocks[0], "_diffusers_hook", None)
            for hook in getattr(registry, "hooks", {}).values():
                if isinstance(hook, FBCHeadBlockHook):
                    yield hook


def _whole_sequence_decision(hook, group):
    @torch.compiler.disable
    def should_compute_remaining_blocks(residual: torch.Tensor) -> bool:
        """FBCHeadBlockHook's test with the sums and the element count added over the group. Each mean is rounded to
        the residual's dtype, as diffusers' .mean() does, so bf16 decisions match a single device's too."""
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        totals = torch.stack([(residual - previous).abs().sum(dtype=torch.float32),
                              previous.abs().sum(dtype=torch.float32),
                              torch.tensor(residual.numel(), dtype=torch.float32, device=residual.device)])
        dist.all_reduce(totals, group=group)
        change, scale = (totals[:2] / totals[2]).to(residual.dtype)
        return (change / scale).item() > hook.threshold

    return should_compute_remaining_blocks
