"""The log-sum-exp merge of attention over two disjoint key blocks (attention/merge.py) in one Triton kernel, for
eager CUDA forwards (and CUDA graphs of them)."""
from __future__ import annotations

import torch

from ..config import on_device
from .triton_support import addressable, tl, triton


def applies(out, lse, block_out, block_lse) -> bool:
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


def merge(out, lse, block_out, block_lse, dtype):
    """merge_attention's result, written by the kernel: out [B, H, S, D] in [B, S, H, D] memory, lse float32."""
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
