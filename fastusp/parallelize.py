"""parallelize(): patch a diffusers FLUX / FLUX.2 / Qwen-Image (2.1) transformer (or the pipeline holding it) for USP.

After it the transformer takes the same full inputs on every rank and returns the full output on every rank:
  apply_usp_processors      swap each attention processor for the fastusp one (diffusers' math, USP attention)
  apply_sequence_sharding   wrap forward: cut inputs along the sequence, run diffusers' forward, gather the output
                            (Qwen-Image 2.1: cut the joint sequence the forward builds, at its first block)
  apply_shared_modulation   each rank computes the AdaLN modulation of some blocks, one all-gather shares it
  apply_controlnet_sharding pipelines with a ControlNet: it is sharded too, its residuals stay sharded
  apply_rank_consistency    pipelines only: same initial noise on every rank, progress bar on rank 0
  apply_cfg_parallel        pipelines with cfg=2 only: each half of the ranks runs one guidance pass of a step
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.utils.torch_utils import get_module_execution_device

from ._forward import forward_of, set_forward, wrap_forward
from .agreement import apply_call_checks, check_settings_agree
from .caches import share_cache_decisions
from .cfg_parallel import apply_cfg_parallel, track_denoising_loop
from .config import ParallelConfig, as_timeout, check_one_gpu_per_rank, fill_degrees, maybe_init_distributed
from .controlnet import apply_controlnet_sharding, controlnets
from .distributed.gather import gather_seq
from .joint_layout import reuse_joint_layout
from .modulation import apply_shared_modulation
from .processors.context import USPContext
from .processors.flux import FastUSPFluxAttnProcessor, FastUSPFluxIPAdapterAttnProcessor
from .processors.flux2 import FastUSPFlux2AttnProcessor, FastUSPFlux2ParallelSelfAttnProcessor
from .processors.qwen_image import FastUSPQwenImageAttnProcessor
from .processors.qwen_image21 import FastUSPQwenImage21AttnProcessor
from .sharding import SeqLayout

logger = logging.getLogger("fastusp")


@dataclass(frozen=True)
class ModelSpec:
    """Which forward inputs live on the text / image token axis (as a dim counted from the end)."""

    # diffusers' attention processors (by class name) -> fastusp's, made with the context; layers with the same
    # diffusers processor share one instance
    processors: dict[str, type]
    text_inputs: dict[str, int]
    image_inputs: dict[str, int]
    # ControlNet residuals: full length, or already this rank's image tokens (from a sharded ControlNet)
    residual_inputs: dict[str, int]
    # diffusers adapter processors (by class name) -> fastusp's version, made from the loaded one and the context
    adapter_processors: dict | None = None
    text_mask: str | None = None
    rope_from_shapes: bool = False  # Qwen-Image builds RoPE from image shapes, not from per-token ids
    # config flag -> per-image-token inputs (dim from the end) that the forward builds itself from full shapes when
    # the flag is set, and hands to every block: narrowed at each block to this rank's image tokens
    block_image_inputs: dict[str, dict[str, int]] | None = None
    # forward inputs fastusp does not shard -> what they are for: a call that sets one raises, rather than run
    # diffusers' per-position code on this rank's tokens alone
    refused_inputs: dict[str, str] | None = None
    # the forward interleaves text and image tokens into one sequence itself (Qwen-Image 2.1): the blocks get this
    # rank's rows of it, and its inputs stay whole
    joint_sequence: bool = False
    # how many tokens the forward returns for these inputs (the image tokens unless set): cfg=2 makes a skipped
    # pass's placeholder from it
    output_tokens: Callable[[dict], int] | None = None
    # block class name -> its AdaLN modulation modules, one per stream, each taking `temb` (modulation.py)
    modulated_streams: dict[str, tuple[str, ...]] | None = None

    def output_tokens_of(self, inputs: dict) -> int:
        return self.output_tokens(inputs) if self.output_tokens else inputs["hidden_states"].shape[1]


def _model_specs() -> dict[type, ModelSpec]:
    from diffusers import (Flux2Transformer2DModel, FluxTransformer2DModel, QwenImage21Transformer2DModel,
                           QwenImageTransformer2DModel)

    return {
        FluxTransformer2DModel: ModelSpec(
            {"FluxAttnProcessor": FastUSPFluxAttnProcessor},
            text_inputs={"encoder_hidden_states": -2, "txt_ids": -2},
            image_inputs={"hidden_states": -2, "img_ids": -2},
            residual_inputs={"controlnet_block_samples": -2, "controlnet_single_block_samples": -2},
            adapter_processors={"FluxIPAdapterAttnProcessor": FastUSPFluxIPAdapterAttnProcessor.from_diffusers},
            modulated_streams={"FluxTransformerBlock": ("norm1", "norm1_context"),
                               "FluxSingleTransformerBlock": ("norm",)},
        ),
        Flux2Transformer2DModel: ModelSpec(
            {"Flux2AttnProcessor": FastUSPFlux2AttnProcessor,
             "Flux2ParallelSelfAttnProcessor": FastUSPFlux2ParallelSelfAttnProcessor},
            text_inputs={"encoder_hidden_states": -2, "txt_ids": -2},
            image_inputs={"hidden_states": -2, "img_ids": -2},
            residual_inputs={},
            refused_inputs={"kv_cache_mode": "FLUX.2's reference-image KV cache (Flux2KleinKVPipeline)"},
        ),
        QwenImageTransformer2DModel: ModelSpec(
            {"QwenDoubleStreamAttnProcessor2_0": FastUSPQwenImageAttnProcessor},
            text_inputs={"encoder_hidden_states": -2},
            image_inputs={"hidden_states": -2},
            residual_inputs={"controlnet_block_samples": -2},
            text_mask="encoder_hidden_states_mask", rope_from_shapes=True,
            # zero_cond_t (Qwen-Image-Edit-2511): which image tokens are the edited image (0) and which the
            # reference images (1, modulated as at t = 0)
            block_image_inputs={"zero_cond_t": {"modulate_index": -1}},
            modulated_streams={"QwenImageTransformerBlock": ("img_mod", "txt_mod")},
        ),
        QwenImage21Transformer2DModel: ModelSpec(
            {"QwenImage21AttnProcessor": FastUSPQwenImage21AttnProcessor,
             "QwenImage21FlexAttnProcessor": FastUSPQwenImage21AttnProcessor},
            text_inputs={}, image_inputs={}, residual_inputs={}, joint_sequence=True,
            output_tokens=_qwen21_output_tokens,
        ),
    }


def _qwen21_output_tokens(inputs: dict) -> int:
    """Qwen-Image 2.1 returns its whole joint sequence: every slot of img_mask (prompt tokens, and a slot per 2x2
    latent tokens of each image) with the image slots expanded four-fold; after the KV cache's first step, the target
    image's tokens alone."""
    if inputs.get("kv_cache_mode") == "cached":
        return math.prod(inputs["img_shapes"][0][-1])
    img_mask = inputs["img_mask"]
    return img_mask.shape[1] + 3 * int(img_mask[0].sum())


