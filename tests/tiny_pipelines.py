"""Tiny random FluxPipeline / Flux2Pipeline / QwenImagePipeline (CPU, float32), identical in every process that
builds them.

The transformers are tests/tiny_models.py's `tiny_flux()` / `tiny_flux2()` / `tiny_qwen()`; the VAEs and schedulers
are built here. There is no text encoder or tokenizer (nothing can be downloaded), so call the pipelines with
`prompt_kwargs(pipe)`: precomputed `prompt_embeds` (+ `pooled_prompt_embeds` for FLUX.1, + `prompt_embeds_mask` for
Qwen-Image).

All VAEs downsample by 2 and all pipelines pack 2x2 latent patches, so height and width must be multiples of 4
and an H x W image has (H/4) * (W/4) image tokens (32 x 48 -> 96).

This module is also what examples/_common.py imports for the examples' tiny mode (it puts tests/ on sys.path), so
the tiny models exist in one place only.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

try:  # imported as tests.tiny_pipelines
    from .tiny_models import tiny_flux, tiny_flux2, tiny_qwen
except ImportError:  # imported as a top-level module (pytest's default rootdir insertion, the examples)
    from tiny_models import tiny_flux, tiny_flux2, tiny_qwen

# Real checkpoints' scheduler settings (dynamic shifting is what both pipelines expect: they always pass `mu`).
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True)
# FLUX.2's pipelines always pass their own `mu` (exponential time shift), so only these two settings matter
FLUX2_SCHEDULER = dict(use_dynamic_shifting=True, time_shift_type="exponential")
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
                      shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
# FLUX.1's and FLUX.2's VAEs (AutoencoderKL, AutoencoderKLFlux2) at this size downsample by 2
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux_pipeline():
    """FluxPipeline around tiny_flux(): AutoencoderKL with 4 latent channels (in_channels 16 = 4 * 4 after 2x2 packing)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux()
    latent_channels = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    _check_fit(pipe, latent_channels=vae.config.latent_channels)
    return pipe


def tiny_flux2_pipeline(klein: bool = False, kv: bool = False):
    """Flux2Pipeline (FLUX.2-dev: embedded guidance, one transformer call per step) around tiny_flux2(), or with
    klein, Flux2KleinPipeline (no guidance embedding; true CFG when guidance_scale > 1: pass negative prompt
    embeddings, or it encodes "" with the absent text encoder). kv: Flux2KleinKVPipeline, which caches reference
    images' keys and values and installs its own attention processors on the transformer.

    VAE and packing have FLUX.1's arithmetic (downsample by 2, 2x2 patches: an H x W image has (H/4) * (W/4)
    tokens). References must be at least 64 px a side (64 x 64 -> 256 tokens), appended after the image's tokens."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, \
        Flux2KleinPipeline, Flux2Pipeline

    transformer = tiny_flux2(guidance_embeds=not (klein or kv))
    latent_channels = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**FLUX_VAE, latent_channels=latent_channels).eval()
    # the pipelines normalize packed latents by the VAE's BatchNorm statistics: not the identity, as fresh ones are
    vae.bn.running_mean.copy_(0.1 * torch.arange(vae.bn.num_features) - 0.3)
    vae.bn.running_var.copy_(1.0 + 0.05 * torch.arange(vae.bn.num_features))
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), vae=vae, text_encoder=None,
                 tokenizer=None, transformer=transformer)
    if kv:
        pipe = Flux2KleinKVPipeline(**parts)
    else:
        pipe = Flux2KleinPipeline(**parts, is_distilled=False) if klein else Flux2Pipeline(**parts)
    _check_fit(pipe, latent_channels=latent_channels)
    return pipe


def tiny_controlnet_pipeline(name: str):
    """FluxControlNetPipeline / QwenImageControlNetPipeline ("flux" / "qwen"): the tiny pipeline's parts plus a
    ControlNet of one block of each kind. ControlNets start with zero output layers (they add nothing until
    trained); here those are random, so the residuals change the image and residuals added to the wrong image
    tokens would show."""
    from diffusers import (FluxControlNetModel, FluxControlNetPipeline, QwenImageControlNetModel,
                           QwenImageControlNetPipeline)

    base = tiny_flux_pipeline() if name == "flux" else tiny_qwen_pipeline()
    heads = dict(attention_head_dim=base.transformer.config.attention_head_dim,
                 num_attention_heads=base.transformer.config.num_attention_heads)
    torch.manual_seed(1)
    if name == "flux":
        controlnet = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=1, **heads)
        pipeline_cls = FluxControlNetPipeline
    else:
        controlnet = QwenImageControlNetModel.from_transformer(base.transformer, num_layers=1, **heads)
        pipeline_cls = QwenImageControlNetPipeline
    randomize_controlnet_outputs(controlnet)
    return pipeline_cls.from_pipe(base, controlnet=controlnet.eval())


def randomize_controlnet_outputs(controlnet, std: float = 0.5) -> None:
    """Random weights for the layers a ControlNet starts with zeroed (its control embedder and output projections),
    so its residuals are not zero and residuals added to the wrong image tokens would show."""
    outputs = (controlnet.controlnet_x_embedder, controlnet.controlnet_blocks,
               getattr(controlnet, "controlnet_single_blocks", None))  # Qwen-Image's has no single blocks
    for module in filter(None, outputs):
        for param in module.parameters():
            torch.nn.init.normal_(param, std=std)


def tiny_qwen_pipeline():
    """QwenImagePipeline around tiny_qwen(): AutoencoderKLQwenImage with z_dim 4 (in_channels 16, out_channels 4)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = tiny_qwen()
    z_dim = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae, text_encoder=None, tokenizer=None,
        transformer=transformer,
    )
    _check_fit(pipe, latent_channels=vae.config.z_dim)
    return pipe


