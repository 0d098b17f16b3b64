"""Per-step latency of one transformer forward: one GPU vs diffusers' context parallel vs fastusp.

The model is diffusers' own FLUX / FLUX.2 / Qwen-Image transformer at full size with random bf16 weights (built on
the meta device, filled on the GPU), so no checkpoint is needed. Every run prints one JSON record on rank 0, also
when it fails (`err` is then set), and appends it to $OUT/results.jsonl when $OUT is set.

    torchrun --nproc-per-node 2 benchmarks/step_latency.py --model flux --impl fastusp --config u2r1 --compile 1
    torchrun --nproc-per-node 2 benchmarks/step_latency.py --model qwen --impl diffusers --config ulysses2 \
        --backend _native_cudnn
    python benchmarks/step_latency.py --model flux --impl single --compile 1 --compile-mode whole
    torchrun --nproc-per-node 2 benchmarks/step_latency.py --tiny --model flux --impl single   # CPU smoke test

--impl single     world 1; --config is ignored ("-").
--impl diffusers  ContextParallelConfig from --config: ulysses2 | ring2 | ulysses2xring2; --backend picks the
                  attention backend (native | _native_cudnn | _native_flash ...).
--impl fastusp    fastusp.parallelize(model, ulysses=U, ring=R, fp8_comm=...) from --config: u2r1 | u1r2 |
                  u2r2 | u2r1-fp8 | u2r1-fp8all, optionally -c<N> (ulysses_chunks), optionally prefixed by
                  cfg2 (CFG parallelism, with --true-cfg: cfg2u1r1); compiled with fastusp.compile_pipeline.
--impl yunchang   yunchang's LongContextAttention as the attention inside fastusp's sequence sharding, --config
                  u<N>r<M> (no mask, even token counts); eager (regional compile needs --fullgraph 0).
--impl cache-dit, --impl xdit   the peers, each applying its own parallel API (and with --compile 1 its own compile
                  path, compile mode "peer") to the same transformer; benchmarks/peers.py lists configs, wheels and
                  commands. Every multi-process run of one forward records its error against the one-GPU output.
--compile 1       --compile-mode auto (default): fastusp -> fastusp.compile_pipeline, others -> regional
                  (diffusers' compile_repeated_blocks(fullgraph=True)); regional | whole (torch.compile(model))
                  force one of those for any impl; graphs: compile_pipeline(backend=None), CUDA graphs of the
                  eager forward without torch.compile (any impl whose forward fastusp can wrap).
--first-block-cache T  diffusers' First Block Cache at threshold T on the transformer (before compiling); every
                  step then reruns the same inputs, so after the first step each one is skipped (T >= 0) or, with
                  T < 0, computed in full (the cache's own cost). Under fastusp's CUDA graphs a skipped step
                  replays the skip graph, a computed one the skip graph and then the compute graph.
--true-cfg S      time a denoising step of diffusers' own pipeline (FluxPipeline / QwenImagePipeline around the
                  same transformer, no VAE or text encoder) with true classifier-free guidance at scale S: two
                  transformer passes per step (random prompt and negative prompt embeds of --txt tokens, no mask).
                  Steps are timed from one pipeline call; its first --warmup steps are the warm-up.
--controlnet D+S  FLUX: every timed step runs a ControlNet of D double and S single blocks first (random weights,
                  random control latents) and feeds its residuals to the transformer. fastusp shards it (a
                  FluxControlNetPipeline shell around both goes to parallelize / compile_pipeline); with
                  --controlnet-whole, and for the other impls, it runs whole on every rank, blocks compiled one by
                  one when --compile 1. InstantX's FLUX Union ControlNet is 5+10.
--model qwen21    Qwen-Image 2.1 (one joint sequence, block-causal; 16x VAE, unpatched latents: 4096 image tokens at
                  1024²). Every step is the prefill (use_kv_cache=False); with --kv-cache, the steps after the
                  first, which decode the image's tokens against the prompt's cached keys and values (the
                  pipeline's default). No diffusers context parallel exists for it: the baseline is one GPU.
--quant fp8       fastusp.quantize(model, "fp8") right after the model is built, for any impl (torchao's float8
                  dynamic activation + float8 weight linears in the blocks; --quant-granularity row | tensor,
                  --quant-keep PATTERN to keep more layers in bf16). The record carries "quant": "fp8" and the
                  quantization's time and peak memory; bf16 runs carry no "quant".
--tiny            CPU + gloo, float32, a one-layer model and a 256x256 image: checks the harness, not speed.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import gzip
import json
import os
import re
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

import peers  # sibling: benchmarks/ is on sys.path
from trace_exposure import chrome_trace, kernel_events, merged_intervals

# Run from a checkout without installing: the repo root goes last, so an installed or PYTHONPATH fastusp wins.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

TINY = dict(num_layers=1, attention_head_dim=16, num_attention_heads=4)
MODEL_NAMES = {"flux": "flux", "flux2": "flux2", "qwen": "qwen-image", "qwen-image": "qwen-image",
               "qwen21": "qwen-image-2.1"}
# FLUX pads T5 to 512 tokens, FLUX.2's pipeline pads its Mistral prompt to 512; Qwen-Image prompts are short
DEFAULT_TXT = {"flux": 512, "flux2": 512, "qwen-image": 128, "qwen-image-2.1": 128}


# --- command line -------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="flux", choices=sorted(MODEL_NAMES))
    ap.add_argument("--impl", default="single", choices=["single", "diffusers", "fastusp", "yunchang", *peers.PEERS])
    ap.add_argument("--config", default="-", help="ulysses2xring2 (diffusers), u2r2[-fp8] (fastusp), - (single)")
    ap.add_argument("--compile", type=int, default=0, choices=[0, 1])
    ap.add_argument("--compile-mode", default="auto",
                    choices=["auto", "regional", "whole", "graphs", "pipeline-nographs"])
    ap.add_argument("--first-block-cache", type=float, default=None, metavar="THRESHOLD")
    ap.add_argument("--fullgraph", type=int, default=1, choices=[0, 1], help="for regional compile")
    ap.add_argument("--backend", default="native", help="diffusers attention backend (single / diffusers)")
    ap.add_argument("--cp-anything", type=int, default=0, choices=[0, 1],
                    help="diffusers ulysses_anything / ring_anything: allow sequences not divisible by the degree")
    ap.add_argument("--inductor-overlap", type=int, default=0, choices=[0, 1],
                    help="torch._inductor.config.reorder_for_compute_comm_overlap (the anchors used 1)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (dotted; VALUE as JSON, else a string) before compiling; "
                         "repeatable. Recorded in the result as `inductor`")
    ap.add_argument("--sm-carveout", type=int, default=0, metavar="SMS",
                    help="leave SMS streaming multiprocessors out of cuBLAS GEMMs (torch._C._set_sm_carveout_"
                         "experimental), so concurrent NCCL kernels get them; recorded in the result")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="FLUX: diffusers' transformer.fuse_qkv_projections() (one GEMM for q|k|v) before anything "
                         "else, for any impl; recorded in the result")
    ap.add_argument("--height", type=int, default=None, help="default 1024 (256 with --tiny)")
    ap.add_argument("--width", type=int, default=None, help="default 1024 (256 with --tiny)")
    ap.add_argument("--txt", type=int, default=None, help="text tokens; default 512 flux, 128 qwen")
    ap.add_argument("--text-mask", default="ones", choices=["ones", "none"],
                    help="Qwen-Image: pass an all-ones text mask (default, as the anchors) or none (as the pipeline "
                         "does for an unpadded prompt); recorded in the result when none")
    ap.add_argument("--true-cfg", type=float, default=0.0, metavar="SCALE",
                    help="time the pipeline's step with true CFG (two passes) at this scale; 0: one forward")
    ap.add_argument("--controlnet", default=None, metavar="DOUBLE+SINGLE",
                    help="FLUX: each step also runs a ControlNet of DOUBLE double and SINGLE single blocks (random "
                         "weights) and feeds its residuals to the transformer; 5+10 is InstantX Union's size")
    ap.add_argument("--controlnet-whole", action="store_true",
                    help="fastusp: run the ControlNet whole on every rank, as fastusp did before it sharded them")
    ap.add_argument("--edit-2511", action="store_true",
                    help="Qwen-Image-Edit-2511: the transformer with zero_cond_t and a reference image of the same "
                         "size after the edited one (twice the image tokens)")
    ap.add_argument("--kv-cache", action="store_true",
                    help="Qwen-Image 2.1: fill the prompt's KV cache once, then time the cached steps")
    ap.add_argument("--quant", default=None, choices=["fp8"],
                    help="fastusp.quantize(model, MODE) after building it (float8 GEMMs; CUDA sm_89+)")
    ap.add_argument("--quant-granularity", default="row", choices=["row", "tensor"])
    ap.add_argument("--quant-keep", action="append", default=None, metavar="PATTERN",
                    help="with --quant: a module-name pattern kept in bf16 (repeatable; replaces the default list)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after timing, profile STEPS steps and print the top kernels and launch counts (stderr)")
    ap.add_argument("--host-profile", type=int, default=0, metavar="STEPS",
                    help="after timing, run STEPS steps under cProfile on rank 0 and append the Python functions with "
                         "the most host time to $OUT/host-profile.txt (eager steps are bound by it)")
    ap.add_argument("--record-failure", default=None, metavar="ERR",
                    help="don't run: emit the record of a run that died without one (used by run_gpu.sh)")
    ap.add_argument("--world", type=int, default=None, help="with --record-failure: the world size of that run")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1:  # warm-up >= 1 keeps compilation out of the timed steps
        ap.error("--steps and --warmup must be >= 1")
    a.model = MODEL_NAMES[a.model]
    if a.fuse_qkv and a.model != "flux":
        ap.error("--fuse-qkv: FLUX only (diffusers' Qwen-Image processor has no fused projections)")
    if a.true_cfg and a.model == "flux2":
        ap.error("--true-cfg: FLUX or Qwen-Image (Flux2Pipeline has no true CFG)")
    if a.true_cfg and (a.profile or a.host_profile or a.compile_mode == "whole"):
        ap.error("--true-cfg times a pipeline call: no --profile, --host-profile or --compile-mode whole")
    if a.controlnet and (a.model != "flux" or a.true_cfg or a.compile_mode == "whole"
                         or not re.fullmatch(r"\d+\+\d+", a.controlnet)):
        ap.error("--controlnet DOUBLE+SINGLE: FLUX only, without --true-cfg or --compile-mode whole")
    if a.model == "qwen-image-2.1" and (a.true_cfg or a.impl in ("diffusers", "yunchang") or a.fuse_qkv):
        ap.error("--model qwen21: --impl single or fastusp, without --true-cfg")
    if (a.quant_keep or a.quant_granularity != "row") and not a.quant:
        ap.error("--quant-keep / --quant-granularity: with --quant")
    if a.kv_cache and a.model != "qwen-image-2.1":
        ap.error("--kv-cache: --model qwen21 only")
    if a.edit_2511 and (a.model != "qwen-image" or a.true_cfg):
        ap.error("--edit-2511: Qwen-Image, without --true-cfg")
    if a.impl in peers.PEERS and peers.check_args(a):
        ap.error(peers.check_args(a))
    if a.controlnet_whole and not (a.controlnet and a.impl == "fastusp"):
        ap.error("--controlnet-whole: with --controlnet and --impl fastusp")
    if a.controlnet and a.impl == "fastusp" and not a.controlnet_whole and a.compile_mode not in ("auto", "graphs"):
        ap.error("--controlnet with fastusp's sharded ControlNet: --compile-mode auto or graphs")
    size = 256 if a.tiny else 1024
    a.height = a.height or size
    a.width = a.width or size
    a.txt = a.txt or DEFAULT_TXT[a.model]
    return a


def parse_diffusers_config(text: str) -> tuple[int, int]:
    """'ulysses2' | 'ring2' | 'ulysses2xring2' -> (ulysses, ring)."""
    m = re.fullmatch(r"(?:ulysses(\d+))?x?(?:ring(\d+))?", text)
    if not m or not text:
        raise ValueError(f"diffusers config {text!r}: expected ulysses<N>, ring<N> or ulysses<N>xring<M>")
    return int(m.group(1) or 1), int(m.group(2) or 1)


def parse_fastusp_config(text: str) -> dict:
    """['cfg2'] 'u2r1' | 'u2r1-fp8' | 'u2r1-fp8all', optionally '-c<N>' (ulysses_chunks) -> parallelize kwargs."""
    m = re.fullmatch(r"(cfg(\d+))?u(\d+)r(\d+)(-fp8(all)?)?(-c(\d+))?", text)
    if not m:
        raise ValueError(f"fastusp config {text!r}: expected [cfg<K>]u<N>r<M>, optionally -fp8 or -fp8all, then -c<N>")
    kw = dict(ulysses=int(m.group(3)), ring=int(m.group(4)), fp8_comm="all" if m.group(6) else bool(m.group(5)))
    if m.group(2):
        kw["cfg"] = int(m.group(2))
    if m.group(8):
        kw["ulysses_chunks"] = int(m.group(8))
    return kw


def in_cache_context(fwd, model):
    """A cache keeps its state per context, which a pipeline names around each transformer call."""
    def call(**kw):
        with model.cache_context("step"):
            return fwd(**kw)
    return call


def resolved_compile_mode(a) -> str | None:
    if not a.compile:
        return None
    if a.compile_mode == "auto":
        return "pipeline" if a.impl == "fastusp" else "peer" if a.impl in peers.PEERS else "regional"
    return a.compile_mode


# --- processes ----------------------------------------------------------------------------------------------------

def process_layout(tiny: bool):
    """(world, rank, device) from the torchrun environment. --tiny always runs on CPU, to test without a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not tiny:
        torch.cuda.set_device(local)
        return world, rank, torch.device("cuda", local)
    return world, rank, torch.device("cpu")


