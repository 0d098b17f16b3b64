"""Attention on one device, with and without the log-sum-exp that ring attention needs to merge partial results.

Layout [B, H, S, D]. key_bias: None or an additive float mask [B, S_k] over keys (see sharding.SeqLayout).
Backends: CPU uses aten's flash-for-cpu kernel (returns the LSE). On CUDA without a mask in fp16/bf16: cuDNN's
kernel where torch can use it (on H200 at 12 heads x 4608 tokens 0.27 ms vs 0.47 ms for aten's flash kernel, see
benchmarks/results), else flash-attn when installed, else aten's flash kernel; with a mask or in fp32 the
memory-efficient kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra: fastusp[flash]
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_func = None

aten = torch.ops.aten


def _bias4d(key_bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return key_bias.to(q.dtype)[:, None, None, :].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _aligned_bias(key_bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # The memory-efficient kernel wants the bias's row stride aligned to 16 elements: pad the storage, keep the view.
    sk = k.shape[2]
    padded = (sk + 15) // 16 * 16
    storage = key_bias.new_zeros(key_bias.shape[0], padded)
    storage[:, :sk] = key_bias
    return _bias4d(storage, q, q.new_empty(1, 1, padded, 1))[..., :sk]


def _cudnn_usable(q, k, v) -> bool:
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
    return torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.can_use_cudnn_attention(params)


def attention(q, k, v, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention, [B, H, S, D] -> [B, H, S, D]; lets torch pick its fastest kernel."""
    mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_with_lse(q, k, v, key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its natural-log LSE: ([B, H, S, D] in q.dtype, [B, H, S] float32)."""
    if q.device.type == "cpu":
        mask = None if key_bias is None else _bias4d(key_bias, q, k)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
        return out, lse
    half = q.dtype in (torch.float16, torch.bfloat16)
    if key_bias is None and half and _cudnn_usable(q, k, v):
        out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
        return out, lse.reshape(q.shape[:3])  # cuDNN keeps a trailing 1: [B, H, S, 1]
    if key_bias is None and half and _flash_attn_func is not None:
        out, lse, _ = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
        return out.transpose(1, 2), lse
    if key_bias is None and half:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    bias = None if key_bias is None else _aligned_bias(key_bias, q, k)
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    return out, lse[..., : q.shape[2]]