def parallelize(obj, *, ulysses: int | None = None, ring: int | None = None, cfg: int = 1,
                fp8_comm: bool | str = False, timeout=None, check_calls: bool = True, **options):
    """Shard a FLUX / FLUX.2 / Qwen-Image transformer's token sequence across all ranks, in place; returns `obj`.

    obj: a diffusers pipeline with a `transformer`, or a FluxTransformer2DModel / Flux2Transformer2DModel /
    QwenImageTransformer2DModel / QwenImage21Transformer2DModel.
    cfg * ulysses * ring must equal the number of processes (torchrun --nproc-per-node), and ulysses must divide
    the number of attention heads. With neither ulysses nor ring given, ulysses is the largest degree that divides
    the heads and the processes of one guidance pass, ring the rest (logged); with one given, the other takes the
    rest. cfg=2 runs the two guidance passes of true CFG on two halves of the ranks at once (a pipeline only).
    fp8_comm ("qkv" / True, "all") and the tuning options (ulysses_chunks, ring_overlap): see ParallelConfig.
    timeout: seconds (or a timedelta) after which a collective that some rank never joins raises on the ranks
    waiting in it; for the process group parallelize creates and the groups it builds (default: torch's, 30
    minutes on gloo, 10 on NCCL). Every rank must make the same calls: parallelize checks that the ranks agree on
    its settings, and every pipeline call (or, for a bare transformer, every forward) that they were given the same
    arguments, raising the same ValueError on every rank otherwise (docs/ranks.md). check_calls=False turns the
    per-call check off (it costs one small all_gather per call).
    A pipeline whose transformer is parallelized already (made with from_pipe) takes the same settings again and
    gets only the per-pipeline parts.
    """
    transformer = getattr(obj, "transformer", obj)
    shared = getattr(transformer, "_fastusp_config", None)
    if shared is not None and ulysses is None and ring is None:  # from_pipe: the shared transformer's degrees
        ulysses, ring = shared.ulysses, shared.ring
    heads = math.gcd(*(getattr(getattr(m, "config", None), "num_attention_heads", 1)
                       for m in [transformer, *controlnets(obj)]))
    ulysses, ring = fill_degrees(ulysses, ring, cfg, heads)
    config = ParallelConfig(ulysses=ulysses, ring=ring, cfg=cfg, fp8_comm=fp8_comm, **options)
    timeout = as_timeout(timeout)
    if config.cfg > 1 and (obj is transformer or not hasattr(obj, "scheduler")):
        raise ValueError("cfg parallelism splits a pipeline's guidance passes: pass the pipeline, not the transformer")
    if obj is not transformer and getattr(transformer, "_fastusp_config", None) is not None:
        return _add_pipeline(obj, transformer, config, check_calls)
    spec = _spec_for(transformer)
    for model in [transformer, *controlnets(obj)]:
        config.validate_heads(model.config.num_attention_heads)
    # where it computes: under enable_model_cpu_offload the weights wait on the CPU and the offload hook names the GPU
    device = get_module_execution_device(transformer)
    check_one_gpu_per_rank(device)
    maybe_init_distributed(device, timeout)
    config.set_timeout(timeout)  # the default group's, for the check below; the groups built next get it after
    config.validate_world(dist.get_world_size())
    check_settings_agree(config, transformer, obj, device)  # before the groups: mismatched degrees would hang there
    config.build_mesh(device.type)
    config.set_timeout(timeout)

    context = USPContext(config)
    apply_usp_processors(transformer, spec, context)
    _refuse_processor_changes(transformer)
    apply_sequence_sharding(transformer, spec, context)
    apply_shared_modulation(transformer, spec.modulated_streams, context)
    if obj is not transformer:
        apply_controlnet_sharding(obj, config, spec)
        apply_rank_consistency(obj)
        obj._fastusp_parallelized = True
    if config.cfg > 1:
        apply_cfg_parallel(obj, transformer, config, spec.output_tokens_of)
    apply_call_checks(obj, transformer, device, check_calls)
    transformer._fastusp_config = config
    transformer._fastusp_context = context  # compile_pipeline's graphs of all blocks key on its layout
    if dist.get_rank() == 0:
        logger.info("fastusp: %s parallelized with cfg=%d ulysses=%d ring=%d fp8_comm=%s",
                    type(transformer).__name__, config.cfg, config.ulysses, config.ring, config.fp8_comm)
    return obj


