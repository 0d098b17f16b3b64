"""Time per image, prompt to decoded image: one GPU vs diffusers' context parallel vs fastusp, with the breakdown.

A diffusers pipeline (FluxPipeline / Flux2Pipeline / QwenImagePipeline) around full-size models with random bf16
weights, built the same way for every implementation (the transformer exactly as step_latency.py builds it; the
text encoders and the VAE from their published configurations, filled by the same fill_random_). Nothing is
downloaded, so there is no tokenizer: the pipeline's encode_prompt is replaced by one that runs the full-size text
encoders on random token ids of the real lengths (FLUX.1: CLIP-L on 77 and T5-XXL on 512 tokens; FLUX.2: Mistral
Small 3.1 24B on 512, hidden states of layers 10, 20, 30; Qwen-Image: Qwen2.5-VL-7B's language model on the
34-token template plus --txt tokens, no vision tower) and hands the embeddings to the pipeline's own encode_prompt.
Random weights make meaningless images; the work per image is the real one.

Every size prints one JSON record on rank 0 and appends it to $OUT/time_per_image.jsonl when $OUT is set:
text_ms (encode_prompt calls), decode_ms (vae.decode), steps_ms (the rest of the pipeline call: the --steps
denoising steps, latent preparation, post-processing), total_ms, and per rank the peak memory of the whole image and
of the decode alone (GiB).

    python benchmarks/time_per_image.py --model flux --impl single --sizes 1024,2048
    torchrun --nproc-per-node 2 benchmarks/time_per_image.py --model flux --impl diffusers --config ulysses2
    torchrun --nproc-per-node 2 benchmarks/time_per_image.py --model flux --impl fastusp --config u2r1
    torchrun --nproc-per-node 2 benchmarks/time_per_image.py --model flux --impl fastusp --config u2r1 \\
        --text-encoder-rank 0          # the text encoders on rank 0 only (built there only), embeddings broadcast
    python benchmarks/time_per_image.py --vae-only --model flux     # one GPU: the VAE decode alone, see below
    torchrun --nproc-per-node 2 benchmarks/time_per_image.py --tiny --impl fastusp --config u1r2   # CPU smoke test

--vae-only (one process): the single-GPU decode at each of --sizes (default 1024,2048,4096) with its time and peak
memory, then with diffusers' VAE tiling where it runs out of memory; and one rank's share of fastusp's parallel decode
over --shares ranks (default 2,4,8), timed alone: a middle rank's band of latent rows, each convolution on the band
plus its halo rows, the mid-block attention of the band's queries over all keys, GroupNorm on the band. The
collectives are replaced by local stand-ins of the same shapes (halo rows of zeros, keys and values repeated to the
full length), so the share's time leaves out communication: it bounds the parallel decode's time from below.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

import step_latency as sl  # sibling: benchmarks/ is on sys.path (step_latency puts the repository root on it too)

from fastusp.testing import FLUX2_SCHEDULER, FLUX_SCHEDULER, QWEN_SCHEDULER  # the real schedulers' settings

QWEN_TEMPLATE_TOKENS = 34  # QwenImagePipeline drops the hidden states of its prompt template's first 34 tokens
NEGATIVE_PROMPT = " "


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="flux", choices=["flux", "flux2", "qwen"])
    ap.add_argument("--impl", default="single", choices=["single", "diffusers", "fastusp"])
    ap.add_argument("--config", default="-", help="ulysses2 | ring2 | ulysses2xring2 (diffusers); [cfg2]u2r1 (fastusp)")
    ap.add_argument("--sizes", default=None, help="square image sizes, comma-separated (default 1024,2048; "
                                                  "--vae-only 1024,2048,4096; --tiny 64)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--txt", type=int, default=None, help="prompt tokens (default 512 FLUX, 64 Qwen-Image)")
    ap.add_argument("--true-cfg", type=float, default=None,
                    help="Qwen-Image: true CFG scale with a negative prompt (default 4.0, as its model card; 0: off)")
    ap.add_argument("--text-encoder-rank", type=int, default=None,
                    help="fastusp: parallelize(text_encoder_rank=R); the text encoders are built on rank R only")
    ap.add_argument("--parallel-vae", type=int, default=1, choices=[0, 1], help="fastusp: parallelize(parallel_vae=)")
    ap.add_argument("--no-text-encoder", action="store_true",
                    help="random prompt embeddings instead of the text encoders (FLUX.2's 24B encoder and 32B "
                         "transformer do not fit one 80 GB GPU together)")
    ap.add_argument("--compile", type=int, default=0, choices=[0, 1],
                    help="fastusp: compile_pipeline; others: diffusers' regional compile (step_latency's --compile)")
    ap.add_argument("--backend", default="native", help="diffusers attention backend (single / diffusers)")
    ap.add_argument("--vae-only", action="store_true", help="one GPU: the VAE decode alone (see the docstring)")
    ap.add_argument("--shares", default="2,4,8", help="--vae-only: rank counts whose one share is timed")
    ap.add_argument("--repeats", type=int, default=2, help="--vae-only: timed decodes per measurement (best taken)")
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, float32, tiny models: checks the harness")
    a = ap.parse_args(argv)
    a.sizes = [int(s) for s in (a.sizes or ("64" if a.tiny else "1024,2048,4096" if a.vae_only else "1024,2048"))
               .split(",")]
    a.shares = [int(s) for s in a.shares.split(",")]
    a.txt = a.txt or (64 if a.model == "qwen" else 512)
    a.true_cfg = (4.0 if a.model == "qwen" else 0.0) if a.true_cfg is None else a.true_cfg
    if a.true_cfg and a.model != "qwen":
        ap.error("--true-cfg: Qwen-Image only here")
    if a.text_encoder_rank is not None and a.impl != "fastusp":
        ap.error("--text-encoder-rank: --impl fastusp only")
    # what step_latency's maybe_compile / apply functions read
    a.compile_mode, a.inductor_overlap, a.inductor, a.sm_carveout, a.fullgraph, a.cp_anything = "auto", 0, [], 0, 1, 0
    return a


# --- models ---------------------------------------------------------------------------------------------------------

def build_random(factory, device, dtype):
    """A module built directly on `device` in `dtype`, then filled as step_latency's build_model fills its weights.
    Not on meta: these models compute buffers at construction (position ids, RoPE frequencies) that to_empty would
    leave as garbage."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    sl.fill_random_(module, device)
    return module.eval()


