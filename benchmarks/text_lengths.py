"""Qwen-Image prompts of varied lengths under fastusp.compile_pipeline, with and without --text-bucket.

Compiled code and CUDA graphs are per input shape, and every prompt length is a new shape: a server with varied
prompts compiles again for each new length. compile_pipeline(text_bucket=N) pads prompts to a multiple of N tokens
behind the text mask, so lengths share code and graphs, and every step runs with the mask. This runs Qwen-Image's
transformer at full size (random bf16 weights), 1024², fastusp Ulysses over all ranks, compiled, on prompts of
--lengths tokens in turn (no mask given, as QwenImagePipeline passes an unpadded prompt), --steps steps each. One
JSON record per length on rank 0 (also appended to $OUT/text_lengths.jsonl): its first step (compile and capture,
when the length is new to the compiled code) and the median of the others.

    torchrun --nproc-per-node 2 benchmarks/text_lengths.py --lengths 77,90,128,100,77 [--text-bucket 64]
    torchrun --nproc-per-node 2 benchmarks/text_lengths.py --tiny --lengths 5,7 --text-bucket 8   # CPU smoke test
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

# a sibling module; importing it puts the repository root on sys.path (for fastusp)
from step_latency import build_model, card_name, emit, init_group, make_inputs, process_layout, timed_steps


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="77,90,128,100,77", help="prompt lengths in tokens, in call order")
    ap.add_argument("--text-bucket", type=int, default=None, help="compile_pipeline(text_bucket=N)")
    ap.add_argument("--steps", type=int, default=6, help="steps (transformer calls) per length")
    ap.add_argument("--size", type=int, default=1024, help="image height and width")
    ap.add_argument("--tiny", action="store_true", help="CPU + gloo, a one-layer model: checks the harness")
    a = ap.parse_args(argv)
    a.lengths = [int(n) for n in a.lengths.split(",")]
    return a


def main(argv=None):
    a = parse_args(argv)
    world, rank, device = process_layout(a.tiny)
    init_group(world, device)
    import fastusp

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    size = 64 if a.tiny else a.size
    model = fastusp.parallelize(build_model("qwen-image", device, dtype, tiny=a.tiny), ulysses=world)
    fastusp.compile_pipeline(model, text_bucket=a.text_bucket, **({"backend": "eager"} if a.tiny else {}))
    for length in a.lengths:
        kwargs = make_inputs("qwen-image", device, dtype, size, size, length, text_mask="none")
        if a.tiny:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][..., :model.config.joint_attention_dim]
        _, times_ms = timed_steps(model, kwargs, device, world, a.steps)
        record = dict(model="qwen-image", world=world, text_bucket=a.text_bucket, txt=length, res=f"{size}x{size}",
                      first_step_ms=round(times_ms[0], 1),
                      median_other_step_ms=round(statistics.median(times_ms[1:]), 2) if a.steps > 1 else None,
                      steps_ms=[round(t, 1) for t in times_ms], card=card_name(device),
                      report=fastusp.compile_report(model).summary())
        if rank == 0:
            emit(record, "text_lengths.jsonl")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown (see tests/gpu/parity_worker.py)
