"""FLUX's and Qwen-Image's q/k RMSNorm, RoPE and the pack into Ulysses' send buffers, in one Triton kernel (CUDA,
Ulysses > 1).

Before each block's first all-to-all, q and k are normalized per head, the text stream's joined in front of the image
stream's (double-stream blocks), rotated and packed with v into the send buffers. Inductor fuses that into kernels
that store a rotated copy of q and read it back: for FLUX 53 us per single block at 2304 tokens x 24 heads on H200
(1.6 TB/s), and in double-stream blocks about 100 us over five kernels; for Qwen-Image about 5.2 ms a step at 2 GPUs.
Eager, it is about ten kernels. This kernel reads each element once and writes it once, into its place in the send
buffer: 30-31 us per block.

The math is the modules'. RMSNorm in float32, x * rsqrt(mean(x^2) + eps) * weight, rounded to the input dtype as
torch.nn.RMSNorm (FLUX) returns it; diffusers' RMSNorm (Qwen-Image) rounds x * rsqrt(...) before the weight, and so
does the kernel for it. Then RoPE in float32, rounded once: x * cos + rotated * sin as diffusers' apply_rotary_emb
(FLUX), or the same products with one complex frequency per (even, odd) pair (Qwen-Image). The sum of squares is
reduced in another order than torch's, so results match the torch ops within rounding, not bitwise.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from ..config import on_device
from .triton_support import addressable, tl, triton

if triton is not None:
    @triton.jit
    def _norm_rope_pack(text_q, text_k, text_v, image_q, image_k, image_v, text_wq, text_wk, image_wq, image_wk,
                        text_cos, text_sin, image_cos, image_sin, out, text_eps, image_eps, text_len, seq, heads, hc,
                        chunks, t_b, t_s, i_b, i_s, o_c, o_u, o_s, o_n, o_b, text_cs, image_cs, cs_e,
                        BLOCK_H: tl.constexpr, D: tl.constexpr, PAIRS: tl.constexpr,
                        ROUND_BEFORE_WEIGHT: tl.constexpr):
        """One program per (token, which of q / k / v): all heads of that row, into the send buffer
        out [chunks, U, seq, 3, B, hc, D], where head u * chunks * hc + j * hc + i goes to chunk j, rank u, slot i.
        Each stream's cos / sin rows: D values (FLUX's [S, D]) or, with PAIRS, one per pair (Qwen-Image's complex
        frequencies [S, D/2], cs_e apart). ROUND_BEFORE_WEIGHT: diffusers' RMSNorm, which rounds x * rstd to the
        weight's dtype before the weight."""
        row = tl.program_id(0)
        which = tl.program_id(1)
        b = row // seq
        s = row % seq
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = h < heads
        if s < text_len:
            src, weight, eps, offset = text_v, text_wq, text_eps, b * t_b + s * t_s
            cos, sin = text_cos + s * text_cs, text_sin + s * text_cs
            if which == 0:
                src = text_q
            if which == 1:
                src, weight = text_k, text_wk
        else:
            src, weight, eps, offset = image_v, image_wq, image_eps, b * i_b + (s - text_len) * i_s
            cos, sin = image_cos + (s - text_len) * image_cs, image_sin + (s - text_len) * image_cs
            if which == 0:
                src = image_q
            if which == 1:
                src, weight = image_k, image_wk
        x = tl.load(src + offset + h * D + d, mask=mask, other=0.0).to(tl.float32)
        if which < 2:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
            w = tl.load(weight + d).to(tl.float32)
            if ROUND_BEFORE_WEIGHT:
                x = (x * rstd).to(out.dtype.element_ty).to(tl.float32)
                x = (x * w).to(out.dtype.element_ty).to(tl.float32)
            else:
                x = (x * rstd * w).to(out.dtype.element_ty).to(tl.float32)
            even, odd = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
            if PAIRS:
                pairs = tl.arange(0, D // 2) * cs_e
                cos_even = tl.load(cos + pairs)
                sin_even = tl.load(sin + pairs)
                cos_odd, sin_odd = cos_even, sin_even
            else:
                dims = tl.arange(0, D)
                cos_even, cos_odd = tl.split(tl.reshape(tl.load(cos + dims), (D // 2, 2)))
                sin_even, sin_odd = tl.split(tl.reshape(tl.load(sin + dims), (D // 2, 2)))
            x = tl.reshape(tl.join(even * cos_even[None, :] - odd * sin_even[None, :],
                                   odd * cos_odd[None, :] + even * sin_odd[None, :]), (BLOCK_H, D))
        j = (h // hc) % chunks
        u = h // (hc * chunks)
        i = h % hc
        tl.store(out + j * o_c + u * o_u + s * o_s + which * o_n + b * o_b + i * D + d, x.to(out.dtype.element_ty),
                 mask=mask)

    @torch.library.triton_op("fastusp::norm_rope_pack", mutates_args=())
    def _norm_rope_pack_op(text_q: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor, image_q: torch.Tensor,
                           image_k: torch.Tensor, image_v: torch.Tensor, text_wq: torch.Tensor,
                           text_wk: torch.Tensor, image_wq: torch.Tensor, image_wk: torch.Tensor,
                           text_cos: torch.Tensor, text_sin: torch.Tensor, image_cos: torch.Tensor,
                           image_sin: torch.Tensor, text_eps: float, image_eps: float, text_len: int, heads: int,
                           group_size: int, chunks: int, pairs: bool, round_before_weight: bool) -> torch.Tensor:
        batch, image_len, width = image_q.shape
        dim = width // heads
        seq = text_len + image_len
        hc = heads // (group_size * chunks)
        out = image_q.new_empty(chunks, group_size, seq, 3, batch, hc, dim)
        torch.library.wrap_triton(_norm_rope_pack)[(batch * seq, 3)](
            text_q, text_k, text_v, image_q, image_k, image_v, text_wq, text_wk, image_wq, image_wk, text_cos,
            text_sin, image_cos, image_sin, out, text_eps, image_eps, text_len, seq, heads, hc, chunks,
            text_q.stride(0), text_q.stride(1), image_q.stride(0), image_q.stride(1), *out.stride()[:5],
            text_cos.stride(0), image_cos.stride(0), image_cos.stride(-1),
            BLOCK_H=triton.next_power_of_2(heads), D=dim, PAIRS=pairs, ROUND_BEFORE_WEIGHT=round_before_weight,
            num_warps=4,  # 4: 31 us, 8: 32 us, 16: 38 us (H200, FLUX)
        )
        return out


class Rotation(NamedTuple):
    """Each stream's RoPE rows for the kernel, float32: cos and sin of D values per token (FLUX), or with `pairs` one
    per (even, odd) pair (Qwen-Image's complex frequencies [S, D/2] seen as real)."""

    text_cos: torch.Tensor
    text_sin: torch.Tensor
    image_cos: torch.Tensor
    image_sin: torch.Tensor
    pairs: bool


def _norm_params(norm, dtype: torch.dtype):
    """An RMSNorm over the head dim with a weight -> (weight, eps, whether x * rstd is rounded before the weight);
    else None (the kernel does no other norm). torch.nn.RMSNorm rounds once; diffusers' RMSNorm rounds x * rstd to
    the weight's dtype first (taken where that is the input's dtype, and without a bias)."""
    if type(norm) is torch.nn.RMSNorm:
        if norm.weight is None or len(norm.normalized_shape) != 1:
            return None
        return norm.weight, (torch.finfo(dtype).eps if norm.eps is None else norm.eps), False
    if type(norm) is DiffusersRMSNorm:
        if norm.weight is None or getattr(norm, "bias", None) is not None or norm.weight.dtype != dtype:
            return None
        return norm.weight, norm.eps, True
    return None


def applies_to_tensors(image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple,
                       rotation: Rotation | None, heads: int, group_size: int) -> bool:
    """image, text: (q, k, v) projections [B, S, heads * D] (text None in single-stream blocks); *_norms: (norm_q,
    norm_k) modules. Needs Triton, RMSNorms with weights (one kind and eps for q and k), float32 RoPE rows for each
    stream's tokens, a power-of-two head dim, q/k/v of a stream with one layout and contiguous rows, 32-bit offsets,
    and no gradient (the kernel has none)."""
    q = image[0]
    if triton is None or rotation is None or q.dim() != 3 or heads % group_size:
        return False
    streams = [(image, image_norms)] + ([(text, text_norms)] if text is not None else [])
    tensors = [x for t, _ in streams for x in t]
    dim = q.shape[-1] // heads
    norms = [_norm_params(n, q.dtype) for _, ns in streams for n in ns]
    text_len = 0 if text is None else text[0].shape[1]
    width = dim // 2 if rotation.pairs else dim
    tables = [(rotation.text_cos, rotation.text_sin, text_len), (rotation.image_cos, rotation.image_sin, q.shape[1])]
    return (dim >= 2 and dim & (dim - 1) == 0 and q.shape[-1] == heads * dim
            and all(x.dtype == q.dtype and x.device == q.device and x.dim() == 3 and x.shape[0] == q.shape[0]
                    and x.shape[-1] == q.shape[-1] and x.stride() == t[0].stride() and x.stride(-1) == 1
                    for t, _ in streams for x in t)
            and all(p is not None and p[0].shape == (dim,) for p in norms)
            and all(a[1:] == b[1:] for a, b in zip(norms[::2], norms[1::2]))  # q's and k's eps and kind
            and len({p[2] for p in norms}) == 1
            and all(c.shape == n.shape == (rows, width) and c.dtype == n.dtype == torch.float32
                    and c.stride() == n.stride() and c.device == q.device for c, n, rows in tables)
            and rotation.text_cos.stride(-1) == rotation.image_cos.stride(-1) == (2 if rotation.pairs else 1)
            and addressable(*tensors, *rotation[:4])
            and q.shape[0] * (text_len + q.shape[1]) * 3 * heads * dim < 2**31
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)))


def pack(image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple, rotation: Rotation, heads: int,
         group_size: int, chunks: int) -> list[torch.Tensor]:
    """What `applies_to_tensors` allowed -> `chunks` send buffers [U, S, 3, B, hc, D] (pack_head_chunks' layout) of
    q, k (normalized, the text stream's first, rotated) and v. The buffers are views of one allocation."""
    (wq, eps, round_before_weight), (wk, _, _) = (_norm_params(n, image[0].dtype) for n in image_norms)
    if text is None:
        text, text_wq, text_wk, text_eps, text_len = image, wq, wk, eps, 0
    else:
        (text_wq, text_eps, _), (text_wk, _, _) = (_norm_params(n, text[0].dtype) for n in text_norms)
        text_len = text[0].shape[1]
    # Triton launches on the current device; Inductor's generated code sets the device itself
    device = contextlib.nullcontext() if torch.compiler.is_compiling() else on_device(image[0].device)
    with device:
        out = torch.ops.fastusp.norm_rope_pack(*text, *image, text_wq, text_wk, wq, wk, *rotation[:4],
                                               float(text_eps), float(eps), text_len, heads, group_size, chunks,
                                               rotation.pairs, round_before_weight)
    return list(out.unbind(0))