def build_vae(model, device, dtype, tiny=False):
    """The model's VAE with its published configuration (--tiny: two resolutions, 8 to 16 channels)."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

    small = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    if model == "qwen":
        kw = dict(base_dim=8, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False]) if tiny else {}
        return build_random(lambda: AutoencoderKLQwenImage(**kw), device, dtype)
    if model == "flux2":
        return build_random(lambda: AutoencoderKLFlux2(**(small if tiny else {})), device, dtype)
    flux = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)
    return build_random(lambda: AutoencoderKL(**(small if tiny else flux), latent_channels=16, scaling_factor=0.3611,
                                              shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
                        device, dtype)


def build_text_encoders(model, device, dtype, tiny=False) -> dict:
    """Pipeline component name -> full-size text encoder with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, MistralConfig, MistralModel, T5Config, T5EncoderModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    def sized(full: dict, **small):
        return dict(full, **small) if tiny else full

    # --tiny keeps the widths the transformer reads (embeddings of 4096 / 768 / 3 x 5120 / 3584) with one layer
    # (FLUX.2: 31, as its hidden states 10, 20, 30 are read) and a small vocabulary
    if model == "flux":
        clip = CLIPTextConfig(**sized(dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768),
                                      vocab_size=1000, intermediate_size=64, num_hidden_layers=1))
        t5 = T5Config(**sized(dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False),
                              vocab_size=1000, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
        return dict(text_encoder=build_random(lambda: CLIPTextModel(clip), device, dtype),
                    text_encoder_2=build_random(lambda: T5EncoderModel(t5), device, dtype))
    if model == "flux2":  # Mistral Small 3.1's language model
        cfg = MistralConfig(**sized(dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                                         num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                                         head_dim=128),
                                    vocab_size=1000, intermediate_size=64, num_hidden_layers=31,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8))
        return dict(text_encoder=build_random(lambda: MistralModel(cfg), device, dtype))
    cfg = Qwen2_5_VLTextConfig(**sized(dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
                                       vocab_size=1000, intermediate_size=64, num_hidden_layers=1))
    return dict(text_encoder=build_random(lambda: Qwen2_5_VLTextModel(cfg), device, dtype))


def random_ids(vocab: int, length: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), device=device, generator=torch.Generator(device).manual_seed(2))


