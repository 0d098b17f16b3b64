"""Attention micro-benchmark: Ulysses / Ring / USP, with and without FP8 communication, pipelined vs not.

torchrun --nproc-per-node 2 benchmarks/attention_bench.py [--seq 4608 2048] [--heads 24 --head-dim 128]
Times one usp_attention call (all-to-alls, ring exchange and attention kernels) per configuration with CUDA
events (median of --iters after --warmup), checks it against single-device attention on the full inputs, and
prints one JSON record per configuration on rank 0 (also appended to $OUT/attention.jsonl when $OUT is set).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastusp.attention.usp import usp_attention
from fastusp.config import ParallelConfig, maybe_init_distributed
from fastusp.sharding import SeqLayout


def configurations(world: int) -> list[tuple[str, ParallelConfig]]:
    """Every factorization of the world size; FP8 variants; the unpipelined ring beside the pipelined one."""
    out = []
    for ring in [r for r in range(1, world + 1) if world % r == 0]:
        u = world // ring
        out.append((f"u{u}r{ring}", ParallelConfig(ulysses=u, ring=ring)))
        out.append((f"u{u}r{ring}-fp8", ParallelConfig(ulysses=u, ring=ring, fp8_comm=True)))
        if u > 1:
            out.append((f"u{u}r{ring}-fp8all", ParallelConfig(ulysses=u, ring=ring, fp8_comm="all")))
        if ring > 1:
            out.append((f"u{u}r{ring}-unpipelined", ParallelConfig(ulysses=u, ring=ring, ring_overlap=False)))
    return out


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def emit(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention.jsonl"), "a") as f:
            f.write(line + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[4608, 2048])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    maybe_init_distributed(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    common = dict(heads=args.heads, head_dim=args.head_dim, card=torch.cuda.get_device_name(device),
                  date=datetime.date.today().isoformat(), torch=torch.__version__)
    for seq in args.seq:
        g = torch.Generator(device=device).manual_seed(seq)
        q, k, v = (torch.randn(1, seq, args.heads, args.head_dim, device=device, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        full = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        ref, single_ms = full(), time_ms(full, args.warmup, args.iters)
        if rank == 0:
            emit(dict(impl="single-gpu-sdpa", config="-", seq=seq, world=1, median_ms=single_ms, **common))
        layout = SeqLayout.even(0, seq, world)
        mine = layout.image_slice(rank)
        local = [t[:, mine].contiguous() for t in (q, k, v)]
        for name, config in configurations(world):
            config.build_mesh("cuda")
            out = usp_attention(*local, layout, config)
            err = ((out.float() - ref[:, mine].float()).norm() / ref[:, mine].float().norm()).item()
            ms = time_ms(lambda: usp_attention(*local, layout, config), args.warmup, args.iters)
            if rank == 0:
                emit(dict(impl="fastusp", config=name, seq=seq, world=world, median_ms=ms, rel_err=err,
                          speedup_vs_single=single_ms / ms, **common))


if __name__ == "__main__":
    main()
