"""Merging attention over disjoint key blocks by log-sum-exp, in float32."""
from __future__ import annotations

import torch


def merge_attention(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
                    block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (out [B,H,S,D], lse [B,H,S]) into the running float32 result.

    softmax over the union of blocks = each block's softmax weighted by exp(block_lse - lse_total).
    """
    block_out, block_lse = block_out.float(), block_lse.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out, new_lse
