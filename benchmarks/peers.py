"""The peers a user would pick instead of fastusp, each in its own recommended configuration, for step_latency.py.

`step_latency.py --impl cache-dit | xdit` builds the same full-size random-weight transformer as for every other impl
(FLUX.1 or Qwen-Image, 1024², bf16) and hands it to the peer's function here, which applies the peer's own parallel API
to it as the peer documents it. `--compile 1` (compile mode "auto", recorded as "peer") then takes the peer's own
compile path. Records carry `peer` and `peer_version`; a configuration the peer cannot run leaves a record whose `err`
says why (not installed, not supported by that version, crash).

--impl cache-dit   cache-dit 1.5.x (read from 1.5.3's wheel). --config u<N>r<M>[-async][-fp8][-cudnn]:
                   cache_dit.enable_cache(transformer, cache_config=None, parallelism_config=ParallelismConfig(
                   ulysses_size=N, ring_size=M, ulysses_async=-async, ulysses_float8=-fp8, attention_backend=
                   "_sdpa_cudnn" with -cudnn, else its default "native")). No cache: we compare parallelism, and its
                   parallelism runs without one. -async overlaps the q/k/v projections with their all-to-alls (its
                   "Async Ulysses"); -fp8 sends q, v and the output as float8 (k stays bf16); both need N > 1. USP
                   (N and M > 1) needs 4 GPUs (cache-dit checks). Compile: what its examples' --compile does
                   (cache_dit._utils.utils.maybe_compile_transformer): cache_dit.set_compile_configs() (coordinate
                   descent tuning included, so it compiles for longer), float32 matmul precision "high", then
                   compile_repeated_blocks(fullgraph=False, dynamic=False).
                   Its recommendation (docs/user_guide/CONTEXT_PARALLEL.md, docs/benchmark/NVIDIA_GPU.md on H100):
                   Ulysses + compile; on its L20s Ulysses-4 beat USP 2x2 and Ring-4 (FLUX.1, 4 GPUs), and compiled
                   async / FP8 Ulysses were 2% / 5% faster than plain Ulysses on 2. flash-attn 3 (its "_flash_3")
                   has no wheel for the device.
--impl xdit        xfuser 0.7.0. --config [cfg2]u<N>r<M>[-fp8]: what xfuser's model runner (xfuser/runner.py,
                   runner_models/flux.py, qwen.py) does for FLUX.1-dev / Qwen-Image, on the built transformer: its
                   xFuserArgs and its own validation (the runner class's __init__), create_config(),
                   initialize_runtime_state() around a diffusers pipeline shell, set_input_parameters(), and the
                   runner's transformer class (xFuserFlux1Transformer2DWrapper / xFuserQwenImageTransformerWrapper:
                   the diffusers model with xDiT's USP attention processor, sharding the inputs and gathering the
                   output) put on the built model. Attention: xDiT's default (cuDNN SDPA when flash-attn 3/4 is
                   missing). Compile: the runner's (_compile_model): compute/communication overlap on, then
                   torch.compile(transformer, mode=the runner's _get_compile_mode()): "reduce-overhead" (CUDA
                   graphs) for FLUX.1, "default" for Qwen-Image.
                   xfuser 0.7.0 refuses, and the record says so: cfg2 (FLUX.1-dev has no CFG; the Qwen-Image runner
                   does not declare use_cfg_parallel) and -fp8 (use_fp8_comms needs an AITER FP8 attention backend,
                   ROCm only). Its published numbers (docs/performance/flux.md, 4xH100, FLUX.1-dev 28 steps compiled,
                   end to end): Ring-2 2.60 s and Ulysses-2 2.68 s on 2 GPUs, Ulysses-4 1.63 s on 4.

Against one GPU: every multi-process run without --true-cfg, --controlnet or --kv-cache (peers, fastusp and diffusers
alike) first computes the eager one-GPU output of the unparallelized model on the same inputs, and records the
timed output's relative L2 error against it (`one_gpu_rel_err`) and whether it is within ONE_GPU_TOL
(`matches_one_gpu`; FP8 communication gets the looser tolerance). Compiling alone moves a full-size random-weight
model's bf16 output about 2% from eager (benchmarks/results/2026-12-07-1xH100-shared-modulation.md), hence 5%; compare a
peer's error with fastusp's and diffusers' in the same call rather than read the tolerance as tight.

Wheels for the device (it has torch 2.11, transformers with PyYAML and packaging, accelerate, sentencepiece, numpy,
torchvision with Pillow, triton; no diffusers). All five are pure Python (py3-none-any), so the cp312 manylinux x86_64
machine takes them as they are. One command puts them in .whl/ beside diffusers' wheel (yunchang-0.6.4 is the one
--impl yunchang already uses: the same file again):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl cache-dit==1.5.3 xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0 \
        einops==0.8.2

cache-dit needs cache_dit + einops (its "parallelism" extra; PyYAML and packaging are on the image); xfuser needs
xfuser + yunchang + distvae + einops (its other requirements are on the image or imported only where used: av for
video, beautifulsoup4 for Sana's prompt cleaning, flash-attn optional). Keep one version of each in .whl/.

Checked on CPU only (tiny models, gloo, float32; nothing timed): cache-dit u2r1 and u2r1-async, eager and through
its compile path, give the one-process output; its Ring and FP8 paths need CUDA kernels. xDiT's path gives the
one-process output for FLUX and Qwen-Image u2r1 once xfuser is told it has an accelerator and yunchang (it checks both
at import); on GPU its default cuDNN attention also takes the Ring. To rerun those tests here: pip install --no-deps
--target /tmp/peersite the five wheels and triton==3.6.0, then PYTHONPATH=/tmp/peersite python -m pytest
tests/test_benchmarks.py -k "peer or cache_dit or xdit".

Commands for a multi-GPU session: one device call each, with `.whl` carried, on the kind named (the card is in
every record). Each call starts with its own one-GPU compiled baseline, so every ratio comes from one machine and one
call. A call's budget (run_gpu.sh BUDGET_S, 560 s) holds about seven compiled runs (40-60 s each for fastusp and
diffusers, more for the peers: cache-dit tunes its kernels, xDiT compiles the whole model); the runs are in order of
need, and any that do not fit are listed as skipped. 1 GPU is the first run of each call.

  nvidia-h100-x2, FLUX then Qwen-Image (two calls):
    BENCH_ARGS="--steps 20 --warmup 3" bash benchmarks/run_gpu.sh flux 1:single:-:1 2:diffusers:ulysses2:1 \
      2:fastusp:u2r1:1 2:cache-dit:u2r1:1 2:xdit:u2r1:1 2:cache-dit:u2r1-async:1 2:xdit:u1r2:1
    (the same with qwen in place of flux)
  nvidia-h100-x4, FLUX then Qwen-Image (two calls; diffusers' best compiled 4-GPU step was Ring-4 with cuDNN):
    BENCH_ARGS="--steps 20 --warmup 3" bash benchmarks/run_gpu.sh flux 1:single:-:1 \
      4:diffusers:ring4:1:--backend,_native_cudnn 4:fastusp:u4r1:1 4:cache-dit:u4r1:1 4:xdit:u4r1:1 \
      4:diffusers:ulysses4:1 4:cache-dit:u4r1-async:1 4:xdit:u2r2:1
    (the same with qwen in place of flux)
  Shared modulation A/B (benchmarks/results/2026-12-07-1xH100-shared-modulation.md), one call per GPU count (shown
  for 2; for 4: 4:fastusp:u4r1:1 and --nproc-per-node 4), as built, then without it, then the GPU parity worker:
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      BENCH_ARGS="--steps 20 --warmup 3"
    BUDGET_S=200 bash benchmarks/run_gpu.sh flux 2:fastusp:u2r1:1 qwen 2:fastusp:u2r1:1
    cp fastusp/modulation.py /tmp/modulation.py
    sed -i 's/    if not streams or context.config.sequence_size == 1:/    if True:/' fastusp/modulation.py
    OUT=$OUT/before BUDGET_S=200 bash benchmarks/run_gpu.sh flux 2:fastusp:u2r1:1 qwen 2:fastusp:u2r1:1
    cp /tmp/modulation.py fastusp/modulation.py
    PYTHONPATH=/tmp/site:$PWD:$PWD/tests timeout 150 python3 -m torch.distributed.run --standalone \
      --nproc-per-node 2 tests/gpu/parity_worker.py --only main,lora,qwen-variants --models flux,qwen \
      > $OUT/parity.jsonl
  FP8 communication, fastusp's and cache-dit's, against their bf16 runs (one call per GPU count):
    BENCH_ARGS="--steps 20 --warmup 3" bash benchmarks/run_gpu.sh flux 2:fastusp:u2r1:1 2:fastusp:u2r1-fp8:1 \
      2:cache-dit:u2r1:1 2:cache-dit:u2r1-fp8:1 qwen 2:fastusp:u2r1:1 2:fastusp:u2r1-fp8:1 2:cache-dit:u2r1-fp8:1
  8 GPUs, if lent: the 4-GPU lines with 8 (u8r1, ulysses8, ring8, u4r2).
  Then `python3 benchmarks/report.py $OUT/results.jsonl` for the tables.
"""
from __future__ import annotations

