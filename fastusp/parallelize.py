"""parallelize(): patch a diffusers FLUX / FLUX.2 / Qwen-Image (2.1) transformer (or the pipeline holding it) for USP.

After it the transformer takes the same full inputs on every rank and returns the full output on every rank:
  apply_usp_processors      swap each attention processor for the fastusp one (diffusers' math, USP attention)
  apply_sequence_sharding   wrap forward: cut inputs along the sequence, run diffusers' forward, gather the output
                            (or the model's own sharding: ModelSpec.shard_sequence)
  apply_shared_modulation   each rank computes the AdaLN modulation of some blocks, one all-gather shares it
  apply_controlnet_sharding pipelines with a ControlNet: it is sharded too, its residuals stay sharded
  apply_rank_consistency    pipelines only: same initial noise on every rank, progress bar on rank 0
  apply_cfg_parallel        pipelines with cfg=2 only: each half of the ranks runs one guidance pass of a step
  apply_pipeline_parts      pipelines only: the VAE decodes / encodes in row bands over all ranks; optionally the
                            text encoders run on one rank, which broadcasts the embeddings
"""
from __future__ import annotations

import functools
import logging
import math

import torch
import torch.distributed as dist
from diffusers.utils.torch_utils import get_module_execution_device

from ._forward import has_changes, patch_attribute, undo_changes, wrap_forward
from .agreement import apply_call_checks, check_settings_agree
from .caches import share_cache_decisions
from .cfg_parallel import apply_cfg_parallel, track_denoising_loop
from .config import ParallelConfig, as_timeout, check_one_gpu_per_rank, fill_degrees, maybe_init_distributed
from .controlnet import apply_controlnet_sharding, controlnets
from .distributed.gather import gather_seq
from .models import registry
from .models.spec import ModelSpec
from .modulation import apply_shared_modulation
from .pipeline_parts import apply_pipeline_parts, pipeline_options
from .processors.context import USPContext, apply_usp_processors
from .sharding import shard_inputs

logger = logging.getLogger("fastusp")


