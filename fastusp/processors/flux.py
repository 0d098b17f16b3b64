"""FLUX attention processor: diffusers' FluxAttnProcessor math, with the attention call replaced by USP.

Used by both block kinds: double-stream blocks pass encoder_hidden_states (text) separately; single-stream
blocks pass the already joined [text, image] sequence as hidden_states. The projections run per head chunk
(processors/projections.py) so they overlap the all-to-alls of the neighbouring chunks.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..attention.usp import take_all, usp_attention_chunks
from .context import USPContext
from .projections import OutProjection, head_projection


def _qkv_projections(attn, hidden_states, encoder_hidden_states) -> list:
    """q, k, v and the text stream's q, k, v (None in single blocks) as functions of a head range."""
    dim = attn.head_dim
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if attn.fused_projections:  # one GEMM already makes q|k|v: split its result
        outs = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)[:6 if joint else 3]
        return [lambda heads, t=t: t.unflatten(-1, (-1, dim))[:, :, heads] for t in outs] + [None] * (6 - len(outs))
    projections = [head_projection(m, hidden_states, dim) for m in (attn.to_q, attn.to_k, attn.to_v)]
    if not joint:
        return projections + [None] * 3
    return projections + [head_projection(m, encoder_hidden_states, dim)
                          for m in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]


class FastUSPFluxAttnProcessor:
    def __init__(self, context: USPContext):
        self.context = context

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise NotImplementedError("fastusp's FLUX processor does not take an attention_mask")
        to_q, to_k, to_v, add_q, add_k, add_v = _qkv_projections(attn, hidden_states, encoder_hidden_states)

        def project(heads: slice):
            query, key, value = attn.norm_q(to_q(heads)), attn.norm_k(to_k(heads)), to_v(heads)
            if add_q is not None:  # text tokens first, as in diffusers' joint sequence
                query = torch.cat([attn.norm_added_q(add_q(heads)), query], dim=1)
                key = torch.cat([attn.norm_added_k(add_k(heads)), key], dim=1)
                value = torch.cat([add_v(heads), value], dim=1)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            return query, key, value

        chunks = usp_attention_chunks(project, attn.heads, self.context.current_layout(), self.context.config,
                                      hidden_states.device)
        if encoder_hidden_states is None:  # single block: the block's proj_out takes attention and MLP together
            return take_all(chunks).flatten(2, 3)

        text_len = encoder_hidden_states.shape[1]
        image_out, text_out = OutProjection(attn.to_out[0], attn.head_dim), OutProjection(attn.to_add_out, attn.head_dim)
        for heads, take in chunks:  # chunk j's output GEMMs run while chunk j+1 travels back
            out = take().flatten(2, 3)
            text_out.add(heads, out[:, :text_len])
            image_out.add(heads, out[:, text_len:])
        return attn.to_out[1](image_out.output()), text_out.output()