def _add_pipeline(pipe, transformer, config: ParallelConfig, check_calls: bool):
    """A pipeline made from a parallelized one (`FluxImg2ImgPipeline.from_pipe(pipe)`) shares its transformer, which
    is parallelized already: give the new pipeline only what is per pipeline (the same noise on every rank, and for
    cfg=2 its denoising loop)."""
    shared = transformer._fastusp_config
    if getattr(pipe, "_fastusp_parallelized", False):
        raise ValueError("this pipeline is already parallelized by fastusp")
    if shared.settings() != config.settings():
        raise ValueError(f"this pipeline's transformer is already parallelized with {shared.settings()}; a pipeline "
                         f"that shares it (from_pipe) must use the same settings, got {config.settings()}")
    apply_controlnet_sharding(pipe, shared, _model_specs()[type(transformer)])  # shared: the built groups
    apply_rank_consistency(pipe)
    if config.cfg > 1:
        track_denoising_loop(pipe, transformer)
    apply_call_checks(pipe, transformer, get_module_execution_device(transformer), check_calls)
    pipe._fastusp_parallelized = True
    return pipe


def _spec_for(transformer) -> ModelSpec:
    specs = _model_specs()
    spec = specs.get(type(transformer))
    if spec is None:
        names = ", ".join(cls.__name__ for cls in specs)
        raise ValueError(f"fastusp supports {names} (or a pipeline holding one), got {type(transformer).__name__}")
    if getattr(transformer, "_fastusp_config", None) is not None:
        raise ValueError("this transformer is already parallelized by fastusp")
    if getattr(transformer, "_fastusp_compile_report", None) is not None:
        raise ValueError("call fastusp.parallelize before fastusp.compile_pipeline, not after")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError("this transformer already uses diffusers' context parallelism; use one or the other")
    check_processors(transformer, spec)
    return spec