def install_encode_prompt(pipe, model: str, txt: int) -> None:
    """pipe.encode_prompt: the text encoders on random token ids (no tokenizer here), then the pipeline's own
    encode_prompt with those embeddings (its reshaping, text ids, mask handling)."""
    original = type(pipe).encode_prompt

    def flux(prompt, prompt_2=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
             pooled_prompt_embeds=None, max_sequence_length=512, lora_scale=None):
        device = device or pipe._execution_device
        pooled = pipe.text_encoder(random_ids(pipe.text_encoder.config.vocab_size, 77, device)).pooler_output
        embeds = pipe.text_encoder_2(random_ids(pipe.text_encoder_2.config.vocab_size, max_sequence_length,
                                                device))[0]
        return original(pipe, prompt, prompt_2, device, num_images_per_prompt, prompt_embeds=embeds,
                        pooled_prompt_embeds=pooled, max_sequence_length=max_sequence_length)

    def flux2(prompt, device=None, num_images_per_prompt=1, prompt_embeds=None, max_sequence_length=512,
              text_encoder_out_layers=(10, 20, 30)):
        device = device or pipe._execution_device
        out = pipe.text_encoder(input_ids=random_ids(pipe.text_encoder.config.vocab_size, max_sequence_length,
                                                     device), output_hidden_states=True)
        layers = torch.stack([out.hidden_states[k] for k in text_encoder_out_layers], dim=1)  # [B, 3, L, D]
        embeds = layers.permute(0, 2, 1, 3).reshape(1, max_sequence_length, -1)
        return original(pipe, prompt, device, num_images_per_prompt, prompt_embeds=embeds,
                        max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)

    def qwen(prompt, device=None, num_images_per_prompt=1, prompt_embeds=None, prompt_embeds_mask=None,
             max_sequence_length=1024):
        device = device or pipe._execution_device
        tokens = 4 if prompt == NEGATIVE_PROMPT else txt
        ids = random_ids(pipe.text_encoder.config.vocab_size, QWEN_TEMPLATE_TOKENS + tokens, device)
        embeds = pipe.text_encoder(input_ids=ids).last_hidden_state[:, QWEN_TEMPLATE_TOKENS:]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        return original(pipe, prompt, device, num_images_per_prompt, prompt_embeds=embeds,
                        prompt_embeds_mask=mask, max_sequence_length=max_sequence_length)

    pipe.encode_prompt = {"flux": flux, "flux2": flux2, "qwen": qwen}[model]


def build_pipeline(a, device, dtype, rank):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, FluxPipeline, QwenImagePipeline

    name = {"flux": "flux", "flux2": "flux2", "qwen": "qwen-image"}[a.model]
    transformer = sl.build_model(name, device, dtype, tiny=a.tiny)
    encoders = {}
    if not a.no_text_encoder and a.text_encoder_rank in (None, rank):
        encoders = build_text_encoders(a.model, device, dtype, tiny=a.tiny)
    parts = dict(transformer=transformer, vae=build_vae(a.model, device, dtype, tiny=a.tiny))
    if a.model == "flux":
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), tokenizer=None,
                            tokenizer_2=None, text_encoder=encoders.get("text_encoder"),
                            text_encoder_2=encoders.get("text_encoder_2"), **parts)
    elif a.model == "flux2":
        pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), tokenizer=None,
                             text_encoder=encoders.get("text_encoder"), **parts)
    else:
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), tokenizer=None,
                                 text_encoder=encoders.get("text_encoder"), **parts)
    if not a.no_text_encoder:
        install_encode_prompt(pipe, a.model, a.txt)
    return pipe


def random_prompt_embeds(pipe, a, device, dtype) -> dict:
    """--no-text-encoder: the embeddings encode_prompt would return, random."""
    cfg = pipe.transformer.config
    g = torch.Generator(device).manual_seed(3)
    kw = dict(prompt_embeds=torch.randn(1, a.txt, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g))
    if a.model == "flux":
        kw["pooled_prompt_embeds"] = torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype, generator=g)
    if a.model == "qwen" and a.true_cfg:
        kw["negative_prompt_embeds"] = torch.randn(1, 4, cfg.joint_attention_dim, device=device, dtype=dtype,
                                                   generator=g)
    return kw


# --- timing ---------------------------------------------------------------------------------------------------------

