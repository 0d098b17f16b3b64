"""FLUX.1 (FluxTransformer2DModel, FluxControlNetModel): its spec and attention processors, diffusers'
FluxAttnProcessor / FluxIPAdapterAttnProcessor math with the joint attention call replaced by USP.

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

from .._forward import pre_forward_hook
from ..attention.usp import usp_attention
from ..kernels import rope
from ..kernels.norm_rope_pack import Rotation
from ..processors import norm_rope_pack
from ..processors.context import USPContext, USPProcessor, cached_call_signature
from ..sharding import SeqLayout, narrow_tokens
from .spec import ControlNetSetup, ModelSpec


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
        rotation = None if image_rotary_emb is None else flux_rotation(
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


def flux_rotation(image_rotary_emb, text_len: int) -> Rotation:
    """FLUX's (cos, sin) [text + image tokens, D] -> the text rows and the image rows, for the fused kernel."""
    cos, sin = image_rotary_emb
    return Rotation(cos[:text_len], sin[:text_len], cos[text_len:], sin[text_len:], False)


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
    # on 2 GPUs compiled was no faster.
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


def controlnet_setup(net, context: USPContext) -> ControlNetSetup:
    """FLUX ControlNets. XLabs-style ones (input_hint_block) embed a full control image inside the forward: its
    tokens are cut to this rank's rows where they are embedded. ControlNet-Union prepends a mode token to the text
    inside its forward, on every rank: each rank's text chunk therefore starts with a copy of it, and the copies of
    ranks other than the first are masked out as keys, so attention sees exactly one mode token, as on one device
    (a copy's own output is only text, which no residual carries)."""
    rank = context.config.sequence_rank
    hint_block = getattr(net, "input_hint_block", None) is not None
    if hint_block:
        pre_forward_hook(net.controlnet_x_embedder, lambda module, args, kwargs: (
            (narrow_tokens(args[0], context.current_layout().image_slice(rank), -2), *args[1:]), kwargs))
    union = bool(getattr(net, "union", False))
    return ControlNetSetup(image_inputs={} if hint_block else {"controlnet_cond": -2},
                           adjust_layout=_with_mode_token_copies if union else None)


def _with_mode_token_copies(layout: SeqLayout, inputs: dict) -> SeqLayout:
    """The layout with each rank's text one token longer (its copy of the mode token), and a key bias masking the
    copies of every rank but the first. FLUX ControlNets take no text mask, so there is no other bias to merge."""
    hidden = inputs["hidden_states"]
    text = tuple(t + 1 for t in layout.text)
    keep = torch.ones(hidden.shape[0], sum(text), dtype=torch.bool, device=hidden.device)
    first = 0
    for t in text[:-1]:
        first += t
        keep[:, first] = False  # the next rank's first text token: its mode-token copy
    return SeqLayout(text, layout.image).with_text_mask(keep, hidden.dtype)


SPEC = ModelSpec(
    {"FluxAttnProcessor": FastUSPFluxAttnProcessor},
    text_inputs={"encoder_hidden_states": -2, "txt_ids": -2},
    image_inputs={"hidden_states": -2, "img_ids": -2},
    residual_inputs={"controlnet_block_samples": -2, "controlnet_single_block_samples": -2},
    adapter_processors={"FluxIPAdapterAttnProcessor": FastUSPFluxIPAdapterAttnProcessor.from_diffusers},
    no_text_mask="does not take (FLUX pipelines pad prompts to a fixed length themselves)",
    modulated_streams={"FluxTransformerBlock": ("norm1", "norm1_context"), "FluxSingleTransformerBlock": ("norm",)},
    controlnet_setup=controlnet_setup,
)