def init_group(world, device, bind_device=True):
    """bind_device=False: no device_id (xfuser's runner starts NCCL so, and warns that its new_group calls fail with
    a bound device)."""
    if world > 1:
        # long timeout: a rank can wait at the first collective while another one is still compiling
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" and bind_device else None,
                                timeout=datetime.timedelta(minutes=30))


def phase(rank, name):
    """Mark progress on stderr: when a run times out, run_gpu.sh reports the last phase rank 0 reached."""
    if rank == 0:
        print(f"STEP_LATENCY_PHASE {name} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- model and inputs (same construction as shared/anchors/dit_anchor.py) -----------------------------------------

def build_model(model_name, device, dtype, tiny=False, zero_cond_t=False):
    """Full-size (or --tiny) transformer with random weights, built on meta and filled in place on `device`.
    zero_cond_t: Qwen-Image-Edit-2511's transformer. flux2: FLUX.2-dev's (diffusers' default config, 32B)."""
    if model_name == "flux":
        from diffusers import FluxTransformer2DModel as Model
        kw = dict(guidance_embeds=True)
        if tiny:
            kw.update(TINY, num_single_layers=1, axes_dims_rope=(4, 6, 6))
    elif model_name == "flux2":
        from diffusers import Flux2Transformer2DModel as Model
        kw = dict(guidance_embeds=True)
        if tiny:
            kw.update(TINY, num_single_layers=1, axes_dims_rope=(4, 4, 4, 4))
    elif model_name == "qwen-image-2.1":
        from diffusers import QwenImage21Transformer2DModel as Model
        kw = dict(TINY, axes_dims_rope=(4, 6, 6)) if tiny else {}
    else:
        from diffusers import QwenImageTransformer2DModel as Model
        kw = dict(zero_cond_t=True) if zero_cond_t else {}
        if tiny:
            kw.update(TINY, axes_dims_rope=(4, 6, 6))
    with torch.device("meta"):
        model = Model(**kw)
    # cast while still on meta, so the device only ever holds the model in `dtype`: materializing in float32
    # first (as shared/anchors did) peaks at 4 bytes/param, 76 GiB for Qwen-Image, the whole of an H100
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device)
    # the RoPE modules keep their frequency tables as plain attributes: rebuild them off meta
    if model_name == "qwen-image":
        model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope),
                                                scale_rope=True)
    if model_name == "qwen-image-2.1":
        model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope))
    return model.eval()


