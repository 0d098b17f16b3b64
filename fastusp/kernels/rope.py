"""RoPE on q and k in one Triton kernel, for eager CUDA forwards (and CUDA graphs of them).

diffusers rotates q and k with about ten elementwise torch ops each (float copies, a negated half, a stack, two
products, a sum, a cast back), every one a full pass over memory. Eager, that is a large share of the step: each
FLUX block rotates two [tokens, 3072] tensors, about 48 bytes moved per element, where one kernel moves 4. Compiled,
Inductor already fuses the same ops, so this kernel is never used inside torch.compile.

The arithmetic is diffusers' own, in its order and precision: each element x[2i], x[2i+1] in float32, the rotated
value -x[2i+1] / x[2i], out = x * cos + rotated * sin with each product and the sum rounded separately (no fused
multiply-add), then rounded to the input dtype. Outputs are bitwise equal to diffusers' apply_rotary_emb (FLUX) and
to fastusp's real-form Qwen-Image RoPE (`models.qwen_image.real_rope`): a * c + (-b) * s is a * c - b * s, and a
sum does not depend on its order.
"""
from __future__ import annotations

import torch

from ..config import on_device
from .triton_support import addressable, tl, triton

if triton is not None:
    @triton.jit
    def _rotate_row(x, out, d, cos, sin, mask):
        value = tl.load(x + d, mask=mask).to(tl.float32)
        partner = tl.load(x + (d ^ 1), mask=mask).to(tl.float32)  # the other element of d's pair
        rotated = tl.where(d % 2 == 0, -partner, partner)
        tl.store(out + d, (value * cos + rotated * sin).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_rows(q, k, q_out, k_out, cos, sin, seq, heads, dim,
                   q_b, q_s, q_h, k_b, k_s, k_h, qo_b, qo_s, qo_h, ko_b, ko_s, ko_h, c_s, c_d, s_s, s_d,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAIRS: tl.constexpr):
        """One program per (batch, token): all heads of that token's q and k."""
        row = tl.program_id(0)
        b, s = row // seq, row % seq
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < heads) & (d < dim)
        f = d // 2 if PAIRS else d  # PAIRS: one (cos, sin) per pair (Qwen-Image); else one per element (FLUX)
        c = tl.load(cos + s * c_s + f * c_d, mask=d < dim).to(tl.float32)
        n = tl.load(sin + s * s_s + f * s_d, mask=d < dim).to(tl.float32)
        _rotate_row(q + b * q_b + s * q_s + h * q_h, q_out + b * qo_b + s * qo_s + h * qo_h, d, c, n, mask)
        _rotate_row(k + b * k_b + s * k_s + h * k_h, k_out + b * ko_b + s * ko_s + h * ko_h, d, c, n, mask)


def applies(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pairs: bool = False) -> bool:
    """Whether the kernel takes this call: eager (not traced by torch.compile) on CUDA, q and k [B, S, H, D] alike
    with contiguous head dims and `addressable`, float32 cos/sin of shape [S, D] (pairs: [S, D/2]), and no gradient
    wanted (the kernel has no backward). Anything else takes diffusers' ops, which also raise diffusers' errors."""
    seq, dim = query.shape[1], query.shape[-1]
    return (not torch.compiler.is_compiling() and query.is_cuda and triton is not None
            and query.shape == key.shape and query.dtype == key.dtype and query.stride(-1) == key.stride(-1) == 1
            and addressable(query, key)
            and dim % 2 == 0 and cos.shape == sin.shape == (seq, dim // 2 if pairs else dim)
            and cos.dtype == sin.dtype == torch.float32 and cos.device == sin.device == query.device
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)))


def rotate_into(query, key, cos, sin, query_out, key_out, pairs: bool) -> None:
    """query_out, key_out [B, S, H, D] (any strides, contiguous head dim, `addressable`) <- q and k rotated.
    cos, sin: [S, D] one value per element (pairs=False, FLUX) or [S, D/2] one per pair (pairs=True)."""
    if query.numel() == 0:
        return
    with on_device(query.device):  # Triton launches on the current device's stream, not on the tensors'
        _launch(query, key, cos, sin, query_out, key_out, pairs)


def _launch(query, key, cos, sin, query_out, key_out, pairs: bool) -> None:
    batch, seq, heads, dim = query.shape
    _rope_rows[(batch * seq,)](
        query, key, query_out, key_out, cos, sin, seq, heads, dim,
        *query.stride()[:3], *key.stride()[:3], *query_out.stride()[:3], *key_out.stride()[:3],
        *cos.stride(), *sin.stride(),
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim), PAIRS=pairs,
        num_warps=4 if heads * dim <= 4096 else 8,
        enable_fp_fusion=False,  # a * b + c rounded twice, as torch's separate ops do
    )


def rotate(query, key, cos, sin, pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k [B, S, H, D] rotated, as new contiguous tensors."""
    query_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    key_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    rotate_into(query, key, cos, sin, query_out, key_out, pairs)
    return query_out, key_out
