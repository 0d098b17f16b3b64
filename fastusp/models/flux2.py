"""FLUX.2 (Flux2Transformer2DModel): its spec and attention processors, diffusers' Flux2AttnProcessor /
Flux2ParallelSelfAttnProcessor math with the attention call replaced by USP.

Double-stream blocks (Flux2Attention) compute what FLUX.1's do: text and image q/k/v, joined [text, image].
Single-stream blocks (Flux2ParallelSelfAttention) are "parallel" blocks: one GEMM makes q, k, v and the MLP's input
for the joined sequence, and one GEMM projects the attention output and the MLP's output back together.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

from ..attention.usp import usp_attention
from ..processors.context import USPProcessor, cached_call_signature
from .flux import FastUSPFluxAttnProcessor, rotated
from .spec import ModelSpec


class FastUSPFlux2AttnProcessor(FastUSPFluxAttnProcessor):
    """Double-stream blocks: FLUX.1's joint attention, with FLUX.2's own q/k/v projections."""

    qkv_projections = staticmethod(_get_qkv_projections)
    fuse_norm_rope_pack = False  # see FastUSPFluxAttnProcessor


@cached_call_signature
class FastUSPFlux2ParallelSelfAttnProcessor(USPProcessor):
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise NotImplementedError("fastusp's FLUX.2 processors do not take an attention_mask")
        # diffusers splits by the q/k/v : MLP ratio so that a column-sharded (tensor parallel) projection works
        # too; fastusp shards tokens, never columns, so the split is at 3 * inner_dim
        qkv, mlp_hidden_states = attn.to_qkv_mlp_proj(hidden_states).split(
            [3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if image_rotary_emb is not None:
            query, key = rotated(query, key, image_rotary_emb)

        hidden_states = usp_attention(query, key, value, self.context.current_layout(), self.context.config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))


SPEC = ModelSpec(
    {"Flux2AttnProcessor": FastUSPFlux2AttnProcessor,
     "Flux2ParallelSelfAttnProcessor": FastUSPFlux2ParallelSelfAttnProcessor},
    text_inputs={"encoder_hidden_states": -2, "txt_ids": -2},
    image_inputs={"hidden_states": -2, "img_ids": -2},
    no_text_mask="does not take (FLUX pipelines pad prompts to a fixed length themselves)",
    refused_inputs={"kv_cache_mode": "FLUX.2's reference-image KV cache (Flux2KleinKVPipeline)"},
)