@torch.no_grad()
def fill_random_(model, device):
    # small weights keep activations finite through 57/60 blocks; norms start at 1 like a trained model
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0, 0.02, generator=g)
        elif "norm" in name and "weight" in name:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.01, generator=g)


def quantize_model(model, a, device) -> dict:
    """fastusp.quantize(model, a.quant) in place; returns what it cost: seconds, and on CUDA the memory before and
    at its peak (the bf16 model, then the bf16 model plus at most one layer's float8 copy and temporaries)."""
    import fastusp
    from fastusp.quantization import DEFAULT_KEEP_BF16

    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fastusp.quantize(model, a.quant, granularity=a.quant_granularity,
                     keep_bf16=DEFAULT_KEEP_BF16 if a.quant_keep is None else a.quant_keep)
    sync(device)
    import torchao

    cost = dict(torchao=torchao.__version__, quantize_s=round(time.perf_counter() - t0, 2))
    if device.type == "cuda":
        cost.update(bf16_mem_gb=round(before / 2**30, 2),
                    quantize_peak_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
    return cost


def make_inputs(model_name, device, dtype, height, width, txt_len, text_mask="ones", reference=False):
    """Forward kwargs for one denoising step at height x width (latent /8, packed 2x2) with txt_len text tokens.
    reference (Qwen-Image-Edit): a reference image of the same size, its tokens after the edited image's."""
    g = torch.Generator(device=device).manual_seed(1)
    h, w = height // 16, width // 16
    if model_name == "qwen-image-2.1":  # the prompt, then the image's slots (one per 2x2 latent tokens); no mask
        slots = torch.tensor([[False] * txt_len + [True] * (h * w // 4)], device=device)
        return dict(hidden_states=torch.randn(1, h * w, 64, device=device, dtype=dtype, generator=g),
                    encoder_hidden_states=torch.randn(1, txt_len, 4096, device=device, dtype=dtype, generator=g),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype), img_shapes=[[(1, h, w)]],
                    img_mask=slots, return_dict=False)
    images = 2 if reference else 1
    timestep = torch.tensor([0.5], device=device, dtype=dtype)
    if model_name == "flux2":  # 32 latent channels packed 2x2; batched 4-axis ids (diffusers' context parallel plan
        # splits only 3-d ids), text ids counting along the last axis: as Flux2Pipeline passes them
        arange = lambda n: torch.arange(n, device=device)
        return dict(hidden_states=torch.randn(1, h * w, 128, device=device, dtype=dtype, generator=g),
                    encoder_hidden_states=torch.randn(1, txt_len, 15360, device=device, dtype=dtype, generator=g),
                    timestep=timestep, guidance=torch.tensor([4.0], device=device, dtype=dtype),
                    img_ids=torch.cartesian_prod(arange(1), arange(h), arange(w), arange(1))[None],
                    txt_ids=torch.cartesian_prod(arange(1), arange(1), arange(1), arange(txt_len))[None],
                    return_dict=False)
    hidden = torch.randn(1, images * h * w, 64, device=device, dtype=dtype, generator=g)
    if model_name == "flux":
        img_ids = torch.zeros(h, w, 3, device=device)
        img_ids[..., 1] = torch.arange(h, device=device)[:, None]
        img_ids[..., 2] = torch.arange(w, device=device)[None, :]
        return dict(hidden_states=hidden,
                    encoder_hidden_states=torch.randn(1, txt_len, 4096, device=device, dtype=dtype, generator=g),
                    pooled_projections=torch.randn(1, 768, device=device, dtype=dtype, generator=g),
                    timestep=timestep, guidance=torch.tensor([3.5], device=device, dtype=dtype),
                    img_ids=img_ids.reshape(-1, 3).to(dtype),
                    txt_ids=torch.zeros(txt_len, 3, device=device, dtype=dtype), return_dict=False)
    # text_mask "ones": an all-ones mask, as the anchors pass it (attention then runs with a key bias); "none": what
    # diffusers' QwenImagePipeline passes for an unpadded prompt (it drops an all-ones mask)
    mask = torch.ones(1, txt_len, device=device, dtype=torch.int64) if text_mask == "ones" else None
    return dict(hidden_states=hidden,
                encoder_hidden_states=torch.randn(1, txt_len, 3584, device=device, dtype=dtype, generator=g),
                encoder_hidden_states_mask=mask, timestep=timestep,
                img_shapes=[[(1, h, w)] * images] if reference else [(1, h, w)], return_dict=False)


# --- the implementations compared ---------------------------------------------------------------------------------

# Each takes the model, or with --true-cfg the pipeline around it, and changes it in place.

def apply_single(target, a, world):
    model = getattr(target, "transformer", target)
    if world != 1:
        raise ValueError(f"--impl single runs on one process, got world {world}")
    if a.backend != "native":
        model.set_attention_backend(a.backend)


def apply_diffusers_cp(target, a, world):
    from diffusers import ContextParallelConfig

    model = getattr(target, "transformer", target)
    ulysses, ring = parse_diffusers_config(a.config)
    if ulysses * ring != world:
        raise ValueError(f"config {a.config}: ulysses {ulysses} * ring {ring} != world {world}")
    # the backend must be set before enable_parallelism, which checks it supports context parallel
    if a.backend != "native":
        model.set_attention_backend(a.backend)
    kw = {}
    if a.cp_anything:
        kw = dict(ulysses_anything=True) if ring == 1 else dict(ring_anything=True)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, **kw))


def apply_fastusp(target, a, world):
    import fastusp

    kw = parse_fastusp_config(a.config)
    if kw.get("cfg", 1) * kw["ulysses"] * kw["ring"] != world:
        raise ValueError(f"config {a.config}: cfg x ulysses x ring != world {world}")
    fastusp.parallelize(target, **kw)


def apply_yunchang(target, a, world):
    """yunchang's LongContextAttention (USP) as the attention call, inside fastusp's sequence sharding.

    Inputs are cut and the output gathered by the same code as --impl fastusp, so the two differ only in the
    attention: yunchang's three all-to-alls (q, k, v) and its ring against fastusp's. Config u<N>r<M>. yunchang
    takes no attention mask (Qwen-Image: --text-mask none) and needs the same number of tokens on every rank. Its
    cuDNN kernel returns no log-sum-exp (yunchang fills zeros), which only a ring merge needs: cuDNN for r = 1,
    aten's flash kernel for ring degrees > 1; on CPU its math kernel, r = 1 only.
    """
    import fastusp
    import fastusp.models.flux as flux_processor
    import fastusp.models.qwen_image as qwen_processor
    from yunchang import LongContextAttention, set_seq_parallel_pg
    from yunchang.kernels import AttnType

    kw = parse_fastusp_config(a.config)
    ulysses, ring = kw["ulysses"], kw["ring"]
    if ulysses * ring != world or set(kw) != {"ulysses", "ring", "fp8_comm"} or kw["fp8_comm"]:
        raise ValueError(f"yunchang config {a.config}: expected u<N>r<M> with N * M = world {world}")
    cuda = next(getattr(target, "transformer", target).parameters()).is_cuda
    if not cuda and ring > 1:
        raise ValueError("yunchang on CPU: ring degree 1 only (its math kernel returns no log-sum-exp)")
    kernel = AttnType.TORCH_MATH if not cuda else AttnType.TORCH_CUDNN if ring == 1 else AttnType.TORCH_FLASH
    set_seq_parallel_pg(ulysses, ring, dist.get_rank(), world)
    long_context_attention = LongContextAttention(ring_impl_type="basic", attn_type=kernel)

    def yunchang_attention(q, k, v, layout, config):  # [B, S_local, H, D] in and out, like usp_attention
        if layout.key_bias is not None:
            raise ValueError("yunchang takes no attention mask (Qwen-Image: run with --text-mask none)")
        if len(set(layout.tokens)) != 1:
            raise ValueError(f"yunchang needs the same number of tokens on every rank, got {layout.tokens}")
        return long_context_attention(q, k, v)

    flux_processor.usp_attention = yunchang_attention  # the processors look the name up at call time
    qwen_processor.usp_attention = yunchang_attention
    fastusp.parallelize(target, ulysses=ulysses, ring=ring)


def maybe_compile(model, a):
    """Return the callable to time. Compilation itself happens lazily, during the warm-up calls."""
    mode = resolved_compile_mode(a)
    if mode and a.inductor_overlap:
        import torch._inductor.config as inductor_config
        inductor_config.reorder_for_compute_comm_overlap = True
    for setting in a.inductor:
        set_inductor_config(setting)
    if a.sm_carveout:  # before the first GEMM: compiled code and captured graphs keep the reduced grids
        torch._C._set_sm_carveout_experimental(a.sm_carveout)
    if mode is None:
        return model
    if mode == "peer":
        return peers.compile_peer(model, a)
    if mode in ("pipeline", "graphs", "pipeline-nographs"):  # graphs: CUDA graphs of the eager forward only
        import fastusp
        options = {"graphs": {"backend": None}, "pipeline-nographs": {"cuda_graphs": False}}.get(mode, {})
        return fastusp.compile_pipeline(model, **options) or model
    if mode == "regional":
        model.compile_repeated_blocks(fullgraph=bool(a.fullgraph))  # compiles each block class in place
        return model
    return torch.compile(model)  # whole model: graph breaks allowed (diffusers' CP hooks sit around it)


APPLY = {"single": apply_single, "diffusers": apply_diffusers_cp, "fastusp": apply_fastusp, "yunchang": apply_yunchang,
         **peers.APPLY}


# --- timing -------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def warm_up(fwd, kw, device, calls):
    """First calls to steady state (compilation happens here); returns their wall time in seconds."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fwd(**kw)
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def timed_steps(fwd, kw, device, world, steps):
    """`steps` timed calls, each started together on all ranks; returns the last output and the times in ms."""
    times_ms = []
    for _ in range(steps):
        if world > 1:
            dist.barrier()  # so a step's time is not the wait for a slower rank's previous step
        sync(device)
        t = time.perf_counter()
        out = fwd(**kw)[0]
        sync(device)
        times_ms.append((time.perf_counter() - t) * 1e3)
    return out, times_ms


@torch.inference_mode()
def kv_cached_inputs(fwd, kw, model) -> dict:
    """Qwen-Image 2.1: run the cache's first step ("extract") once; returns the inputs of a cached step."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(len(model.transformer_blocks))
    fwd(**kw, kv_cache=cache, kv_cache_mode="extract")
    return dict(kw, kv_cache=cache, kv_cache_mode="cached")


# --- a step with a ControlNet (--controlnet) --------------------------------------------------------------------

def build_controlnet(model, layers: str, device, dtype):
    """A FLUX ControlNet of the transformer's widths with random weights, built like build_model."""
    from diffusers import FluxControlNetModel

    double, single = map(int, layers.split("+"))
    # without "_use_default_values": from_config drops the keys it lists (here every key, since build_model passes
    # no widths), num_layers included, and the ControlNet would silently get the transformer's 19 + 38 blocks
    config = {k: v for k, v in model.config.items() if k != "_use_default_values"}
    with torch.device("meta"):
        net = FluxControlNetModel.from_config(dict(config, num_layers=double, num_single_layers=single))
    assert (len(net.transformer_blocks), len(net.single_transformer_blocks)) == (double, single)
    net = net.to(dtype).to_empty(device=device)
    fill_random_(net, device)
    return net.eval()


def controlnet_target(model, net, a):
    """What APPLY and compilation get: for fastusp (unless --controlnet-whole) a FluxControlNetPipeline shell around
    both, so parallelize shards the ControlNet and compile_pipeline compiles its blocks; otherwise the transformer,
    and the ControlNet runs whole on every rank (its blocks compiled by compile_controlnet_blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    if a.impl != "fastusp" or a.controlnet_whole:
        return model
    return FluxControlNetPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=model,
                                  controlnet=net)


def compile_controlnet_blocks(net) -> None:
    """The ControlNet's blocks compiled one by one, as diffusers' regional compile does the transformer's."""
    for block in [*net.transformer_blocks, *net.single_transformer_blocks]:
        block.compile(fullgraph=True, dynamic=False)


def controlnet_step(fwd, net, kw, device, dtype):
    """fwd with the ControlNet before it: one denoising step of a ControlNet pipeline (control latents random)."""
    g = torch.Generator(device=device).manual_seed(2)
    cond = torch.randn(kw["hidden_states"].shape, device=device, dtype=dtype, generator=g)
    shared = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
              "guidance")

    def step(**kw):
        double, single = net(controlnet_cond=cond, conditioning_scale=1.0, return_dict=False,
                             **{name: kw[name] for name in shared})
        return fwd(**kw, controlnet_block_samples=double, controlnet_single_block_samples=single)

    return step


