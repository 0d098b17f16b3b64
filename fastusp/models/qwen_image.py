"""Qwen-Image (QwenImageTransformer2DModel, with Edit and Layered; QwenImageControlNetModel): its spec, its attention
processor (diffusers' QwenDoubleStreamAttnProcessor2_0 math, attention call replaced by USP), and its RoPE rows and
per-token block inputs, which the forward builds from full shapes and fastusp cuts to this rank's tokens.

The text padding mask is not rebuilt here from the local `encoder_hidden_states_mask`: keys come from every rank,
so the sharded forward turns the full mask into a key bias in the global key order (SeqLayout.key_bias) once per
forward, and every layer reuses it.
"""
from __future__ import annotations

import torch

from .._forward import hook_forward, pre_forward_hook
from ..attention.usp import usp_attention
from ..kernels import rope
from ..kernels.norm_rope_pack import Rotation
from ..processors import norm_rope_pack
from ..processors.context import USPContext, USPProcessor, cached_call_signature
from ..sharding import narrow_tokens
from .spec import ControlNetSetup, ModelSpec


def real_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' apply_rotary_emb_qwen(x, freqs, use_real=False) written with real tensors: the same float32
    products, (a + ib)(c + id) = (ac - bd) + i(ad + bc), on consecutive (real, imaginary) pairs of x.

    Why: Inductor does not compile complex arithmetic; the complex form ran as one eager complex-multiply kernel
    per call, outside the fused q/k normalization. In real form all of it is one Inductor kernel. Measured in one
    call on 4xH200 (Qwen-Image 1024², text 128, 2 GPUs, compile_pipeline): 88.0 ms against 88.1 ms, so the gain
    is a graph without fallbacks rather than speed. x [B, S, H, D], freqs complex [S, D/2]. Unlike diffusers'
    reshape, this also takes a rank that holds no tokens of a stream (text shorter than the world size).
    """
    cos_sin = torch.view_as_real(freqs).unsqueeze(1)  # [S, 1, D/2, 2]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).type_as(x)


def _joint_rotated(txt_query, img_query, txt_key, img_key, image_rotary_emb):
    """RoPE on each stream's q and k, joined [text, image] -> (query, key), as diffusers' processor does them.

    Compiled, each stream is rotated apart, as in diffusers, so that Inductor fuses its q/k normalization with the
    rotation. Eager on CUDA, one kernel per stream writes its rotated q and k straight into the joined tensors
    (`rope`, bitwise the same). Eager elsewhere, q and k of both streams are joined first and rotated in one call:
    the same elementwise products, 45 fewer aten ops per block, and an eager multi-GPU step is bound by host time
    per op. Measured: docs/performance.md, "Tried and not kept"."""
    if image_rotary_emb is None:
        return torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1)
    img_freqs, txt_freqs = image_rotary_emb
    if torch.compiler.is_compiling():
        img_query, img_key = real_rope(img_query, img_freqs), real_rope(img_key, img_freqs)
        txt_query, txt_key = real_rope(txt_query, txt_freqs), real_rope(txt_key, txt_freqs)
        return torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1)
    # each stream's (q, k, cos, sin): a complex frequency's real and imaginary parts are cos and sin
    streams = [(q, k, *torch.view_as_real(freqs).unbind(-1))
               for q, k, freqs in ((txt_query, txt_key, txt_freqs), (img_query, img_key, img_freqs))]
    if all(rope.applies(*stream, pairs=True) for stream in streams):
        batch, seq_txt, heads, dim = txt_query.shape
        query = txt_query.new_empty(batch, seq_txt + img_query.shape[1], heads, dim)
        if rope.addressable(query):
            key = torch.empty_like(query)
            for stream, tokens in zip(streams, (slice(None, seq_txt), slice(seq_txt, None))):
                rope.rotate_into(*stream, query[:, tokens], key[:, tokens], pairs=True)
            return query, key
    query_key = torch.cat([torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1)])
    return real_rope(query_key, torch.cat([txt_freqs, img_freqs])).chunk(2)


def qwen_rotation(image_rotary_emb) -> Rotation:
    """Qwen-Image's (image, text) complex frequencies [S, D/2] -> their real and imaginary parts: cos and sin, for
    the fused kernel."""
    image_freqs, text_freqs = (torch.view_as_real(f) for f in image_rotary_emb)
    return Rotation(text_freqs[..., 0], text_freqs[..., 1], image_freqs[..., 0], image_freqs[..., 1], True)


@cached_call_signature
class FastUSPQwenImageAttnProcessor(USPProcessor):
    # q/k norms, RoPE and the all-to-all's pack in one kernel where norm_rope_pack applies (Ulysses > 1, CUDA)
    fuse_norm_rope_pack = True

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
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        image = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))
        rotation = None if image_rotary_emb is None else qwen_rotation(image_rotary_emb)
        joint = (norm_rope_pack.fused_usp_attention(self.context, attn, image, text, rotation)
                 if self.fuse_norm_rope_pack else None)
        if joint is None:
            joint = self._attention(attn, image, text, image_rotary_emb, head_dim)
        joint = joint.flatten(2, 3).to(image[0].dtype)
        txt_attn_output, img_attn_output = joint[:, :seq_txt], joint[:, seq_txt:]

        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output

    def _attention(self, attn, image: tuple, text: tuple, image_rotary_emb, head_dim: int) -> torch.Tensor:
        """diffusers' norms and RoPE as modules and torch's ops, then USP attention -> [B, S, H, D]."""
        img_query, img_key, img_value = (x.unflatten(-1, (-1, head_dim)) for x in image)
        txt_query, txt_key, txt_value = (x.unflatten(-1, (-1, head_dim)) for x in text)
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        query, key = _joint_rotated(txt_query, img_query, txt_key, img_key, image_rotary_emb)
        # The sharded forward passes encoder_hidden_states_mask=None: the layout carries the full mask as a key bias.
        return usp_attention(query, key, torch.cat([txt_value, img_value], dim=1), self.context.current_layout(),
                             self.context.config)


def shard_rope(pos_embed, context: USPContext) -> None:
    """Qwen-Image builds RoPE tables from shapes, not ids: build the full tables, keep this rank's rows. The same for
    Qwen-Image-Layered's tables (QwenEmbedLayer3DRope: one position on a layer axis per image, the input image at -1),
    which come in the same order as the image tokens."""
    rank = context.config.sequence_rank

    def forward(original, video_fhw, device=None, max_txt_seq_len=None):
        layout = context.current_layout()
        image_freqs, text_freqs = original(video_fhw, device=device, max_txt_seq_len=sum(layout.text))
        return image_freqs[layout.image_slice(rank)], text_freqs[layout.text_slice(rank)]

    hook_forward(pos_embed, forward)


def shard_block_image_inputs(transformer, inputs: dict[str, int], context: USPContext) -> None:
    """Per-image-token inputs (dim from the end) that the forward builds itself from full shapes and hands to every
    block: every block is handed the full-length tensor and narrows it to this rank's image tokens on the way in."""
    rank = context.config.sequence_rank

    def narrow(block, args, kwargs):
        layout = context.current_layout()
        for name, dim in inputs.items():
            if kwargs.get(name) is not None:
                kwargs[name] = narrow_tokens(kwargs[name], layout.image_slice(rank), dim)
        return args, kwargs

    for block in transformer.transformer_blocks:
        pre_forward_hook(block, narrow)


def shard_internals(transformer, context: USPContext) -> None:
    """RoPE rows; with zero_cond_t (Qwen-Image-Edit-2511), modulate_index: which image tokens are the edited image
    (0) and which the reference images (1, modulated as at t = 0)."""
    shard_rope(transformer.pos_embed, context)
    if getattr(transformer.config, "zero_cond_t", False):
        shard_block_image_inputs(transformer, {"modulate_index": -1}, context)


def controlnet_setup(net, context: USPContext) -> ControlNetSetup:
    shard_rope(net.pos_embed, context)
    return ControlNetSetup(image_inputs={"controlnet_cond": -2})


SPEC = ModelSpec(
    {"QwenDoubleStreamAttnProcessor2_0": FastUSPQwenImageAttnProcessor},
    text_inputs={"encoder_hidden_states": -2},
    image_inputs={"hidden_states": -2},
    residual_inputs={"controlnet_block_samples": -2},
    text_mask="encoder_hidden_states_mask",
    modulated_streams={"QwenImageTransformerBlock": ("img_mod", "txt_mod")},
    shard_internals=shard_internals,
    controlnet_setup=controlnet_setup,
)
