"""Qwen-Image attention processor: diffusers' QwenDoubleStreamAttnProcessor2_0 math, attention call replaced by USP.

The text padding mask is not rebuilt here from the local `encoder_hidden_states_mask`: keys come from every rank,
so the sharded forward turns the full mask into a key bias in the global key order (SeqLayout.key_bias) once per
forward, and every layer reuses it.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ..attention.usp import usp_attention_chunks
from .context import USPContext
from .projections import OutProjection, head_projection


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # diffusers' RoPE reshapes with -1, which fails on a rank holding no tokens of a stream (text shorter than the
    # world size); such a rank has nothing to rotate.
    return apply_rotary_emb_qwen(x, freqs, use_real=False) if x.shape[1] else x


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class FastUSPQwenImageAttnProcessor:
    def __init__(self, context: USPContext):
        self.context = context

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        encoder_hidden_states_mask: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if encoder_hidden_states is None:
            raise ValueError("FastUSPQwenImageAttnProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("Pass encoder_hidden_states_mask, not attention_mask, to the Qwen-Image transformer")
        dim = attn.inner_dim // attn.heads
        to_q, to_k, to_v = (head_projection(m, hidden_states, dim) for m in (attn.to_q, attn.to_k, attn.to_v))
        add_q, add_k, add_v = (head_projection(m, encoder_hidden_states, dim)
                               for m in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)

        def project(heads: slice):
            img_q, img_k = _norm(attn.norm_q, to_q(heads)), _norm(attn.norm_k, to_k(heads))
            txt_q, txt_k = _norm(attn.norm_added_q, add_q(heads)), _norm(attn.norm_added_k, add_k(heads))
            if image_rotary_emb is not None:
                img_q, img_k = _rope(img_q, img_freqs), _rope(img_k, img_freqs)
                txt_q, txt_k = _rope(txt_q, txt_freqs), _rope(txt_k, txt_freqs)
            # text first: the joint order of diffusers' processor
            return (torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1),
                    torch.cat([add_v(heads), to_v(heads)], dim=1))

        # The sharded forward passes encoder_hidden_states_mask=None: the layout carries the full mask as a key bias.
        chunks = usp_attention_chunks(project, attn.heads, self.context.current_layout(), self.context.config,
                                      hidden_states.device)
        text_len = encoder_hidden_states.shape[1]
        img_out, txt_out = OutProjection(attn.to_out[0], dim), OutProjection(attn.to_add_out, dim)
        for heads, take in chunks:  # chunk j's output GEMMs run while chunk j+1 travels back
            out = take().flatten(2, 3)
            txt_out.add(heads, out[:, :text_len])
            img_out.add(heads, out[:, text_len:])
        img_attn_output = img_out.output()
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        return img_attn_output, txt_out.output()
