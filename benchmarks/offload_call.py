"""What diffusers' enable_model_cpu_offload costs a fastusp pipeline call: FLUX.2-dev on 80 GB cards needs it.

FLUX.2-dev's transformer (64 GB in bf16) and Mistral text encoder (48 GB) do not fit one 80 GB card together. Under
model offload they wait in CPU memory and take turns on the GPU: the transformer comes to the GPU in each call's
first step and leaves when the next model runs (at the end of the call). This times whole pipeline calls of
Flux2Pipeline around FLUX.2-dev's transformer at full size (random bf16 weights, built on the GPU: no checkpoint is
needed), on given prompt embeds (no text encoder or VAE: the transformer's trip alone), parallelized by fastusp with
Ulysses over all ranks, with and without --offload. Prints one JSON record per call on rank 0 (and appends it to
$OUT/offload.jsonl): the call's wall time, its first step (the trip to the GPU, and under --compile the graphs'
capture) and the median of the others.

    torchrun --nproc-per-node 2 benchmarks/offload_call.py --offload --compile
    torchrun --nproc-per-node 2 benchmarks/offload_call.py --tiny --offload   # CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

# a sibling module; importing it puts the repository root on sys.path (for fastusp)
from step_latency import build_model, card_name, emit, init_group, process_layout, timed_pipeline_call


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offload", action="store_true", help="pipe.enable_model_cpu_offload on this rank's device")
    ap.add_argument("--compile", action="store_true", help="fastusp.compile_pipeline (Inductor + CUDA graphs)")
    ap.add_argument("--calls", type=int, default=3, help="pipeline calls (the first compiles under --compile)")
    ap.add_argument("--steps", type=int, default=6, help="denoising steps per call")
    ap.add_argument("--size", type=int, default=1024, help="image height and width")
    ap.add_argument("--txt", type=int, default=512, help="text tokens")
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, a one-layer model: checks the harness")
    return ap.parse_args(argv)


def build_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                         text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    a = parse_args(argv)
    world, rank, device = process_layout(a.tiny)
    init_group(world, device)
    import fastusp

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    transformer = build_model("flux2", device, dtype, tiny=a.tiny)
    pipe = build_pipeline(transformer)
    g = torch.Generator(device=device).manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, a.txt, transformer.config.joint_attention_dim, device=device,
                                            dtype=dtype, generator=g),
                  height=a.size, width=a.size, output_type="latent", generator=torch.Generator().manual_seed(0))
    if a.offload:
        pipe.enable_model_cpu_offload(device=device)
    fastusp.parallelize(pipe, ulysses=world)
    if a.compile:
        fastusp.compile_pipeline(pipe)
    for call in range(a.calls):
        wall, steps_ms, _ = timed_pipeline_call(pipe, kwargs, device, a.steps)
        others = steps_ms[1:]
        record = dict(model="flux2", world=world, offload=a.offload, compiled=a.compile, call=call,
                      res=f"{a.size}x{a.size}", txt=a.txt, steps=a.steps, call_s=round(wall, 2),
                      first_step_ms=round(steps_ms[0], 1),
                      median_other_step_ms=round(statistics.median(others), 1) if others else None,
                      steps_ms=[round(t, 1) for t in steps_ms],
                      transformer_device_after=str(next(transformer.parameters()).device), card=card_name(device),
                      peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                      if device.type == "cuda" else None)
        if rank == 0:
            emit(record, "offload.jsonl")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # Skip interpreter teardown: destroying NCCL communicators that captured CUDA graphs can hang at exit (here on
    # 2xH200 after every call had printed, as in tests/gpu/parity_worker.py); all records are written by now.
    os._exit(0)
