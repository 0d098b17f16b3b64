"""Qwen-Image attention processor: diffusers' QwenDoubleStreamAttnProcessor2_0 math, attention call replaced by USP.

The text padding mask is not rebuilt here from the local `encoder_hidden_states_mask`: keys come from every rank,
so the sharded forward turns the full mask into a key bias in the global key order (SeqLayout.key_bias) once per
forward, and every layer reuses it.
"""
from __future__ import annotations

import torch

from ..attention.usp import usp_attention
from . import norm_rope_pack, rope
from .context import USPProcessor, cached_call_signature


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
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
    per op. Measured: see docs/design.md ("RoPE in one call, eager only")."""
    if image_rotary_emb is None:
        return torch.cat([txt_query, img_query], dim=1), torch.cat([txt_key, img_key], dim=1)
    img_freqs, txt_freqs = image_rotary_emb
    if torch.compiler.is_compiling():
        img_query, img_key = _rope(img_query, img_freqs), _rope(img_key, img_freqs)
        txt_query, txt_key = _rope(txt_query, txt_freqs), _rope(txt_key, txt_freqs)
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
    return _rope(query_key, torch.cat([txt_freqs, img_freqs])).chunk(2)


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
        rotation = None if image_rotary_emb is None else norm_rope_pack.qwen_rotation(image_rotary_emb)
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