import importlib.metadata
import re

import torch

PEERS = ("cache-dit", "xdit")
DISTRIBUTIONS = {"cache-dit": "cache-dit", "xdit": "xfuser"}  # the pip name whose version goes in the record
WHEELS = {"cache-dit": "cache_dit-1.5.3 and einops", "xdit": "xfuser-0.7.0, yunchang-0.6.4, distvae-0.1.0 and einops"}
XDIT_RUNNERS = {"flux": "FLUX.1-dev", "qwen-image": "Qwen-Image"}  # xfuser's MODEL_REGISTRY names
ONE_GPU_TOL = {"bf16": 0.05, "fp8": 0.1}  # relative L2 error of the timed output against the eager one-GPU output


# --- command line and records -------------------------------------------------------------------------------------

def check_args(a) -> str | None:
    """Why step_latency's parsed arguments `a` cannot run a peer (None if they can): the peers take one forward of the
    plain FLUX.1 or Qwen-Image transformer."""
    if a.model not in XDIT_RUNNERS:
        return f"--impl {a.impl}: --model flux or qwen (the peers' FLUX.1 / Qwen-Image support is what is compared)"
    if a.true_cfg or a.controlnet or a.edit_2511 or a.first_block_cache is not None:
        return f"--impl {a.impl}: one transformer forward, without --true-cfg, --controlnet, --edit-2511 or caches"
    return None


