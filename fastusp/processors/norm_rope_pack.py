"""USP attention whose q/k norms, RoPE and pack into Ulysses' send buffers run as one kernel (kernels/norm_rope_pack.py)
where it applies: Ulysses > 1, on CUDA. For processors whose modules have norm_q / norm_k (and norm_added_q /
norm_added_k for a text stream) and whose RoPE tables the model's processor turns into a kernels' Rotation."""
from __future__ import annotations

import torch

from ..attention.usp import ulysses_attention
from ..kernels import norm_rope_pack as kernel
from .context import USPContext


def applies(config, heads: int, image: tuple, text: tuple | None, image_norms: tuple, text_norms: tuple,
            rotation: kernel.Rotation | None) -> bool:
    """Whether the kernel takes this call: Ulysses > 1 on CUDA, and what kernel.applies_to_tensors asks. Else the
    processor runs the modules and torch's ops."""
    return (config.ulysses > 1 and image[0].is_cuda
            and kernel.applies_to_tensors(image, text, image_norms, text_norms, rotation, heads, config.ulysses))


def fused_usp_attention(context: USPContext, attn, image: tuple, text: tuple | None,
                        rotation: kernel.Rotation | None) -> torch.Tensor | None:
    """USP attention [B, S, H, D] from the q/k/v projections (image, and text in front where given), attn's norms
    and RoPE run by the kernel as it packs the all-to-all's buffers; None where `applies` says no, and the caller
    runs the modules and torch's ops."""
    config = context.config
    image_norms = (attn.norm_q, attn.norm_k)
    text_norms = None if text is None else (attn.norm_added_q, attn.norm_added_k)
    if not applies(config, attn.heads, image, text, image_norms, text_norms, rotation):
        return None
    query = image[0]
    seq = query.shape[1] + (0 if text is None else text[0].shape[1])
    return ulysses_attention(
        lambda chunks: kernel.pack(image, text, image_norms, text_norms, rotation, attn.heads, config.ulysses, chunks),
        (query.shape[0], seq, attn.heads, query.shape[-1] // attn.heads), query.dtype, query.device,
        context.current_layout(), config)
