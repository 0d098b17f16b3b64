"""Tiny random FLUX / FLUX.2 / Qwen-Image transformers and their inputs, identical in every process that builds them."""
from __future__ import annotations

from types import SimpleNamespace

import torch

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
        patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=2, attention_head_dim=16,
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
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
            state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) / rank ** 0.5
    return state