def peer_record(impl: str) -> dict:
    """`peer` and `peer_version` (None when not installed) for a peer's record; {} for other impls. Never raises."""
    if impl not in PEERS:
        return {}
    try:
        version = importlib.metadata.version(DISTRIBUTIONS[impl])
    except importlib.metadata.PackageNotFoundError:
        version = None
    return dict(peer=impl, peer_version=version)


def parse_cache_dit_config(text: str) -> dict:
    """'u2r1[-async][-fp8][-cudnn]' -> ParallelismConfig kwargs."""
    m = re.fullmatch(r"u(\d+)r(\d+)((?:-(?:async|fp8|cudnn))*)", text)
    if not m:
        raise ValueError(f"cache-dit config {text!r}: expected u<N>r<M>, optionally -async, -fp8, -cudnn")
    ulysses, ring, flags = int(m.group(1)), int(m.group(2)), m.group(3).split("-")[1:]
    if ("async" in flags or "fp8" in flags) and ulysses < 2:
        raise ValueError(f"cache-dit config {text!r}: -async and -fp8 are Ulysses options, they need u2 or more")
    return dict(ulysses_size=ulysses if ulysses > 1 else None, ring_size=ring if ring > 1 else None,
                ulysses_async="async" in flags, ulysses_float8="fp8" in flags,
                attention_backend="_sdpa_cudnn" if "cudnn" in flags else None)


def parse_xdit_config(text: str) -> dict:
    """'[cfg2]u2r1[-fp8]' -> xFuserArgs kwargs."""
    m = re.fullmatch(r"(cfg2)?u(\d+)r(\d+)(-fp8)?", text)
    if not m:
        raise ValueError(f"xdit config {text!r}: expected [cfg2]u<N>r<M>, optionally -fp8")
    return dict(use_cfg_parallel=bool(m.group(1)), ulysses_degree=int(m.group(2)), ring_degree=int(m.group(3)),
                use_fp8_comms=bool(m.group(4)))


def degrees(impl: str, config: str) -> int:
    """How many processes a peer's config runs on."""
    if impl == "cache-dit":
        kw = parse_cache_dit_config(config)
        return (kw["ulysses_size"] or 1) * (kw["ring_size"] or 1)
    kw = parse_xdit_config(config)
    return (2 if kw["use_cfg_parallel"] else 1) * kw["ulysses_degree"] * kw["ring_degree"]


def import_peer(impl: str, module: str):
    """The peer's module; a missing package raises with the wheels to carry."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as ex:
        raise ModuleNotFoundError(f"--impl {impl}: {ex} (not installed: carry {WHEELS[impl]} in .whl/, "
                                  f"see benchmarks/peers.py)") from ex


def check_world(impl: str, config: str, world: int) -> None:
    if degrees(impl, config) != world:
        raise ValueError(f"{impl} config {config}: {degrees(impl, config)} processes, but the world is {world}")


# --- cache-dit ----------------------------------------------------------------------------------------------------

def apply_cache_dit(target, a, world):
    """cache-dit's context parallelism on the transformer, in place, as its docs call it (no cache)."""
    model = getattr(target, "transformer", target)
    check_world("cache-dit", a.config, world)
    cache_dit = import_peer("cache-dit", "cache_dit")
    config = cache_dit.ParallelismConfig(**parse_cache_dit_config(a.config))
    parallel = cache_dit.enable_cache(model, cache_config=None, parallelism_config=config)
    if parallel is not model:  # step_latency times the object it built; cache-dit 1.5.3 parallelizes in place
        raise RuntimeError("cache_dit.enable_cache returned a new module instead of changing the transformer in place")