def check_processors(model, spec: ModelSpec) -> None:
    supported = {*spec.processors, *(spec.adapter_processors or {})}
    others = {type(p).__name__ for p in model.attn_processors.values()} - supported
    if others:
        raise NotImplementedError(f"attention processors {sorted(others)} are not supported; fastusp replaces "
                                  f"diffusers' {', '.join(sorted(supported))}")


def usp_processors(model, spec: ModelSpec, context: USPContext) -> dict:
    """fastusp's processor for each of the model's attention layers (layer name -> processor)."""
    shared = {kind: cls(context) for kind, cls in spec.processors.items()}
    adapters = spec.adapter_processors or {}
    processors = {}
    for name, processor in model.attn_processors.items():
        kind = type(processor).__name__
        processors[name] = adapters[kind](processor, context) if kind in adapters else shared[kind]
    return processors


def apply_usp_processors(transformer, spec: ModelSpec, context: USPContext) -> None:
    """Every attention layer gets fastusp's processor; a layer with an adapter's processor (FLUX IP-Adapter) gets
    fastusp's version of it, which keeps the adapter's weights."""
    transformer.set_attn_processor(usp_processors(transformer, spec, context))


def _shard_residual(residual: torch.Tensor, layout: SeqLayout, rank: int, dim: int) -> torch.Tensor:
    """A ControlNet residual: full length from a ControlNet that ran whole, this rank's rows from a sharded one."""
    length = residual.shape[dim]
    if length == sum(layout.image):
        return _shard(residual, layout.image_slice(rank), dim)
    if length == layout.image[rank]:
        return residual
    raise ValueError(f"a ControlNet residual has {length} image tokens; expected all {sum(layout.image)} or this "
                     f"rank's {layout.image[rank]}")


def _refuse_processor_changes(transformer) -> None:
    """A processor set after parallelize (set_attn_processor, diffusers' unload_ip_adapter) would run diffusers'
    attention on this rank's tokens alone: refuse it rather than return a silently wrong image."""
    def set_attn_processor(processor):
        raise ValueError("this transformer is parallelized by fastusp: set attention processors, and load or unload "
                         "adapters that change them (IP-Adapter), before fastusp.parallelize")

    transformer.set_attn_processor = set_attn_processor


