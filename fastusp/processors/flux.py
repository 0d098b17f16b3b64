"""FLUX attention processors: diffusers' FluxAttnProcessor / FluxIPAdapterAttnProcessor math, with the joint
attention call replaced by USP.

Used by both block kinds: double-stream blocks pass encoder_hidden_states (text) separately; single-stream
blocks pass the already joined [text, image] sequence as hidden_states. An IP-Adapter (double-stream blocks only)
adds an attention of the image queries to a few image-prompt tokens; every rank holds all of those tokens, so that
attention needs no communication: each rank attends with the queries of its own image tokens.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor, _get_qkv_projections

from ..attention.usp import usp_attention
from . import norm_rope_pack, rope
from .context import USPContext, USPProcessor, cached_call_signature


def rotated(query: torch.Tensor, key: torch.Tensor, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' apply_rotary_emb on q and k [B, S, H, D]: one kernel where `rope.applies` (eager CUDA), bitwise
    the same; else diffusers' own ops (compiled, where Inductor fuses them; CPU)."""
    cos, sin = image_rotary_emb
    if rope.applies(query, key, cos, sin):
        return rope.rotate(query, key, cos, sin)
    return (apply_rotary_emb(query, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(key, image_rotary_emb, sequence_dim=1))


def joint_usp_attention(context: USPContext, attn, hidden_states, encoder_hidden_states, attention_mask,
                        image_rotary_emb, qkv_projections=_get_qkv_projections, fuse_norm_rope_pack: bool = False):
    """FluxAttnProcessor's math with USP attention. Returns (its outputs, the image tokens' query before RoPE, which
    the IP-Adapter attends with; None where fuse_norm_rope_pack ran the norms in the kernel that packs q/k/v).
    FLUX.2's double-stream processor has the same math with its own module's qkv_projections."""
    if attention_mask is not None:
        raise NotImplementedError("fastusp's FLUX processors do not take an attention_mask")
    query, key, value, encoder_query, encoder_key, encoder_value = qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    if fuse_norm_rope_pack:
        text = None if attn.added_kv_proj_dim is None else (encoder_query, encoder_key, encoder_value)
        rotation = None if image_rotary_emb is None else norm_rope_pack.flux_rotation(
            image_rotary_emb, 0 if text is None else encoder_query.shape[1])
        fused = norm_rope_pack.fused_usp_attention(context, attn, (query, key, value), text, rotation)
        if fused is not None:
            return _joint_outputs(attn, fused.flatten(2, 3), encoder_hidden_states), None

    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    image_query = query

    if attn.added_kv_proj_dim is not None:
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)

    if image_rotary_emb is not None:
        query, key = rotated(query, key, image_rotary_emb)

    hidden_states = usp_attention(query, key, value, context.current_layout(), context.config)
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    return _joint_outputs(attn, hidden_states, encoder_hidden_states), image_query


def _joint_outputs(attn, hidden_states, encoder_hidden_states):
    """The attention output [B, S, H * D] -> the processor's outputs: as is (single-stream blocks), else the image
    and text parts through their output projections."""
    if encoder_hidden_states is None:
        return hidden_states
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
    )
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
    return hidden_states, encoder_hidden_states


@cached_call_signature
class FastUSPFluxAttnProcessor(USPProcessor):
    qkv_projections = staticmethod(_get_qkv_projections)  # FLUX.1's (to_q/k/v or fused to_qkv)
    # Not FLUX.2 (its subclass turns it off): there only the double-stream blocks would take it, and with it FLUX.2
    # u2r1 compiled was no faster (247.3 against 246.7 ms on 2xH200 cw; parity passed). Its capture failure on cn
    # was the GPU parity worker's own kernel check, fixed in e3528b3.
    fuse_norm_rope_pack = True

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        outputs, _ = joint_usp_attention(self.context, attn, hidden_states, encoder_hidden_states, attention_mask,
                                         image_rotary_emb, self.qkv_projections, self.fuse_norm_rope_pack)
        return outputs


@cached_call_signature
class FastUSPFluxIPAdapterAttnProcessor(FluxIPAdapterAttnProcessor):
    """diffusers' FluxIPAdapterAttnProcessor, same module (its to_k_ip / to_v_ip weights and scales, same state_dict
    keys), with the joint attention swapped for USP. Made from the loaded one by `from_diffusers`."""

    @classmethod
    def from_diffusers(cls, processor: FluxIPAdapterAttnProcessor, context: USPContext):
        usp = cls.__new__(cls)
        usp.__dict__.update(processor.__dict__)  # the same submodules and settings, not copies
        usp.context = context
        return usp

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,  # taken and ignored, as diffusers' FLUX processor does
    ):
        outputs, ip_query = joint_usp_attention(self.context, attn, hidden_states, encoder_hidden_states,
                                                attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return outputs
        hidden_states, encoder_hidden_states = outputs
        batch_size = hidden_states.shape[0]
        ip_attn_output = torch.zeros_like(hidden_states)
        for current_ip_hidden_states, scale, to_k_ip, to_v_ip in zip(
            ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip
        ):
            ip_key = to_k_ip(current_ip_hidden_states).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(current_ip_hidden_states).view(batch_size, -1, attn.heads, attn.head_dim)
            current = dispatch_attention_fn(ip_query, ip_key, ip_value, attn_mask=None, dropout_p=0.0,
                                            is_causal=False)
            current = current.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
            ip_attn_output += scale * current
        return hidden_states, encoder_hidden_states, ip_attn_output
