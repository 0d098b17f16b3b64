"""Tiny random FLUX / FLUX.2 / Qwen-Image transformers and pipelines (CPU, float32), identical in every process
that builds them: what fastusp's tests, its examples' tiny mode and examples/server.py run without downloading
anything.

Transformers: `tiny_flux()`, `tiny_flux2()`, `tiny_qwen()`, `tiny_qwen21()` and their forward inputs
(`flux_inputs()`, ...). Pipelines: `tiny_flux_pipeline()`, ... with their VAEs and schedulers.
`tiny_flux_pipeline(text_encoders=True)` and `tiny_qwen_pipeline(text_encoders=True)` have text encoders and
tokenizers (tiny random CLIP and T5, or Qwen2.5-VL; byte-level tokenizers built in code), so they take a text
prompt; the others are called with `prompt_kwargs(pipe)`: precomputed `prompt_embeds` (+ `pooled_prompt_embeds`
for FLUX.1, + `prompt_embeds_mask` for Qwen-Image).

All VAEs downsample by 2 and all pipelines pack 2x2 latent patches, so height and width must be multiples of 4
and an H x W image has (H/4) * (W/4) image tokens (32 x 48 -> 96).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


# --- transformers and their inputs ------------------------------------------------------------------------------
HEADS = 4  # divisible by every Ulysses degree the tests use (1, 2, 4)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_flux2(guidance_embeds: bool = True):
    """FLUX.2: 4-axis RoPE ids (T, H, W, L; the axes' dims sum to the head dim). guidance_embeds: FLUX.2-dev embeds
    the guidance scale, FLUX.2-klein does not."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def tiny_qwen(zero_cond_t: bool = False, layered: bool = False):
    """zero_cond_t: Qwen-Image-Edit-2511's variant (reference-image tokens modulated as at t = 0).
    layered: Qwen-Image-Layered's (RoPE with a layer axis, and an RGB / RGBA flag added to the timestep embedding),
    with 8 latent channels: its pipeline takes a 4-channel input as latents already, and its input images are RGBA."""
    from diffusers import QwenImageTransformer2DModel

    latent_channels = 8 if layered else 4
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=2,
        attention_head_dim=16,
        num_attention_heads=HEADS, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t,
        use_layer3d_rope=layered, use_additional_t_cond=layered,
    ).eval()