def _shard(value, index: slice, dim: int):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(_shard(v, index, dim) for v in value)
    return value.narrow(dim, index.start, index.stop - index.start)


def apply_sequence_sharding(transformer, spec: ModelSpec, context: USPContext) -> None:
    """Wrap forward so it takes full inputs, runs on this rank's tokens and returns the full output."""
    config = context.config
    ranks, rank = config.sequence_size, config.sequence_rank
    if spec.joint_sequence:
        _shard_joint_sequence(transformer, context, ranks, rank)
        reuse_joint_layout(transformer)
        return
    if spec.rope_from_shapes:
        _shard_qwen_rope(transformer.pos_embed, context, rank)
    for flag, inputs in (spec.block_image_inputs or {}).items():
        if getattr(transformer.config, flag, False):
            _shard_block_image_inputs(transformer, inputs, context, rank)

    cache_group = config.shared_sequence_group  # diffusers' caches decide over it (caches.py)

    def run_sharded(original, inputs):
        for name, purpose in (spec.refused_inputs or {}).items():
            if inputs.get(name) is not None:
                raise NotImplementedError(f"{name}: {purpose} is not supported by fastusp")
        if cache_group is not None:
            share_cache_decisions(transformer, cache_group)
        with context.forward_with(shard_inputs(inputs, spec, ranks, rank)) as layout:
            sample = original(**inputs, return_dict=False)[0]
        return gather_seq(sample, list(layout.image), config.sequence_group, dim=1)

    wrap_forward(transformer, run_sharded)


def _shard_joint_sequence(transformer, context: USPContext, ranks: int, rank: int) -> None:
    """Qwen-Image 2.1 builds its joint sequence inside the forward (text and condition-image tokens interleaved, the
    target image's last; with a KV cache after the first step, the target image's alone). The first block gets this
    rank's rows of it, every block this rank's rows of the per-token inputs (RoPE, which tokens modulate as the
    target), and the last block's output is gathered: the forward's tail (norm_out, proj_out) runs on the whole
    sequence, as on one device. The segments and key mask that the processors read stay global."""
    config, blocks = context.config, transformer.transformer_blocks

    def enter(block, args, kwargs):
        if block is blocks[0]:
            hidden = kwargs["hidden_states"]
            if hidden.shape[1] < ranks:
                raise ValueError(f"{hidden.shape[1]} tokens cannot be split over {ranks} ranks; use a larger image")
            context.layout = SeqLayout.even(0, hidden.shape[1], ranks)
            kwargs["hidden_states"] = _shard(hidden, context.layout.image_slice(rank), 1)
        rows = context.current_layout().image_slice(rank)
        for name in ("rotary_emb", "target_token_mask"):
            kwargs[name] = _shard(kwargs.get(name), rows, 0)
        return args, kwargs

    def leave(block, args, kwargs, output):
        return gather_seq(output, list(context.current_layout().image), config.sequence_group, dim=1)

    for block in blocks:
        block.register_forward_pre_hook(enter, with_kwargs=True)
    blocks[-1].register_forward_hook(leave, with_kwargs=True)

    def run_sharded(original, inputs):
        if getattr(transformer, "_cache_config", None) is not None:
            raise NotImplementedError(f"diffusers' caches are not supported on a parallelized "
                                      f"{type(transformer).__name__}")
        try:
            return original(**inputs, return_dict=False)[0]
        finally:
            context.layout = None

    wrap_forward(transformer, run_sharded)


def shard_inputs(inputs: dict, spec: ModelSpec, ranks: int, rank: int) -> SeqLayout:
    """Cut a forward's bound inputs to this rank's tokens, in place; returns the layout (with the key bias of a
    text mask, which replaces the mask). Used for the transformer and for its ControlNets."""
    layout = _layout_for(inputs, spec, ranks)
    if spec.text_mask in inputs:  # now carried by layout.key_bias; diffusers' own mask code is not needed
        inputs[spec.text_mask] = None
    for name, dim in spec.text_inputs.items():
        if name in inputs:
            inputs[name] = _shard(inputs[name], layout.text_slice(rank), dim)
    for name, dim in spec.image_inputs.items():
        if name in inputs:
            inputs[name] = _shard(inputs[name], layout.image_slice(rank), dim)
    for name, dim in spec.residual_inputs.items():
        if inputs.get(name) is not None:
            inputs[name] = [_shard_residual(r, layout, rank, dim) for r in inputs[name]]
    return layout


