"""Qwen-Image 2.1 attention processor: diffusers' QwenImage21AttnProcessor math, its attention over the whole joint
sequence computed from this rank's rows.

The sharded forward hands each block this rank's rows of the joint [text | images] sequence (parallelize.py,
`_shard_joint_sequence`). Here q, k and v go from sequence to head sharding and back as for the other models
(usp_attention, with this model's attention in place of fastusp's); under Ring the keys and values of the other ring
chunks are all-gathered (one collective, not the pipelined ring: Qwen-Image 2.1's block-causal mask differs row by
row). Each rank then holds its heads' keys for the whole sequence and attends with its rows' queries
(attention/block_causal.py).

The prefix KV cache (Qwen-Image 2.1's pipeline fills it on the first step, "extract", and reads it on the later
ones, "cached") holds this rank's heads of the prefix keys and values, [B, heads / ulysses, prefix, D]: a cache
filled by a parallelized transformer serves only that transformer, with the same settings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.block_causal import block_causal_attention
from ..attention.usp import ring_chunk_lens, usp_attention
from ..distributed.gather import gather_seq
from .context import USPProcessor, cached_call_signature
from .qwen_image import _rope


@cached_call_signature
class FastUSPQwenImage21AttnProcessor(USPProcessor):
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        layer_cache=None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if segments is None and kv_cache_mode != "cached":
            raise ValueError("FastUSPQwenImage21AttnProcessor needs the prefix segments that diffusers' forward "
                             "passes to its QwenImage21AttnProcessor")
        head_dim = attn.inner_dim // attn.heads
        query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        query = attn.norm_q(query).to(value.dtype)
        key = attn.norm_k(key).to(value.dtype)
        if rotary_emb is not None:  # diffusers' apply_rotary_emb_qwen(x, rotary_emb, use_real=False), in real form
            query, key = _rope(query, rotary_emb), _rope(key, rotary_emb)

        layout, config = self.context.current_layout(), self.context.config
        chunk_lens = ring_chunk_lens(layout.tokens, config)

        def attend(q, kv):
            """This ring chunk's rows' queries [B, h, R, D] against every key of the sequence."""
            if config.ring > 1:  # the other chunks' keys and values, in sequence order
                kv = gather_seq(kv.contiguous(), chunk_lens, config.ring_group, dim=0)
            k, v = kv.permute(1, 2, 3, 0, 4).unbind(0)
            if kv_cache_mode == "cached":  # the target image's rows: every key, the cached prefix's first
                # a dict under compile_pipeline's CUDA graphs: the cache's tensors copied into the graph's inputs
                cached_k, cached_v = (layer_cache["k"], layer_cache["v"]) if isinstance(layer_cache, dict) \
                    else layer_cache.get()
                k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            if kv_cache_mode == "extract" and layer_cache is not None and cache_write_slice is not None:
                layer_cache.store(k[:, :, cache_write_slice].clone(), v[:, :, cache_write_slice].clone())
            return block_causal_attention(q, k, v, sum(chunk_lens[:config.ring_rank]), segments, key_valid)

        # one head chunk: the cache holds a layer's heads in one tensor
        out = usp_attention(query, key, value, layout, config, attend).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
