"""Merging attention over disjoint key blocks by log-sum-exp.

softmax over the union of blocks = each block's softmax weighted by exp(block_lse - lse_total), so with
lse_total = logaddexp(lse, block_lse):  out_total = out * exp(lse - lse_total) + block_out * exp(block_lse - lse_total).

The arithmetic is in float32. The merged output is written in the dtype asked for: float32 while more blocks follow,
the model's dtype after the last one. On CUDA outside torch.compile (ring attention's steps, which run eagerly, or
as CUDA graphs of eager kernels) one Triton kernel does the whole merge. As torch ops it is about eight full passes
over a float32 [B, H, S, D] (two upcasts, two products, a sum, a cast): for FLUX Ring-2 on 2 GPUs ~300 MB moved per
layer where the kernel moves ~40. Compiled code (attention_text_keys_apart) keeps the torch ops: Inductor fuses them.
"""
from __future__ import annotations

import torch

from ..kernels import merge as merge_kernel


def merge_attention(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
                    block_lse: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (out [B, H, S, D], lse [B, H, S]) into the running result (None before the first block).

    Returns (the merged out in `dtype`, its lse in float32). The first block is returned as it is, uncopied: the
    next merge reads it in its own dtype. The kernel writes the merged out in [B, S, H, D] memory, the layout the
    attention kernels write and the output projection reads, so that ring attention's result needs no transposing
    copy after it.
    """
    if out is None:
        return block_out, block_lse.float()
    if merge_kernel.applies(out, lse, block_out, block_lse):
        return merge_kernel.merge(out, lse, block_out, block_lse, dtype)
    return _merge_ops(out, lse, block_out, block_lse, dtype)


def _merge_ops(out, lse, block_out, block_lse, dtype):
    block_out, block_lse = block_out.float(), block_lse.float()
    new_lse = torch.logaddexp(lse, block_lse)
    merged = (out.float() * torch.exp(lse - new_lse).unsqueeze(-1)
              + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    return merged.to(dtype), new_lse