def flux_inputs(batch=1, height=4, width=5, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, height * width, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        pooled_projections=torch.randn(batch, 24, generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
    )


def flux2_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    """(height * width, 4) int64 ids of a packed latent grid as Flux2Pipeline builds them: (t, h, w, 0), row-major;
    t = 0 for the generated image, 10, 20, ... for reference images."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.arange(1))


def flux2_inputs(batch=1, height=4, width=5, text_len=7, seed=1, reference_hw=None):
    """As Flux2Pipeline passes them: batched int64 ids, text ids (0, 0, 0, l) (not all zero as in FLUX.1).
    reference_hw: (h, w) of a reference image whose tokens follow the image's, with t = 10."""
    g = torch.Generator().manual_seed(seed)
    img_ids = flux2_ids(height, width)
    if reference_hw:
        img_ids = torch.cat([img_ids, flux2_ids(*reference_hw, t=10)])
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    return dict(
        hidden_states=torch.randn(batch, img_ids.shape[0], 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 4.0),
        img_ids=img_ids.expand(batch, -1, -1),
        txt_ids=txt_ids.expand(batch, -1, -1),
    )


def qwen_inputs(batch=1, height=4, width=5, text_len=7, valid_lens=None, seed=1, reference_hw=None):
    """valid_lens: per-sample count of real text tokens (the rest is padding), or None for no mask.
    reference_hw: (h, w) of a reference image whose tokens follow the edited image's, as Qwen-Image-Edit passes them."""
    g = torch.Generator().manual_seed(seed)
    mask = None
    if valid_lens is not None:
        mask = (torch.arange(text_len)[None, :] < torch.tensor(valid_lens)[:, None]).long()
    shapes = [(1, height, width)] + ([(1, *reference_hw)] if reference_hw else [])
    return dict(
        hidden_states=torch.randn(batch, sum(h * w for _, h, w in shapes), 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.5),
        img_shapes=[shapes] * batch,
    )


def tiny_qwen21():
    """Qwen-Image 2.1: one single-stream block kind over the joint [text | images] sequence, block-causal."""
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(
        num_layers=2, attention_head_dim=16, num_attention_heads=HEADS, context_in_dim=32, in_channels=16,
        out_channels=16, axes_dims_rope=(4, 6, 6),
    ).eval()


class StubQwen3VLProcessor:
    """Stands in for the Qwen3-VL processor, which QwenImage21Pipeline's __init__ asks for the chat template's
    length and the image token's id; with prompt embeddings given, nothing else reads it."""

    tokenizer = SimpleNamespace(encode=lambda text: [0])

    def apply_chat_template(self, *args, **kwargs):
        return [[0] * 5]


def qwen21_inputs(batch=2, target_hw=(4, 6), condition_hw=(2, 4), text_lens=(3, 2), valid_lens=(5, 4), seed=1,
                  timestep=0.5):
    """Qwen-Image 2.1's forward inputs as its pipeline passes them: the prompt's `text_lens[0]` tokens, a condition
    image's slots (one per 2x2 latent tokens; none if condition_hw is None), `text_lens[1]` more text tokens, then
    the target image's slots; latents [condition | target]. valid_lens: per-sample real text tokens (the prompt's
    tail is padding), or None for no mask."""
    g = torch.Generator().manual_seed(seed)
    slots = [False] * text_lens[0]
    if condition_hw:
        slots += [True] * (condition_hw[0] * condition_hw[1] // 4)
    slots += [False] * text_lens[1]
    text = len(slots)
    shapes = ([(1, *condition_hw)] if condition_hw else []) + [(1, *target_hw)]
    img_mask = torch.tensor([slots + [True] * (target_hw[0] * target_hw[1] // 4)] * batch)
    mask = None
    if valid_lens is not None:  # counts the text positions only: slots are always valid
        real = torch.cumsum(~torch.tensor(slots), 0)
        mask = torch.stack([(real <= n) | torch.tensor(slots) for n in valid_lens])
    return dict(
        hidden_states=torch.randn(batch, sum(h * w for _, h, w in shapes), 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), timestep),
        img_shapes=[shapes] * batch,
        img_mask=img_mask,
    )


def qwen_layered_inputs(batch=1, height=4, width=5, text_len=7, valid_lens=None, seed=1, layers=2):
    """Qwen-Image-Layered's forward inputs: the composite and `layers` layers being generated, then the input image,
    all height x width (one img_shapes entry each, as the pipeline passes them); the RGB flag alternates over the
    batch."""
    inputs = qwen_inputs(batch, height, width, text_len, valid_lens, seed)
    shapes = [(1, height, width)] * (layers + 2)
    g = torch.Generator().manual_seed(seed + 1)
    return dict(inputs, hidden_states=torch.randn(batch, len(shapes) * height * width, 32, generator=g),
                img_shapes=[shapes] * batch, additional_t_cond=torch.arange(batch) % 2)


def random_ip_adapter_state_dict(transformer, clip_dim: int, seed: int = 3) -> dict:
    """A random FLUX IP-Adapter checkpoint (4 image-prompt tokens) in the layout diffusers' loader reads
    (`transformer._load_ip_adapter_weights`, what load_ip_adapter calls), for any FluxTransformer2DModel's widths."""
    # Weights scaled by 1/sqrt(fan-in), like trained ones: with std 0.3 at FLUX's 4096-wide text features the
    # image-prompt keys came out ~20x too large, softmax saturated, and bf16 rounding alone moved diffusers' own
    # one-GPU output by 9% (CPU, against float32).
    g = torch.Generator().manual_seed(seed)
    weight = lambda rows, cols: torch.randn(rows, cols, generator=g) / cols ** 0.5
    small = lambda n: torch.randn(n, generator=g) * 0.1
    text_dim, inner, tokens = transformer.config.joint_attention_dim, transformer.inner_dim, 4
    image_proj = {"proj.weight": weight(tokens * text_dim, clip_dim), "proj.bias": small(tokens * text_dim),
                  "norm.weight": 1 + small(text_dim), "norm.bias": small(text_dim)}
    ip_adapter = {}
    for i in range(len(transformer.transformer_blocks)):
        for kv in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{i}.{kv}.weight"], ip_adapter[f"{i}.{kv}.bias"] = weight(inner, text_dim), small(inner)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


# the attention and MLP projections, and the AdaLN modulation layers that fastusp computes once over the ranks
# (FLUX's norm1 / norm1_context / norm, Qwen-Image's img_mod / txt_mod; modulation.py)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear",
                "norm.linear", "img_mod.1", "txt_mod.1")


def random_lora_state_dict(transformer, seed: int, rank: int = 2, targets=LORA_TARGETS) -> dict:
    """A random LoRA for the transformer's linear layers named by `targets`, in the layout pipelines' load_lora_weights
    reads (diffusers / PEFT keys: transformer.<module>.lora_A.weight [rank, in], lora_B.weight [out, rank])."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            prefix = f"transformer.{name}"
            fan_in = module.in_features
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) / rank ** 0.5
    return state


# --- pipelines --------------------------------------------------------------------------------------------------

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


def tiny_flux_pipeline(text_encoders: bool = False):
    """FluxPipeline around tiny_flux(): AutoencoderKL with 4 latent channels (in_channels 16 = 4 * 4 after 2x2 packing).
    text_encoders: with tiny random CLIP and T5 text encoders and their tokenizers (tiny_text_encoder), so the
    pipeline takes `prompt`; without, it needs `prompt_embeds` (prompt_kwargs)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux()
    latent_channels = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKL(**FLUX_VAE, latent_channels=latent_channels, scaling_factor=0.3611, shift_factor=0.1159).eval()
    text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if text_encoders:
        cfg = transformer.config
        text = dict(zip(("text_encoder", "tokenizer"), tiny_text_encoder("clip", cfg.pooled_projection_dim)))
        text.update(zip(("text_encoder_2", "tokenizer_2"), tiny_text_encoder("t5", cfg.joint_attention_dim)))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, transformer=transformer,
                        **text)
    _check_fit(pipe, latent_channels=vae.config.latent_channels)
    return pipe


def byte_tokenizer(max_length: int, bos: str | None, eos: str, pad: str):
    """A byte-level BPE tokenizer without merges, built in code: every UTF-8 byte of any text is one token, so any
    prompt tokenizes without a downloaded vocabulary. Adds `bos` (if given) and `eos` around each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (pad, bos, eos) if t is not None))  # CLIP pads with its eos
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: a set, in each process's own hash order
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    around = [bos, "$A", eos] if bos else ["$A", eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(around), special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, pad_token=pad,
                                   eos_token=eos, **({"bos_token": bos} if bos else {}))


def tiny_text_encoder(kind: str, width: int):
    """(text encoder, tokenizer), random, `width` features: "clip" (CLIPTextModel: its pooled output, 77 tokens, as
    FLUX.1's first encoder), "t5" (T5EncoderModel: per-token features, as FLUX.1's second) or "qwen2.5-vl"
    (Qwen2_5_VLForConditionalGeneration: its last hidden states, as Qwen-Image's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if kind == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer = byte_tokenizer(1024 + 34, bos=None, eos="<|endoftext|>", pad="<|endoftext|>")  # + the template
        text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to half the head dim, 16
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=width,
                      fullatt_block_indexes=[0])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        return Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer
    if kind == "clip":
        tokenizer = byte_tokenizer(77, bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>")
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return CLIPTextModel(config).eval(), tokenizer
    tokenizer = byte_tokenizer(512, bos=None, eos="</s>", pad="<pad>")
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval(), tokenizer


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


def tiny_qwen_pipeline(text_encoders: bool = False):
    """QwenImagePipeline around tiny_qwen(): AutoencoderKLQwenImage with z_dim 4 (in_channels 16, out_channels 4).
    text_encoders: with a tiny random Qwen2.5-VL text encoder and its tokenizer (tiny_text_encoder), so the
    pipeline takes `prompt`; without, it needs `prompt_embeds` (prompt_kwargs)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    transformer = tiny_qwen()
    z_dim = transformer.config.in_channels // 4
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()
    text = dict(text_encoder=None, tokenizer=None)
    if text_encoders:
        text = dict(zip(("text_encoder", "tokenizer"),
                        tiny_text_encoder("qwen2.5-vl", transformer.config.joint_attention_dim)))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=vae,
                             transformer=transformer, **text)
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
    """Fail loudly if the config of tiny_flux() / tiny_qwen() stops matching the VAE (2x2 packed latents)."""
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