class PhaseClock:
    """Wall time (device-synchronized) and decode peak memory of the phases inside one pipeline call."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.ms = {"text": 0.0, "decode": 0.0}
        self.decode_peak = 0
        self.peak_before_decode = 0

    def wrap(self, phase: str, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            sl.sync(self.device)
            if phase == "decode" and self.device.type == "cuda":
                self.peak_before_decode = max(self.peak_before_decode, torch.cuda.max_memory_allocated(self.device))
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            out = method(*args, **kwargs)
            sl.sync(self.device)
            self.ms[phase] += (time.perf_counter() - start) * 1e3
            if phase == "decode" and self.device.type == "cuda":
                self.decode_peak = max(self.decode_peak, torch.cuda.max_memory_allocated(self.device))
            return out
        return timed


def call_kwargs(pipe, a, size, steps, device, dtype) -> dict:
    kw = dict(height=size, width=size, num_inference_steps=steps, output_type="pt",
              generator=torch.Generator("cpu").manual_seed(0))
    if a.no_text_encoder:
        kw.update(random_prompt_embeds(pipe, a, device, dtype))
    else:
        kw["prompt"] = "a random prompt"
    if a.model == "qwen" and a.true_cfg:
        kw.update(true_cfg_scale=a.true_cfg)
        if not a.no_text_encoder:
            kw["negative_prompt"] = NEGATIVE_PROMPT
    if a.model == "flux2" and a.no_text_encoder:
        kw["guidance_scale"] = 4.0
    return kw


@torch.inference_mode()
def time_image(pipe, clock, a, size, device, dtype, world) -> dict:
    pipe(**call_kwargs(pipe, a, size, 2, device, dtype))  # warm-up: kernels chosen, compiled code built
    if world > 1:
        dist.barrier()
    clock.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sl.sync(device)
    start = time.perf_counter()
    pipe(**call_kwargs(pipe, a, size, a.steps, device, dtype))
    sl.sync(device)
    total = (time.perf_counter() - start) * 1e3
    peak = max(clock.peak_before_decode, clock.decode_peak)
    ms = dict(text_ms=clock.ms["text"], steps_ms=total - clock.ms["text"] - clock.ms["decode"],
              decode_ms=clock.ms["decode"], total_ms=total)
    memory = [peak / 2**30, clock.decode_peak / 2**30]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, memory)
    else:
        every = [memory]
    return dict({k: round(v, 1) for k, v in ms.items()}, peak_gib=[round(m[0], 2) for m in every],
                decode_peak_gib=[round(m[1], 2) for m in every])


def apply_impl(pipe, a, world):
    if a.impl == "single":
        sl.apply_single(pipe, a, world)
    elif a.impl == "diffusers":
        sl.apply_diffusers_cp(pipe, a, world)
    else:
        import fastusp

        kw = sl.parse_fastusp_config(a.config)
        fastusp.parallelize(pipe, **kw, parallel_vae=bool(a.parallel_vae), text_encoder_rank=a.text_encoder_rank)
    if a.compile:
        compiled = sl.maybe_compile(pipe if a.impl == "fastusp" else pipe.transformer, a)
        if a.impl != "fastusp" and compiled is not pipe.transformer:
            pipe.transformer = compiled


def base_record(a, world, device) -> dict:
    import diffusers

    machine = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, diffusers=diffusers.__version__,
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    if a.vae_only:
        return dict(bench="vae_decode", model=a.model, **machine)
    return dict(bench="time_per_image", model=a.model, impl=a.impl, config=a.config, world=world, steps=a.steps,
                compile=a.compile, txt=a.txt, true_cfg=a.true_cfg, parallel_vae=bool(a.parallel_vae),
                text_encoder_rank=a.text_encoder_rank, text_encoder=not a.no_text_encoder, **machine)


def emit(record: dict, name: str = "time_per_image.jsonl") -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "a") as f:
            f.write(line + "\n")


def run_images(a):
    world, rank, device = sl.process_layout(a.tiny)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    sl.init_group(world, device)
    record = base_record(a, world, device)
    try:
        pipe = build_pipeline(a, device, dtype, rank)
        pipe.set_progress_bar_config(disable=True)
        apply_impl(pipe, a, world)
        clock = PhaseClock(device)  # outermost: times what every rank waits for, broadcasts included
        pipe.encode_prompt = clock.wrap("text", pipe.encode_prompt)
        pipe.vae.decode = clock.wrap("decode", pipe.vae.decode)
    except Exception as ex:
        record["err"] = sl.error_text(ex)
        traceback.print_exc()
        if rank == 0:
            emit(record)
        os._exit(1)
    for size in a.sizes:
        out = dict(record, size=size)
        try:
            out.update(time_image(pipe, clock, a, size, device, dtype, world))
        except Exception as ex:  # one size failing (out of memory) leaves the others
            out["err"] = sl.error_text(ex)
            traceback.print_exc()
            empty_cache(device)
        if rank == 0:
            emit(out)
    if world > 1:
        sys.stdout.flush()
        os._exit(0)  # as step_latency: skip destroy_process_group once every record is out


# --- --vae-only: one GPU ------------------------------------------------------------------------------------------

def vae_latent(vae, size: int, device, dtype) -> torch.Tensor:
    factor = getattr(vae, "spatial_compression_ratio", None) or 2 ** (len(vae.config.block_out_channels) - 1)
    rows = size // factor
    if type(vae).__name__ == "AutoencoderKLQwenImage":
        return torch.randn(1, vae.config.z_dim, 1, rows, rows, device=device, dtype=dtype)
    return torch.randn(1, vae.config.latent_channels, rows, rows, device=device, dtype=dtype)


@torch.inference_mode()
def timed_call(fn, device, repeats: int) -> dict:
    """Best of `repeats` calls after one warm-up, and the peak memory (GiB) above what was allocated before."""
    fn()
    sl.sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sl.sync(device)
        start = time.perf_counter()
        fn()
        sl.sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
    return dict(ms=round(min(times), 1), peak_gib=round(peak, 2))


@contextlib.contextmanager
def local_collectives():
    """fastusp's VAE collectives replaced by local stand-ins of the same shapes (one rank's compute alone)."""
    import torch.nn.functional as F

    import fastusp.vae.attention as attention
    import fastusp.vae.group_norm as group_norm
    import fastusp.vae.halo_conv as halo_conv

    def rows_here(x, bands, wanted):  # rows [lo, hi): this rank's where it holds them, zeros elsewhere
        (a, b), (lo, hi) = bands.spans(bands.scale_of(x.shape[-2]))[bands.rank], wanted[bands.rank]
        start, stop = max(lo, a), min(hi, b)
        if start >= stop:
            return x.new_zeros((*x.shape[:-2], hi - lo, x.shape[-1]))
        return F.pad(x.narrow(-2, start - a, stop - start), (0, 0, start - lo, hi - stop))

    def many_here(x, bands, requests):
        return [rows_here(x, bands, wanted) for wanted in requests]

    def repeated(x, lengths, group, dim=1):
        copies = math.ceil(sum(lengths) / x.shape[dim])
        return torch.cat([x] * copies, dim=dim).narrow(dim, 0, sum(lengths))

    names = [(halo_conv, "fetch_rows", rows_here), (halo_conv, "fetch_many", many_here),
             (attention, "gather_seq", repeated), (group_norm, "gather_seq", repeated)]
    saved = [getattr(module, name) for module, name, _ in names]
    for module, name, stand_in in names:
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for (module, name, _), original in zip(names, saved):
            setattr(module, name, original)


def share_of_decode(vae, z: torch.Tensor, ranks: int):
    """A call that decodes a middle rank's band of `z` as fastusp's parallel decode over `ranks` ranks would."""
    from fastusp.vae import apply_parallel_vae
    from fastusp.vae.bands import RowBands

    apply_parallel_vae(vae)
    rows = z.shape[-2]
    bands = RowBands(tuple(rows // ranks + (r < rows % ranks) for r in range(ranks)), ranks // 2, None)
    band = bands.local(z, 1)

    def decode():
        with vae._fastusp_vae.using(bands), local_collectives():
            return type(vae)._decode(vae, band)  # the class's: diffusers' own code, on the patched modules
    return decode


def empty_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_vae_only(a):
    """One process: the whole decode (tiled where it runs out of memory), then one rank's share, per size."""
    _, _, device = sl.process_layout(a.tiny)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    if not dist.is_initialized():  # fastusp's VAE patches ask for the rank; a group of one
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    vae = build_vae(a.model, device, dtype, tiny=a.tiny)
    record = base_record(a, 1, device)
    for size in a.sizes:
        z = vae_latent(vae, size, device, dtype)
        runs = [("whole", lambda: vae.decode(z))]
        runs += [(f"share-of-{n}", share_of_decode(vae, z, n)) for n in a.shares if n <= z.shape[-2]]
        for what, fn in runs:
            out = dict(record, size=size, decode=what)
            try:
                out.update(timed_call(fn, device, a.repeats))
            except (torch.OutOfMemoryError, RuntimeError) as ex:  # RuntimeError: kernels refusing huge inputs
                out["err"] = sl.error_text(ex)
                if what == "whole":  # diffusers' tiling is what a one-GPU user does then
                    empty_cache(device)
                    emit(out, "vae_decode.jsonl")
                    vae.enable_tiling()
                    out = dict(record, size=size, decode="whole-tiled")
                    try:
                        out.update(timed_call(fn, device, a.repeats))
                    except (torch.OutOfMemoryError, RuntimeError) as ex2:
                        out["err"] = sl.error_text(ex2)
                    vae.disable_tiling()
            empty_cache(device)
            emit(out, "vae_decode.jsonl")


def main(argv=None):
    a = parse_args(argv)
    if a.vae_only:
        run_vae_only(a)
    else:
        run_images(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