def tiny_qwen_edit_pipeline(plus: bool = True):
    """plus: QwenImageEditPlusPipeline (what Qwen-Image-Edit-2509 / 2511 run) around tiny_qwen(zero_cond_t=True),
    the 2511 transformer, which modulates the reference images' tokens as at t = 0; else QwenImageEditPipeline (the
    first Qwen-Image-Edit) around tiny_qwen(). Both put the edited image's tokens first, then the reference's.
    The pipelines resize references to about 1024² pixels (thousands of tokens at this VAE's factor): callers shrink
    that (tests: monkeypatch)."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    base = tiny_qwen_pipeline()
    pipeline_cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return pipeline_cls(scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None, processor=None,
                        transformer=tiny_qwen(zero_cond_t=plus))


def tiny_qwen_layered_pipeline():
    """QwenImageLayeredPipeline around tiny_qwen(layered=True), with an RGBA VAE as Qwen-Image-Layered's. The
    pipeline sizes its images for 640² or 1024² pixels (calculate_dimensions): callers shrink that (tests:
    monkeypatch)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline

    transformer = tiny_qwen(layered=True)
    z_dim = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False], input_channels=4,
        latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()
    pipe = QwenImageLayeredPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                                    text_encoder=None, tokenizer=None, processor=None, transformer=transformer)
    # the pipeline casts the input image to the text encoder's dtype even when given prompt embeddings: a stand-in
    # that has only a dtype (set after init, which would record its class as a loadable component)
    pipe.text_encoder = SimpleNamespace(dtype=torch.float32)
    _check_fit(pipe, latent_channels=vae.config.z_dim)
    return pipe


def _check_fit(pipe, latent_channels: int) -> None:
    """Fail loudly if tiny_models' transformer config stops matching the VAE (2x2 packed latents)."""
    cfg = pipe.transformer.config
    out_channels = cfg.out_channels or cfg.in_channels
    if cfg.patch_size == 2:  # Qwen-Image: proj_out emits patch_size**2 * out_channels per token
        out_channels *= 4
    if cfg.in_channels != 4 * latent_channels or out_channels != 4 * latent_channels:
        raise ValueError(f"{type(pipe.transformer).__name__} in/out channels {cfg.in_channels}/{out_channels} do not "
                         f"match 4 * {latent_channels} VAE latent channels")


def prompt_kwargs(pipe, text_len: int = 7, valid_len: int | None = None, batch: int = 1, seed: int = 0,
                  negative: bool = False) -> dict:
    """Random stand-ins for encode_prompt's output, shaped for `pipe`'s transformer, as pipeline call kwargs.

    text_len: text tokens. valid_len (Qwen-Image only): real tokens per sample, the rest is padding masked out by
    `prompt_embeds_mask` (None: no mask). negative: name the keys negative_* (classifier-free guidance).
    """
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    prefix = "negative_" if negative else ""
    out = {f"{prefix}prompt_embeds": embeds}
    if type(pipe).__name__.startswith("Flux"):
        if valid_len is not None:
            raise ValueError("FLUX pipelines take no prompt mask")
        if "pooled_projection_dim" in cfg:  # FLUX.1's CLIP embedding; FLUX.2 has none
            out[f"{prefix}pooled_prompt_embeds"] = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    else:
        n = text_len if valid_len is None else valid_len
        out[f"{prefix}prompt_embeds_mask"] = (torch.arange(text_len) < n).long().expand(batch, text_len).clone()
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}


def tiny_call_kwargs(pipe, text_len: int = 7) -> dict:
    """The prompt-side kwargs the tests and the examples' tiny mode call the tiny pipelines with.

    FLUX: `text_len` prompt tokens, guidance 3.5. Qwen-Image: true CFG (scale 2) with a padded positive prompt
    (`text_len` tokens, the last 2 masked out: the attention-bias path) and a shorter unpadded negative prompt
    (all-ones mask, which the pipeline drops), so every step makes two transformer calls with different layouts.
    """
    if type(pipe).__name__.startswith("Flux"):
        return dict(prompt_kwargs(pipe, text_len=text_len, seed=0), guidance_scale=3.5)
    return dict(prompt_kwargs(pipe, text_len=text_len, valid_len=text_len - 2, seed=0),
                **prompt_kwargs(pipe, text_len=max(1, text_len - 3), seed=1, negative=True), true_cfg_scale=2.0)