# --- a pipeline step with true CFG (--true-cfg) ------------------------------------------------------------------

def build_pipeline(model_name, model):
    """diffusers' own pipeline around `model`, without VAE or text encoders: it runs on given prompt embeds and
    returns latents. Flow-matching scheduler with dynamic shifting, as both pipelines expect."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    if model_name == "flux":
        pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=model)
    else:
        pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_inputs(model, a, device, dtype) -> dict:
    """Pipeline call kwargs: random prompt and negative prompt embeds of a.txt tokens (Qwen-Image: all-ones masks,
    which the pipeline drops, as for an unpadded prompt), true CFG at a.true_cfg, latents only."""
    g = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)
    dim = model.config.joint_attention_dim
    kw = dict(prompt_embeds=rand(1, a.txt, dim), negative_prompt_embeds=rand(1, a.txt, dim), true_cfg_scale=a.true_cfg,
              height=a.height, width=a.width, output_type="latent", generator=torch.Generator().manual_seed(0))
    if a.model == "flux":
        pooled = model.config.pooled_projection_dim
        return dict(kw, pooled_prompt_embeds=rand(1, pooled), negative_pooled_prompt_embeds=rand(1, pooled))
    ones = torch.ones(1, a.txt, dtype=torch.int64, device=device)
    return dict(kw, prompt_embeds_mask=ones, negative_prompt_embeds_mask=ones.clone())


@torch.inference_mode()
def timed_pipeline_call(pipe, kw, device, steps):
    """One pipeline call of `steps` denoising steps, each timed (a step ends at its callback). Returns (the call's
    seconds end to end, what follows the last step included; each step's ms; the call's images)."""
    ends = []

    def on_step_end(p, i, t, callback_kwargs):
        sync(device)
        ends.append(time.perf_counter())
        return {}

    if dist.is_initialized():
        dist.barrier()
    sync(device)
    start = time.perf_counter()
    out = pipe(**kw, num_inference_steps=steps, callback_on_step_end=on_step_end).images
    sync(device)
    wall = time.perf_counter() - start
    return wall, [(b - e) * 1e3 for e, b in zip([start] + ends, ends)], out


def pipeline_steps(pipe, kw, device, warmup, steps):
    """One pipeline call of warmup + steps denoising steps, timed step by step.
    Returns (seconds until the warm-up steps were done, the other steps' times in ms, the final latents)."""
    _, times_ms, out = timed_pipeline_call(pipe, kw, device, warmup + steps)
    return sum(times_ms[:warmup]) / 1e3, times_ms[warmup:], out


# --- records ------------------------------------------------------------------------------------------------------

def versions() -> dict:
    """Never raises: a package that does not import shows as None, and the run itself records the error."""
    info = dict(torch=torch.__version__, diffusers=None, fastusp=None)
    for name in ("diffusers", "fastusp"):
        try:
            info[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception:
            pass
    return info


def card_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def set_inductor_config(setting: str) -> None:
    """KEY=VALUE -> torch._inductor.config.KEY = VALUE (dotted keys reach sub-configs)."""
    import torch._inductor.config as inductor_config
    key, _, text = setting.partition("=")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    *path, name = key.split(".")
    target = inductor_config
    for part in path:
        target = getattr(target, part)
    getattr(target, name)  # an unknown key raises here instead of being silently added
    setattr(target, name, value)


def compile_fallbacks(model, a) -> dict | None:
    """What compile_pipeline ran eagerly instead ({} if nothing), for a run that fastusp compiled; else None. The
    output stays right when a block falls back, so without this a timing of eager blocks reads like a compiled one
    (Qwen-Image 2.1 from ed561a5 to fee60a0: 92.3 ms for 66 ms compiled)."""
    import fastusp

    report = fastusp.compile_report(model) if a.compile else None
    return dict(report.fell_back) if report is not None else None


def base_record(a, world, device) -> dict:
    return dict(model=a.model, world=world, impl=a.impl, config="-" if a.impl == "single" else a.config,
                compiled=bool(a.compile), compile_mode=resolved_compile_mode(a),
                backend=a.backend if a.impl in ("single", "diffusers") else None,
                res=f"{a.height}x{a.width}", txt=a.txt, steps=a.steps, warmup=a.warmup,
                dtype="float32" if device.type == "cpu" else "bfloat16", tiny=a.tiny,
                card=card_name(device), date=datetime.date.today().isoformat(), **versions(),
                **peers.peer_record(a.impl),
                median_ms=None, min_ms=None, mean_ms=None, steps_ms=None, compile_s=None, build_s=None,
                model_mem_gb=None, peak_mem_gb=None, finite=None, err=None,
                **({"quant": a.quant} if a.quant else {}),
                **({"quant_granularity": a.quant_granularity} if a.quant and a.quant_granularity != "row" else {}),
                **({"quant_keep": a.quant_keep} if a.quant and a.quant_keep is not None else {}),
                **({"inductor": a.inductor} if a.inductor else {}),
                **({"sm_carveout": a.sm_carveout} if a.sm_carveout else {}),
                **({"first_block_cache": a.first_block_cache} if a.first_block_cache is not None else {}),
                **({"fuse_qkv": True} if a.fuse_qkv else {}),
                **({"text_mask": a.text_mask} if a.text_mask != "ones" else {}),
                **({"true_cfg": a.true_cfg} if a.true_cfg else {}),
                **({"edit_2511": True} if a.edit_2511 else {}),
                **({"kv_cache": True} if a.kv_cache else {}),
                **({"controlnet": a.controlnet} if a.controlnet else {}),
                **({"controlnet_whole": True} if a.controlnet_whole else {}))


def emit(record: dict, filename: str = "results.jsonl"):
    """Print the record as one JSON line, and append it to $OUT/filename when $OUT is set."""
    line = json.dumps(record)
    print(line, flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, filename), "a") as f:
            f.write(line + "\n")


def error_text(ex: BaseException) -> str:
    """One line: type, message and the innermost frame, enough to tell which layer failed."""
    text = f"{type(ex).__name__}: {' '.join(str(ex).split())[:500]}"  # one line, even for CUDA's long messages
    frames = traceback.extract_tb(ex.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


# --- main ---------------------------------------------------------------------------------------------------------

def run(a, world, rank, device, record):
    """Fill `record` in place; exceptions propagate to main so the partial record is still printed."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    init_group(world, device, bind_device=a.impl != "xdit")
    t0 = time.perf_counter()
    phase(rank, "build")
    model = build_model(a.model, device, dtype, tiny=a.tiny, zero_cond_t=a.edit_2511)
    if a.fuse_qkv:
        model.fuse_qkv_projections()
    if a.quant:
        phase(rank, f"quantize {a.quant}")
        record.update(quantize_model(model, a, device))
    pipe = build_pipeline(a.model, model) if a.true_cfg else None
    net = build_controlnet(model, a.controlnet, device, dtype) if a.controlnet else None
    target = controlnet_target(model, net, a) if net is not None else model
    kw = pipeline_inputs(model, a, device, dtype) if pipe else make_inputs(a.model, device, dtype, a.height, a.width,
                                                                             a.txt, a.text_mask, a.edit_2511)
    one_gpu = peers.one_gpu_output(model, kw) if peers.wants_one_gpu_check(a, world) else None
    phase(rank, f"apply {a.impl}")
    APPLY[a.impl](pipe or target, a, world)
    if a.first_block_cache is not None:
        from diffusers.hooks import FirstBlockCacheConfig
        model.enable_cache(FirstBlockCacheConfig(threshold=a.first_block_cache))
    fwd = maybe_compile(target, a)
    if target is not model:  # the ControlNet pipeline shell: compile_pipeline changed its transformer in place
        fwd = model
    if a.first_block_cache is not None:  # around the transformer's call (a ControlNet step calls it inside)
        fwd = in_cache_context(fwd, model)
    if a.kv_cache:  # the pipeline's first step fills the cache; the timed steps are its later ones
        kw = kv_cached_inputs(fwd, kw, model)
    if net is not None:
        if a.compile and target is model:  # else compile_pipeline compiled the ControlNet's blocks with the rest
            compile_controlnet_blocks(net)
        fwd = controlnet_step(fwd, net, kw, device, dtype)
    sync(device)
    record["build_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":  # peak_mem_gb: the steady state (weights + activations), not the build
        record["model_mem_gb"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    if pipe:
        phase(rank, "pipeline: warm-up and timed steps in one call")
        compile_s, times_ms, out = pipeline_steps(pipe, kw, device, a.warmup, a.steps)
    else:
        phase(rank, "warm-up" + (" (compiling)" if a.compile else ""))
        compile_s = warm_up(fwd, kw, device, a.warmup)
        phase(rank, "timed steps")
        out, times_ms = timed_steps(fwd, kw, device, world, a.steps)
    record.update(median_ms=round(statistics.median(times_ms), 3), min_ms=round(min(times_ms), 3),
                  mean_ms=round(statistics.fmean(times_ms), 3), steps_ms=[round(t, 1) for t in times_ms],
                  compile_s=round(compile_s, 2),
                  finite=bool(torch.isfinite(out.float()).all()))
    if one_gpu is not None:
        record.update(peers.one_gpu_check(out, one_gpu, a))
    if device.type == "cuda":
        record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    fell_back = compile_fallbacks(model, a)
    if fell_back is not None:
        record["fell_back"] = fell_back
    if a.profile:
        profile_steps(fwd, kw, a, rank)
    if a.host_profile:
        host_profile_steps(fwd, kw, a, rank, world, device)


@torch.inference_mode()
def host_profile_steps(fwd, kw, a, rank, world, device):
    """Where the host's time goes: cProfile over a.host_profile steps on rank 0 (the other ranks run unprofiled, so
    rank 0's step is the slowest and its profile shows its own work, not waits for the others)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile() if rank == 0 else None
    for _ in range(a.host_profile):
        if world > 1:
            dist.barrier()
        if profiler:
            profiler.enable()
        fwd(**kw)
        if profiler:
            profiler.disable()
    sync(device)
    if profiler is None:
        return
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"===== {a.model} w{world} {a.impl} {a.config} compile={a.compile}: {a.host_profile} steps, "
               f"{stats.total_tt * 1e3 / a.host_profile:.1f} ms of profiled host time per step\n")
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(r"fastusp|diffusers/models", 30)
    print(text.getvalue(), file=sys.stderr)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "host-profile.txt"), "a") as f:
            f.write(text.getvalue())