def _layout_for(inputs: dict, spec: ModelSpec, ranks: int) -> SeqLayout:
    """ranks: the sequence group's size (the ranks that share this sequence)."""
    image_len = inputs["hidden_states"].shape[1]
    text = inputs.get("encoder_hidden_states")
    text_len = 0 if text is None else text.shape[1]
    if image_len < ranks:
        raise ValueError(f"{image_len} image tokens cannot be split over {ranks} ranks; use a larger image")
    layout = SeqLayout.even(text_len, image_len, ranks)
    mask = inputs.get(spec.text_mask) if spec.text_mask else None
    # A given mask is always applied, as the single-device model does. Checking for an all-ones mask here would
    # cost a host sync every step (and break CUDA graph capture); the Qwen-Image pipeline drops such masks itself.
    if mask is not None:
        layout = layout.with_text_mask(mask, inputs["hidden_states"].dtype)
    return layout


def _shard_block_image_inputs(transformer, inputs: dict[str, int], context: USPContext, rank: int) -> None:
    """Every block is handed the full-length tensor and narrows it to this rank's image tokens on the way in."""
    def narrow(block, args, kwargs):
        layout = context.current_layout()
        for name, dim in inputs.items():
            if kwargs.get(name) is not None:
                kwargs[name] = _shard(kwargs[name], layout.image_slice(rank), dim)
        return args, kwargs

    for block in transformer.transformer_blocks:
        block.register_forward_pre_hook(narrow, with_kwargs=True)


def _shard_qwen_rope(pos_embed, context: USPContext, rank: int) -> None:
    """Qwen-Image builds RoPE tables from shapes, not ids: build the full tables, keep this rank's rows. The same for
    Qwen-Image-Layered's tables (QwenEmbedLayer3DRope: one position on a layer axis per image, the input image at -1),
    which come in the same order as the image tokens."""
    original = forward_of(pos_embed)

    @functools.wraps(original)
    def forward(video_fhw, device=None, max_txt_seq_len=None):
        layout = context.current_layout()
        image_freqs, text_freqs = original(video_fhw, device=device, max_txt_seq_len=sum(layout.text))
        return image_freqs[layout.image_slice(rank)], text_freqs[layout.text_slice(rank)]

    set_forward(pos_embed, forward)


def apply_rank_consistency(pipe) -> None:
    """Every rank must denoise the same latents: broadcast rank 0's initial noise; show progress on rank 0 only.

    Without this a pipeline called without a generator (or with per-rank seeds) would feed each rank different
    noise, and the gathered outputs would silently mix into garbage.
    """
    if dist.get_rank() != 0:  # merged, so settings the user gave (desc, ...) survive
        pipe.set_progress_bar_config(**{**getattr(pipe, "_progress_bar_config", {}), "disable": True})
    original = pipe.prepare_latents

    @functools.wraps(original)
    def prepare_latents(*args, **kwargs):
        out = original(*args, **kwargs)
        synced = tuple(_broadcast_copy(t) for t in (out if isinstance(out, tuple) else (out,)))
        return synced if isinstance(out, tuple) else synced[0]

    pipe.prepare_latents = prepare_latents


def _broadcast_copy(value):
    # A copy: prepare_latents may return the caller's own `latents` tensor, which must not change under them
    # (and NCCL needs a contiguous buffer).
    if not isinstance(value, torch.Tensor):
        return value
    value = value.clone(memory_format=torch.contiguous_format)
    dist.broadcast(value, src=0)
    return value
