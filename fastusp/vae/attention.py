"""The VAEs' mid-block self-attention on a band of rows: queries of this rank's positions, keys and values of all.

The keys and values live at the coarsest resolution (the latent's), so gathering them costs little memory; the
attention matrix, the part that runs out of memory on one GPU at large sizes, shrinks with the rank count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed.gather import gather_seq
from .bands import RowBands

# diffusers' processors whose math attention_on_band repeats (the VAE's Attention uses AttnProcessor2_0)
SUPPORTED_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def _gather_keys(kv: torch.Tensor, bands: RowBands, width: int, dim: int) -> torch.Tensor:
    """All ranks' positions of `kv` (this rank's on `dim`, `width` positions per row)."""
    lengths = [rows * width for rows in bands.rows(bands.scale_of(kv.shape[dim] // width))]
    return gather_seq(kv, lengths, bands.group, dim=dim)


def attention_on_band(attn, hidden_states: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """diffusers' Attention with AttnProcessor2_0 on a 4-d input [B, C, rows, W] (the VAE's mid-block), keys and
    values gathered from every rank."""
    processor = type(attn.processor).__name__
    if processor not in SUPPORTED_PROCESSORS or attn.spatial_norm is not None or attn.norm_cross:
        raise NotImplementedError(f"fastusp's parallel VAE repeats diffusers' {SUPPORTED_PROCESSORS[0]}; this "
                                  f"attention uses {processor}: pass parallel_vae=False to parallelize")
    residual = hidden_states
    batch, channels, height, width = hidden_states.shape
    x = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:  # fastusp's GroupNorm over all ranks
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(x)
    key_value = _gather_keys(torch.cat([attn.to_k(x), attn.to_v(x)], dim=-1), bands, width, dim=1)
    key, value = key_value.chunk(2, dim=-1)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    out = out.transpose(-1, -2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def qwen_attention_on_band(block, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """Qwen-Image's QwenImageAttentionBlock (one head, per frame) on [B, C, T, rows, W], keys and values gathered."""
    identity = x
    batch, channels, frames, height, width = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    qkv = block.to_qkv(block.norm(x))  # RMS norm over channels: per position, needs no other rank
    qkv = qkv.reshape(batch * frames, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
    query = qkv[..., :channels]
    key, value = _gather_keys(qkv[..., channels:].contiguous(), bands, width, dim=2).chunk(2, dim=-1)
    x = F.scaled_dot_product_attention(query, key, value)
    x = x.squeeze(1).permute(0, 2, 1).reshape(batch * frames, channels, height, width)
    x = block.proj(x)
    x = x.view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
    return x + identity