@torch.inference_mode()
def profile_steps(fwd, kw, a, rank):
    """Where a step's time goes: top kernels by GPU time, and how many launches the host issued per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.profile):
            fwd(**kw)
        torch.cuda.synchronize()
    trace = chrome_trace(prof)
    if os.environ.get("OUT"):  # every rank's GPU kernels, for a timeline (chrome://tracing, Perfetto) and for
        # trace_exposure --peers, which compares how long the ranks wait at each collective
        kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy")]
        suffix = f"-rank{rank}" if rank else ""
        name = (f"trace-{a.model}-w{os.environ.get('WORLD_SIZE', '1')}-{a.impl}-{a.config}-c{int(a.compile)}"
                f"{suffix}.json.gz")
        with gzip.open(os.path.join(os.environ["OUT"], name), "wt") as f:
            json.dump({"traceEvents": kernels}, f)
    if rank != 0:
        return
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
    print(f"PROFILE {a.model} {a.impl} {a.config} compile={a.compile}: {launches / a.profile:.0f} kernel launches "
          f"and {graphs / a.profile:.0f} graph launches per step", file=sys.stderr)
    print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60), file=sys.stderr)
    breakdown = kernel_breakdown(trace, a.profile)
    print(f"BREAKDOWN {a.model} {a.impl} {a.config} compile={a.compile} {json.dumps(breakdown)}", file=sys.stderr)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "breakdown.jsonl"), "a") as f:
            f.write(json.dumps(dict(model=a.model, world=int(os.environ.get("WORLD_SIZE", "1")), impl=a.impl,
                                    config=a.config, compiled=bool(a.compile), **breakdown)) + "\n")


KERNEL_KINDS = [("nccl", r"nccl"), ("attention", r"flash|fmha|attention|cudnn|sdpa"),
                ("gemm", r"gemm|nvjet|cutlass|xmma|matmul"), ("other", r"")]


def _union_ms(intervals) -> float:
    return sum(e - s for s, e in merged_intervals(intervals)) / 1e3


def kernel_breakdown(trace: dict, steps: int) -> dict:
    """Per step (ms, rank 0): GPU time by kernel kind, the span, and how much NCCL time no compute kernel hid."""
    kernels = kernel_events(trace)
    if not kernels:
        return {}
    by_kind = {k: [] for k, _ in KERNEL_KINDS}
    for e in kernels:
        kind = next(k for k, pat in KERNEL_KINDS if re.search(pat, e["name"], re.I))
        by_kind[kind].append((e["ts"], e["ts"] + e["dur"]))
    compute = [iv for k, ivs in by_kind.items() if k != "nccl" for iv in ivs]
    span = (max(e for _, e in compute + by_kind["nccl"]) - min(s for s, _ in compute + by_kind["nccl"])) / 1e3
    busy_compute = _union_ms(compute)
    busy_all = _union_ms(compute + by_kind["nccl"])
    out = {f"{k}_ms": round(sum(e - s for s, e in ivs) / 1e3 / steps, 3) for k, ivs in by_kind.items()}
    out.update(kernels_per_step=round(len(kernels) / steps), span_ms=round(span / steps, 3),
               compute_busy_ms=round(busy_compute / steps, 3),
               nccl_exposed_ms=round((busy_all - busy_compute) / steps, 3),
               idle_ms=round((span - busy_all) / steps, 3))
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.record_failure is not None:  # the run died without a record (timeout, a crash on another rank)
        device = torch.device("cuda") if torch.cuda.is_available() and not a.tiny else torch.device("cpu")
        record = base_record(a, a.world or 1, device)
        record["err"] = a.record_failure
        emit(record)
        return 0
    dump_after = float(os.environ.get("STEP_LATENCY_DUMP_AFTER_S", "0"))
    if dump_after > 0:  # just before an outer timeout kills us: every thread's stack, to tell a hang from slowness
        faulthandler.dump_traceback_later(dump_after, exit=False)
    world, rank, device = process_layout(a.tiny)
    record = base_record(a, world, device)
    try:
        run(a, world, rank, device, record)
    except Exception as ex:  # report, don't hide: every run leaves one record
        record["err"] = error_text(ex)
        traceback.print_exc()
        # one greppable line: run_gpu.sh quotes it when no rank-0 record came out
        print(f"STEP_LATENCY_ERR rank={rank} {record['err']}", file=sys.stderr, flush=True)
        if rank == 0:
            emit(record)
        else:
            time.sleep(3)  # give rank 0 the time to print its own record before torchrun tears the group down
        # skip destroy_process_group: peers may be stuck in a collective; a non-zero exit makes torchrun stop them
        os._exit(1)
    if rank == 0:
        emit(record)
    if dist.is_initialized():
        dist.barrier()
        # skip destroy_process_group: it hung while CUDA graphs held NCCL's collectives, which fastusp now releases
        # first (fa84252); kept, as every record is out by now and diffusers' runs are not fastusp's
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