def compile_cache_dit(model):
    """What cache-dit's examples do for --compile (maybe_compile_transformer, regional by default)."""
    import cache_dit

    cache_dit.set_compile_configs()
    torch.set_float32_matmul_precision("high")
    model.compile_repeated_blocks(fullgraph=False, dynamic=False)
    return model


# --- xDiT ---------------------------------------------------------------------------------------------------------

def apply_xdit(target, a, world):
    """xfuser's runner for FLUX.1-dev / Qwen-Image, applied to the built transformer in place."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline

    model = getattr(target, "transformer", target)
    kw = parse_xdit_config(a.config)
    check_world("xdit", a.config, world)
    import_peer("xdit", "xfuser")
    from xfuser import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, init_distributed_environment, initialize_runtime_state
    from xfuser.core.distributed.fp8_comms import register_fp8_comms_eligible_modules
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    init_distributed_environment()  # step_latency's process group is up: this only adds xfuser's world group
    args = xFuserArgs(model=XDIT_RUNNERS[a.model], height=a.height, width=a.width, max_sequence_length=a.txt,
                      use_torch_compile=bool(a.compile), **kw)
    engine_config, _ = args.create_config()  # then the runner's own checks, in xFuserModelRunner's order
    runner = MODEL_REGISTRY[args.model](args)  # "... does not support use_cfg_parallel", fp8 comms' backend
    scheduler = FlowMatchEulerDiscreteScheduler()
    if a.model == "flux":  # a pipeline shell around the model: the runtime state reads its config from it
        from xfuser.model_executor.models.transformers.transformer_flux import (
            flux_attn_modules, xFuserFlux1Transformer2DWrapper as wrapper, xFuserFluxAttnProcessor as processor)
        pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
        attention = flux_attn_modules
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    else:
        from xfuser.model_executor.models.transformers.transformer_qwen import (
            xFuserQwenDoubleStreamAttnProcessor as processor, xFuserQwenImageTransformerWrapper as wrapper)
        pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=model)
        attention = lambda m: [block.attn for block in m.transformer_blocks]  # noqa: E731
        blocks = list(model.transformer_blocks)
    initialize_runtime_state(pipe, engine_config)
    # the FLUX runner's call before each pipeline run (the Qwen-Image runner makes none; its transformer reads none)
    get_runtime_state().set_input_parameters(height=a.height, width=a.width, batch_size=1,
                                             max_condition_sequence_length=a.txt, split_text_embed_in_sp=True)
    # what the runner's transformer class adds to the diffusers model in its __init__: its class (the forward that
    # shards the inputs and gathers the output), xDiT's attention processor, the FP8-communication registration
    model.__class__ = wrapper
    for block in blocks:
        block.attn.processor = processor()
    register_fp8_comms_eligible_modules(model, attention(model))
    model._xdit_runner = runner  # compile_xdit asks it for its compile mode


def compile_xdit(model):
    """The runner's _compile_model: compute/communication overlap, then torch.compile of the whole transformer."""
    runner = model._xdit_runner
    runner._enable_compute_comm_overlap()
    return torch.compile(model, mode=runner._get_compile_mode(), dynamic=runner._get_compile_dynamic())


APPLY = {"cache-dit": apply_cache_dit, "xdit": apply_xdit}
COMPILE = {"cache-dit": compile_cache_dit, "xdit": compile_xdit}


def compile_peer(model, a):
    """The peer's own compile path (step_latency's compile mode "peer"); returns the callable to time."""
    return COMPILE[a.impl](model)


# --- the check against one GPU ------------------------------------------------------------------------------------

def wants_one_gpu_check(a, world: int) -> bool:
    """A multi-process run of one plain forward: its output can be set against one process's."""
    return world > 1 and not (a.true_cfg or a.controlnet or a.kv_cache)


@torch.no_grad()  # not inference_mode: what the model caches in this call must stay usable by any later mode
def one_gpu_output(model, kw: dict) -> torch.Tensor:
    """The eager output of the model as built, before any impl changes it: what one GPU computes."""
    return model(**kw)[0].float()


def one_gpu_check(out: torch.Tensor, reference: torch.Tensor, a) -> dict:
    """`one_gpu_rel_err` (relative L2) of the timed output against the one-GPU output, and `matches_one_gpu`."""
    if out.shape != reference.shape:
        return dict(one_gpu_rel_err=None, matches_one_gpu=False,
                    one_gpu_note=f"output shape {tuple(out.shape)}, one GPU {tuple(reference.shape)}")
    err = ((out.float() - reference).norm() / reference.norm()).item()
    tol = ONE_GPU_TOL["fp8" if "fp8" in a.config else "bf16"]
    return dict(one_gpu_rel_err=float(f"{err:.3g}"), matches_one_gpu=err <= tol)  # 3 digits: fp32 errors are ~1e-8
