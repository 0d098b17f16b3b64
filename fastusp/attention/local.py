"""Attention on one device, with and without the log-sum-exp that ring attention needs to merge partial results.

Layout [B, H, S, D]. key_bias: None or an additive float mask [B, S_k] over keys (see sharding.SeqLayout).
Backends: CPU uses aten's flash-for-cpu kernel (returns the LSE); CUDA uses flash-attn when it is installed and
there is no mask, else aten's flash kernel (no mask, fp16/bf16) or the memory-efficient kernel (mask or fp32).
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
    if key_bias is None and half and _flash_attn_func is not None:
        out, lse, _ = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_attn_probs=True)
        return out.transpose(1, 2), lse
    if key_bias is None and half:
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    bias = None if key_bias is None else _aligned_bias(key_bias, q, k)
    out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    return out, lse[..., : q.shape[2]]
