"""Attention on one device, with and without the log-sum-exp that ring attention needs to merge partial results.

Layout [B, H, S, D]. key_bias: None or an additive float mask [B, S_k] over keys (see sharding.SeqLayout).
Backends: CPU uses aten's flash-for-cpu kernel (returns the LSE). On CUDA without a mask in fp16/bf16: cuDNN's
kernel where torch can use it (on H200 at 12 heads x 4608 tokens 0.27 ms vs 0.47 ms for aten's flash kernel, see
benchmarks/results), else flash-attn when installed, else aten's flash kernel; with a mask or in fp32 the
memory-efficient kernel. Compiled Ulysses with a text mask attends to the text keys apart from the image keys
(attention_text_keys_apart), so that the image keys take the unmasked kernel.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .merge import merge_attention

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
    """Whether cuDNN's kernel takes these inputs: asked of the device and dtype with a 128-wide head, and the head
    size and last-dimension strides checked here (every tensor this library passes is such a view). So the answer
    is a constant while tracing too, where Dynamo can neither build SDPAParams nor read the backend switch, and
    where shapes may be symbolic."""
    head = q.shape[-1]
    return (head <= 128 and head % 8 == 0 and all(t.stride(-1) == 1 for t in (q, k, v))
            and _cudnn_enabled_for(q.device, q.dtype))


@torch.compiler.assume_constant_result
def _cudnn_enabled_for(device: torch.device, dtype: torch.dtype) -> bool:
    # CUDA tensors only: torch's check initializes CUDA, which raises with a CUDA build of torch and no GPU driver
    return device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled() and _cudnn_supports(device, dtype)


@functools.lru_cache(maxsize=None)  # eager ring steps ask on every chunk
def _cudnn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    q = torch.empty(1, 1, 128, 128, device=device, dtype=dtype)
    return torch.backends.cuda.can_use_cudnn_attention(torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False,
                                                                                       False))


def attention(q, k, v, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain attention, [B, H, S, D] -> [B, H, S, D]; lets torch pick its fastest kernel."""
    mask = None if key_bias is None else key_bias.to(q.dtype)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_text_keys_apart(q, k, v, key_bias: torch.Tensor, text_lens: Sequence[int],
                              image_lens: Sequence[int]) -> torch.Tensor:
    """attention(q, k, v, key_bias) when only text keys can be masked; keys come as [text_0, image_0, text_1,
    image_1, ...], one pair per Ulysses rank. The image keys, copied into one block, are attended unmasked, the text
    keys with their bias, and the two parts merge by log-sum-exp (Inductor fuses the copies and the merge).

    Why: a bias over all keys slows cuDNN's kernel down by 60%. H200, compiled, 4224 tokens as 4 ranks leave them:
    145 against 172 us with 6 heads, 78 against 89 us with 3 (unmasked: 107 and 55 us). Attending to each rank's
    image block apart, without the copy, took 146 against 174 us for 2 ranks' 6 heads but 169 and 98 us for 4 ranks
    (benchmarks/results/2026-11-27-2xH200-masked-attention-head-chunks.md)."""
    starts = [sum(text_lens[:j]) + sum(image_lens[:j]) for j in range(len(text_lens))]
    image = [(s + t, i) for s, t, i in zip(starts, text_lens, image_lens)]
    text = list(zip(starts, text_lens))
    out, lse = merge_attention(None, None, *attention_with_lse(q, _pick(k, image), _pick(v, image)))
    if sum(text_lens):
        text_part = attention_with_lse(q, _pick(k, text), _pick(v, text), _pick(key_bias, text, dim=1))
        out, lse = merge_attention(out, lse, *text_part)
    return out.to(q.dtype)


def _pick(x: torch.Tensor, spans: list[tuple[int, int]], dim: int = 2) -> torch.Tensor:
    """The (start, length) spans of x along dim, concatenated."""
    return torch.cat([x.narrow(dim, start, length) for start, length in spans], dim)


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