def parallelize(obj, *, ulysses: int | None = None, ring: int | None = None, cfg: int = 1,
                fp8_comm: bool | str = False, timeout=None, check_calls: bool = True, parallel_vae: bool = True,
                text_encoder_rank: int | None = None, **options):
    """Shard a FLUX / FLUX.2 / Qwen-Image transformer's token sequence across all ranks, in place; returns `obj`.

    obj: a diffusers pipeline with a `transformer`, or a transformer of a class fastusp supports
    (fastusp/models/registry.py: FluxTransformer2DModel, Flux2Transformer2DModel, QwenImageTransformer2DModel,
    QwenImage21Transformer2DModel).
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
    Pipelines only: parallel_vae splits the VAE's decode and encode over all ranks (False: each rank runs it whole);
    text_encoder_rank runs the text encoders on that rank alone and broadcasts the embeddings (docs/vae.md).
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
        return _add_pipeline(obj, transformer, config, check_calls, parallel_vae, text_encoder_rank)
    spec = _spec_for(transformer)
    for model in [transformer, *controlnets(obj)]:
        config.validate_heads(model.config.num_attention_heads)
    # where it computes: under enable_model_cpu_offload the weights wait on the CPU and the offload hook names the GPU
    device = get_module_execution_device(transformer)
    check_one_gpu_per_rank(device)
    maybe_init_distributed(device, timeout)
    config.set_timeout(timeout)  # the default group's, for the check below; the groups built next get it after
    config.validate_world(dist.get_world_size())
    options = pipeline_options(obj, transformer, parallel_vae=parallel_vae, text_encoder_rank=text_encoder_rank)
    check_settings_agree(config, transformer, obj, device, options)  # before the groups: mismatches would hang there
    config.build_mesh(device.type)
    config.set_timeout(timeout)

    context = USPContext(config)
    apply_usp_processors(transformer, spec, context)
    apply_sequence_sharding(transformer, spec, context)
    apply_shared_modulation(transformer, spec.modulated_streams, context)
    if obj is not transformer:
        apply_controlnet_sharding(obj, config, spec)
        apply_rank_consistency(obj)
        apply_pipeline_parts(obj, **options)
        patch_attribute(obj, "_fastusp_parallelized", True)
    if config.cfg > 1:
        apply_cfg_parallel(obj, transformer, config, spec.output_tokens_of)
    apply_call_checks(obj, transformer, device, check_calls)
    patch_attribute(transformer, "_fastusp_config", config)
    patch_attribute(transformer, "_fastusp_context", context)  # compile_pipeline's graphs of all blocks key on it
    if dist.get_rank() == 0:
        logger.info("fastusp: %s parallelized with cfg=%d ulysses=%d ring=%d fp8_comm=%s",
                    type(transformer).__name__, config.cfg, config.ulysses, config.ring, config.fp8_comm)
    return obj


def _add_pipeline(pipe, transformer, config: ParallelConfig, check_calls: bool, parallel_vae: bool,
                  text_encoder_rank: int | None):
    """A pipeline made from a parallelized one (`FluxImg2ImgPipeline.from_pipe(pipe)`) shares its transformer, which
    is parallelized already: give the new pipeline only what is per pipeline (the same noise on every rank, and for
    cfg=2 its denoising loop)."""
    shared = transformer._fastusp_config
    if getattr(pipe, "_fastusp_parallelized", False):
        raise ValueError("this pipeline is already parallelized by fastusp")
    if shared.settings() != config.settings():
        raise ValueError(f"this pipeline's transformer is already parallelized with {shared.settings()}; a pipeline "
                         f"that shares it (from_pipe) must use the same settings, got {config.settings()}")
    device = get_module_execution_device(transformer)
    options = pipeline_options(pipe, transformer, parallel_vae=parallel_vae, text_encoder_rank=text_encoder_rank)
    check_settings_agree(config, transformer, pipe, device, options)
    apply_controlnet_sharding(pipe, shared, registry.spec_for(transformer))  # shared: the built groups
    apply_rank_consistency(pipe)
    apply_pipeline_parts(pipe, **options)
    if config.cfg > 1:
        track_denoising_loop(pipe, transformer)
    apply_call_checks(pipe, transformer, device, check_calls)
    patch_attribute(pipe, "_fastusp_parallelized", True)
    return pipe


def _spec_for(transformer) -> ModelSpec:
    spec = registry.spec_for(transformer)
    if spec is None:
        names = ", ".join(registry.transformer_names())
        raise ValueError(f"fastusp supports {names} (or a pipeline holding one), got {type(transformer).__name__}")
    if getattr(transformer, "_fastusp_config", None) is not None:
        raise ValueError("this transformer is already parallelized by fastusp")
    if getattr(transformer, "_fastusp_compile_report", None) is not None:
        raise ValueError("call fastusp.parallelize before fastusp.compile_pipeline, not after")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError("this transformer already uses diffusers' context parallelism; use one or the other")
    spec.check_processors(transformer)
    return spec


def unparallelize(obj):
    """Undo fastusp.parallelize, in place; returns `obj`: a pipeline or transformer as it was before it, with
    diffusers' processors, forwards and attributes, running on one process's whole sequence again (every rank
    computes the whole output, as without fastusp). torch.distributed and fastusp's process groups stay.

    Pass what was parallelized: the pipeline restores itself and every component it holds (the transformer, its
    ControlNets, its scheduler); a transformer restores only itself. A pipeline made with from_pipe from a
    parallelized one shares its transformer: unparallelize each. A pipeline or transformer compiled with
    compile_pipeline cannot be restored (its compiled code and CUDA graphs hold the parallel forward): make it again.
    """
    transformer = getattr(obj, "transformer", obj)
    if getattr(transformer, "_fastusp_compile_report", None) is not None:
        raise ValueError("fastusp.unparallelize cannot restore a pipeline or transformer compiled with "
                         "fastusp.compile_pipeline (its compiled code and CUDA graphs hold the parallel forward); "
                         "load it again instead")
    owners = [obj, *_components(obj)]
    if not any(has_changes(owner) for owner in owners):
        raise ValueError(f"this {type(obj).__name__} is not parallelized by fastusp")
    undo_changes(owners)
    return obj


def _components(obj) -> list:
    """Everything fastusp may have changed for obj: its modules' submodules (obj's own, or those of a pipeline's
    components) and a pipeline's other components (the scheduler)."""
    if isinstance(obj, torch.nn.Module):
        return list(obj.modules())
    found = []
    for component in getattr(obj, "components", {}).values():
        found += list(component.modules()) if isinstance(component, torch.nn.Module) else [component]
    return [c for c in found if c is not None and hasattr(c, "__dict__")]


def apply_sequence_sharding(transformer, spec: ModelSpec, context: USPContext) -> None:
    """Wrap forward so it takes full inputs, runs on this rank's tokens and returns the full output."""
    if spec.shard_sequence is not None:  # the model cuts its own sequence
        spec.shard_sequence(transformer, context)
        return
    if spec.shard_internals is not None:
        spec.shard_internals(transformer, context)
    config = context.config
    ranks, rank = config.sequence_size, config.sequence_rank

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


def apply_rank_consistency(pipe) -> None:
    """Every rank must denoise the same latents: broadcast rank 0's initial noise; show progress on rank 0 only.

    Without this a pipeline called without a generator (or with per-rank seeds) would feed each rank different
    noise, and the gathered outputs would silently mix into garbage.
    """
    if dist.get_rank() != 0:  # merged, so settings the user gave (desc, ...) survive
        patch_attribute(pipe, "_progress_bar_config", {**getattr(pipe, "_progress_bar_config", {}), "disable": True})
    original = pipe.prepare_latents

    @functools.wraps(original)
    def prepare_latents(*args, **kwargs):
        out = original(*args, **kwargs)
        synced = tuple(_broadcast_copy(t) for t in (out if isinstance(out, tuple) else (out,)))
        return synced if isinstance(out, tuple) else synced[0]

    patch_attribute(pipe, "prepare_latents", prepare_latents)


def _broadcast_copy(value):
    # A copy: prepare_latents may return the caller's own `latents` tensor, which must not change under them
    # (and NCCL needs a contiguous buffer).
    if not isinstance(value, torch.Tensor):
        return value
    value = value.clone(memory_format=torch.contiguous_format)
    dist.broadcast(value, src=0)
    return value
