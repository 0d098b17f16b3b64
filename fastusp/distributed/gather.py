"""Gather sequence shards of uneven length from every rank (an all-gather-v built on the functional all-gather)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.distributed._functional_collectives as fc

# torch 2.13 renamed all_gather_tensor to all_gather_single (same semantics); 2.11 has only the old name.
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def gather_seq(x: torch.Tensor, seq_lens: list[int], group, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`; rank g holds seq_lens[g] rows there.

    Shards are padded to the longest for transport only; the padding is cut before concatenation. The result is
    contiguous: callers hand it to other collectives, which send a tensor's storage, not its logical order.
    """
    if len(seq_lens) == 1:
        return x
    longest = max(seq_lens)
    moved = x.movedim(dim, 0)
    if moved.shape[0] < longest:
        moved = F.pad(moved, [0, 0] * (moved.ndim - 1) + [0, longest - moved.shape[0]])
    full = fc.wait_tensor(_all_gather(moved.contiguous(), 0, group))
    pieces = [full[g * longest: g * longest + n].movedim(0, dim) for g, n in enumerate(seq_lens)]
    return torch.cat(pieces, dim=dim)
