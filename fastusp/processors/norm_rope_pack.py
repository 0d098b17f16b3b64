"""FLUX's q/k RMSNorm, RoPE and the pack into Ulysses' send buffers, in one Triton kernel (CUDA, Ulysses > 1).

Before each block's first all-to-all, q and k are normalized per head (torch.nn.RMSNorm), the text stream's joined in
front of the image stream's (double-stream blocks), rotated (diffusers' apply_rotary_emb) and packed with v into the
send buffers. Inductor fuses that into kernels that store a rotated copy of q and read it back: 53 us per single block
at 2304 tokens x 24 heads on H200 (1.6 TB/s), and in double-stream blocks about 100 us over five kernels. Eager, it is
about ten kernels. This kernel reads each element once and writes it once, into its place in the send buffer: 31 us.

The math is the modules': RMSNorm in float32 (x * rsqrt(mean(x^2) + eps) * weight) rounded to the input dtype, as
the module returns it; then RoPE in float32 (x * cos + rotated * sin) rounded once. The sum of squares is reduced in
another order than torch's, so results match the torch ops within rounding, not bitwise.
"""
from __future__ import annotations

import contextlib

import torch

from .._triton import addressable, tl, triton
from ..config import on_device

if triton is not None:
    @triton.jit
    def _norm_rope_pack(text_q, text_k, text_v, image_q, image_k, image_v, text_wq, text_wk, image_wq, image_wk,
                        cos, sin, out, text_eps, image_eps, text_len, seq, heads, hc, chunks,
                        t_b, t_s, i_b, i_s, o_c, o_u, o_s, o_n, o_b, cos_s, sin_s,
                        BLOCK_H: tl.constexpr, D: tl.constexpr):
        """One program per (token, which of q / k / v): all heads of that row, into the send buffer
        out [chunks, U, seq, 3, B, hc, D], where head u * chunks * hc + j * hc + i goes to chunk j, rank u, slot i."""
        row = tl.program_id(0)
        which = tl.program_id(1)
        b = row // seq
        s = row % seq
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, D)[None, :]
        mask = h < heads
        if s < text_len:
            src, weight, eps, offset = text_v, text_wq, text_eps, b * t_b + s * t_s
            if which == 0:
                src = text_q
            if which == 1:
                src, weight = text_k, text_wk
        else:
            src, weight, eps, offset = image_v, image_wq, image_eps, b * i_b + (s - text_len) * i_s
            if which == 0:
                src = image_q
            if which == 1:
                src, weight = image_k, image_wk
        x = tl.load(src + offset + h * D + d, mask=mask, other=0.0).to(tl.float32)
        if which < 2:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
            x = (x * rstd * tl.load(weight + d).to(tl.float32)).to(out.dtype.element_ty).to(tl.float32)
            even, odd = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
            dims = tl.arange(0, D)
            cos_even, cos_odd = tl.split(tl.reshape(tl.load(cos + s * cos_s + dims), (D // 2, 2)))
            sin_even, sin_odd = tl.split(tl.reshape(tl.load(sin + s * sin_s + dims), (D // 2, 2)))
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
                           text_wk: torch.Tensor, image_wq: torch.Tensor, image_wk: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, text_eps: float, image_eps: float, text_len: int, heads: int,
                           group_size: int, chunks: int) -> torch.Tensor:
        batch, image_len, width = image_q.shape
        dim = width // heads
        seq = text_len + image_len
        hc = heads // (group_size * chunks)
        out = image_q.new_empty(chunks, group_size, seq, 3, batch, hc, dim)
        torch.library.wrap_triton(_norm_rope_pack)[(batch * seq, 3)](
            text_q, text_k, text_v, image_q, image_k, image_v, text_wq, text_wk, image_wq, image_wk, cos, sin, out,
            text_eps, image_eps, text_len, seq, heads, hc, chunks, text_q.stride(0), text_q.stride(1),
            image_q.stride(0), image_q.stride(1), *out.stride()[:5], cos.stride(0), sin.stride(0),
            BLOCK_H=triton.next_power_of_2(heads), D=dim, num_warps=4,  # 4: 31 us, 8: 32 us, 16: 38 us (H200)
        )
        return out


def _weight_and_eps(norm, dtype: torch.dtype):
    """torch.nn.RMSNorm over the head dim with a weight -> (weight, eps); else None (the kernel does no other norm)."""
    if type(norm) is not torch.nn.RMSNorm or norm.weight is None or len(norm.normalized_shape) != 1:
        return None
    return norm.weight, (torch.finfo(dtype).eps if norm.eps is None else norm.eps)


def applies(config, heads: int, image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple,
            image_rotary_emb) -> bool:
    """Whether the kernel takes this call: Ulysses > 1 on CUDA, and what applies_to_tensors asks. Else the processor
    runs the modules and torch's ops."""
    return (config.ulysses > 1 and image[0].is_cuda
            and applies_to_tensors(image, text, image_norms, text_norms, image_rotary_emb, heads, config.ulysses))


def applies_to_tensors(image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple, image_rotary_emb,
                       heads: int, group_size: int) -> bool:
    """image, text: (q, k, v) projections [B, S, heads * D] (text None in single-stream blocks); *_norms: (norm_q,
    norm_k) modules. Needs Triton, torch.nn.RMSNorm with weights (one eps for q and k), FLUX's float32 cos/sin [S, D],
    a power-of-two head dim, q/k/v of a stream with one layout and contiguous rows, 32-bit offsets, and no gradient
    (the kernel has none)."""
    q = image[0]
    if triton is None or image_rotary_emb is None or q.dim() != 3 or heads % group_size:
        return False
    streams = [(image, image_norms)] + ([(text, text_norms)] if text is not None else [])
    tensors = [x for t, _ in streams for x in t]
    dim = q.shape[-1] // heads
    seq = sum(t[0].shape[1] for t, _ in streams)
    cos, sin = image_rotary_emb
    norms = [(n, _weight_and_eps(n, q.dtype)) for _, ns in streams for n in ns]
    return (dim >= 2 and dim & (dim - 1) == 0 and q.shape[-1] == heads * dim
            and all(x.dtype == q.dtype and x.device == q.device and x.dim() == 3 and x.shape[0] == q.shape[0]
                    and x.shape[-1] == q.shape[-1] and x.stride() == t[0].stride() and x.stride(-1) == 1
                    for t, _ in streams for x in t)
            and all(we is not None and n.weight.shape == (dim,) for n, we in norms)
            and all(a[1][1] == b[1][1] for a, b in zip(norms[::2], norms[1::2]))  # q's and k's eps
            and cos.shape == sin.shape == (seq, dim) and cos.dtype == sin.dtype == torch.float32
            and cos.stride(-1) == sin.stride(-1) == 1 and cos.device == sin.device == q.device
            and addressable(*tensors, cos, sin) and q.shape[0] * seq * 3 * heads * dim < 2**31
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)))


def pack(image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple, image_rotary_emb, heads: int,
         group_size: int, chunks: int) -> list[torch.Tensor]:
    """What `applies` allowed -> `chunks` send buffers [U, S, 3, B, hc, D] (a2a.pack_head_chunks' layout) of
    q, k (normalized, the text stream's first, rotated) and v. The buffers are views of one allocation."""
    (wq, eps), (wk, _) = (_weight_and_eps(n, image[0].dtype) for n in image_norms)
    if text is None:
        text, text_wq, text_wk, text_eps, text_len = image, wq, wk, eps, 0
    else:
        (text_wq, text_eps), (text_wk, _) = (_weight_and_eps(n, text[0].dtype) for n in text_norms)
        text_len = text[0].shape[1]
    cos, sin = image_rotary_emb
    # Triton launches on the current device; Inductor's generated code sets the device itself
    device = contextlib.nullcontext() if torch.compiler.is_compiling() else on_device(image[0].device)
    with device:
        out = torch.ops.fastusp.norm_rope_pack(*text, *image, text_wq, text_wk, wq, wk, cos, sin, float(text_eps),
                                               float(eps), text_len, heads, group_size, chunks)
    return list(out.unbind(0))
