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

from .._triton import addressable, tl, triton
from ..config import on_device


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
    if _kernel_applies(out, lse, block_out, block_lse):
        return _merge_kernel(out, lse, block_out, block_lse, dtype)
    return _merge_ops(out, lse, block_out, block_lse, dtype)


def _merge_ops(out, lse, block_out, block_lse, dtype):
    block_out, block_lse = block_out.float(), block_lse.float()
    new_lse = torch.logaddexp(lse, block_lse)
    merged = (out.float() * torch.exp(lse - new_lse).unsqueeze(-1)
              + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    return merged.to(dtype), new_lse


def _kernel_applies(out, lse, block_out, block_lse) -> bool:
    """Eager CUDA, same shapes, contiguous head dims, float32 LSEs, 32-bit offsets, and no gradient wanted (the
    kernel has no backward)."""
    return (triton is not None and block_out.is_cuda and not torch.compiler.is_compiling()
            and out.shape == block_out.shape and lse.shape == block_lse.shape == block_out.shape[:3]
            and out.stride(-1) == block_out.stride(-1) == 1 and lse.dtype == block_lse.dtype == torch.float32
            and addressable(out, lse, block_out, block_lse)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (out, lse, block_out, block_lse))))


if triton is not None:
    @triton.jit
    def _merge_rows(out, lse, blk, blk_lse, dst, dst_lse, heads, seq, dim,
                    o_b, o_h, o_s, l_b, l_h, l_s, k_b, k_h, k_s, kl_b, kl_h, kl_s, d_b, d_h, d_s,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per (BLOCK_S queries, batch x head). dst_lse [B, H, S] is contiguous."""
        bh = tl.program_id(1)
        b, h = bh // heads, bh % heads
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        rows = s < seq
        a = tl.load(lse + b * l_b + h * l_h + s * l_s, mask=rows, other=0.0)
        c = tl.load(blk_lse + b * kl_b + h * kl_h + s * kl_s, mask=rows, other=0.0)
        top = tl.maximum(a, c)
        top = tl.where(top == float("-inf"), 0.0, top)  # both -inf: lse stays -inf, as torch.logaddexp gives
        total = top + tl.log(tl.exp(a - top) + tl.exp(c - top))
        wa, wc = tl.exp(a - total)[:, None], tl.exp(c - total)[:, None]
        cells = rows[:, None] & (d[None, :] < dim)
        x = tl.load(out + b * o_b + h * o_h + s[:, None] * o_s + d[None, :], mask=cells).to(tl.float32)
        y = tl.load(blk + b * k_b + h * k_h + s[:, None] * k_s + d[None, :], mask=cells).to(tl.float32)
        merged = (x * wa + y * wc).to(dst.dtype.element_ty)
        tl.store(dst + b * d_b + h * d_h + s[:, None] * d_s + d[None, :], merged, mask=cells)
        tl.store(dst_lse + bh * seq + s, total, mask=rows)


def _merge_kernel(out, lse, block_out, block_lse, dtype):
    batch, heads, seq, dim = block_out.shape
    dst = torch.empty(batch, seq, heads, dim, dtype=dtype, device=block_out.device).transpose(1, 2)
    dst_lse = torch.empty(block_out.shape[:3], dtype=torch.float32, device=block_out.device)
    if dst.numel() == 0:
        return dst, dst_lse
    block_s = 32
    with on_device(block_out.device):  # Triton launches on the current device's stream, not on the tensors'
        _merge_rows[(triton.cdiv(seq, block_s), batch * heads)](
            out, lse, block_out, block_lse, dst, dst_lse, heads, seq, dim,
            *out.stride()[:3], *lse.stride(), *block_out.stride()[:3], *block_lse.stride(), *dst.stride()[:3],
            BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
        )
    return dst, dst_lse
