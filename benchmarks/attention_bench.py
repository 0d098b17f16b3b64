"""Attention micro-benchmark: Ulysses / Ring / USP, head chunks, with and without FP8, pipelined ring vs not.

torchrun --nproc-per-node 2 benchmarks/attention_bench.py [--seq 4608 2048] [--heads 24 --head-dim 128]
Times one usp_attention call (all-to-alls, ring exchange and attention kernels) per configuration with CUDA
events (median of --iters after --warmup), checks it against single-device attention on the full inputs, and
prints one JSON record per configuration on rank 0 (also appended to $OUT/attention.jsonl when $OUT is set).
median_ms is the eager call (host launches included); graph_ms replays the same call from a CUDA graph: the
GPU time alone, which is what a compiled, graphed step sees.
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
from fastusp.cuda_graphs import capture_graph
from fastusp.sharding import SeqLayout


def configurations(world: int) -> list[tuple[str, ParallelConfig]]:
    """Every factorization of the world size; FP8 variants; the unpipelined ring beside the pipelined one."""
    out = []
    for ring in [r for r in range(1, world + 1) if world % r == 0]:
        u = world // ring
        out.append((f"u{u}r{ring}", ParallelConfig(ulysses=u, ring=ring)))
        if u > 1:  # head chunks: how much all-to-all hides behind attention (default 2)
            out += [(f"u{u}r{ring}-c{c}", ParallelConfig(ulysses=u, ring=ring, ulysses_chunks=c)) for c in (1, 3, 4, 6)]
        out.append((f"u{u}r{ring}-fp8", ParallelConfig(ulysses=u, ring=ring, fp8_comm=True)))
        if u > 1:
            out.append((f"u{u}r{ring}-fp8all", ParallelConfig(ulysses=u, ring=ring, fp8_comm="all")))
        if ring > 1:
            out.append((f"u{u}r{ring}-unpipelined", ParallelConfig(ulysses=u, ring=ring, ring_overlap=False)))
    return out


def time_ms(fn, warmup: int, iters: int, barrier: bool = True) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if barrier:
            dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_kernels(q, k, v, world, args, common) -> None:
    """One rank's attention kernel after Ulysses (heads / world, whole sequence), per aten kernel and layout:
    'bhsd' contiguous, 'seq-major' as seq_to_head_shard leaves it ([S, B, h, D] viewed as [B, h, S, D])."""
    aten = torch.ops.aten
    h = q.shape[2] // world
    kernels = {
        "flash": lambda a, b, c: aten._scaled_dot_product_flash_attention(a, b, c)[0],
        "cudnn": lambda a, b, c: aten._scaled_dot_product_cudnn_attention(a, b, c, None, True)[0],
        "efficient": lambda a, b, c: aten._scaled_dot_product_efficient_attention(a, b, c, None, True)[0],
        "sdpa-default": F.scaled_dot_product_attention,
    }
    layouts = {
        "bhsd": lambda t: t[:, :, :h].transpose(1, 2).contiguous(),
        "seq-major": lambda t: t[:, :, :h].permute(1, 0, 2, 3).contiguous().permute(1, 2, 0, 3),
    }
    for layout_name, to_layout in layouts.items():
        a, b, c = (to_layout(t) for t in (q, k, v))
        for name, kernel in kernels.items():
            try:
                ms = time_ms(lambda: kernel(a, b, c), args.warmup, args.iters, barrier=False)
                err = None
            except RuntimeError as e:
                ms, err = None, " ".join(str(e).split())[:200]
            emit(dict(impl="kernel", config=f"{name}/{layout_name}", seq=q.shape[1], heads_local=h, world=1,
                      median_ms=ms, err=err, **common))


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
    ap.add_argument("--configs", nargs="*", default=None, help="only these configurations (default: all)")
    ap.add_argument("--kernels", type=int, default=1, choices=[0, 1], help="also time the bare attention kernels")
    args = ap.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    maybe_init_distributed(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    common = dict(heads=args.heads, head_dim=args.head_dim, card=torch.cuda.get_device_name(device),
                  nccl_high_priority=os.environ.get("TORCH_NCCL_HIGH_PRIORITY", "0"),
                  date=datetime.date.today().isoformat(), torch=torch.__version__)
    for seq in args.seq:
        g = torch.Generator(device=device).manual_seed(seq)
        q, k, v = (torch.randn(1, seq, args.heads, args.head_dim, device=device, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        full = lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        ref, single_ms = full(), time_ms(full, args.warmup, args.iters)
        if rank == 0:
            emit(dict(impl="single-gpu-sdpa", config="-", seq=seq, world=1, median_ms=single_ms, **common))
        if rank == 0 and args.kernels:
            time_kernels(q, k, v, world, args, common)
        layout = SeqLayout.even(0, seq, world)
        mine = layout.image_slice(rank)
        local = [t[:, mine].contiguous() for t in (q, k, v)]
        for name, config in configurations(world):
            if args.configs is not None and name not in args.configs:
                continue
            config.build_mesh("cuda")
            out = usp_attention(*local, layout, config)
            err = ((out.float() - ref[:, mine].float()).norm() / ref[:, mine].float().norm()).item()
            call = lambda: usp_attention(*local, layout, config)
            ms = time_ms(call, args.warmup, args.iters)
            graph, _ = capture_graph(call)
            graph_ms = time_ms(graph.replay, args.warmup, args.iters)  # GPU time without host launch gaps
            if rank == 0:
                emit(dict(impl="fastusp", config=name, seq=seq, world=world, median_ms=ms, graph_ms=graph_ms,
                          rel_err=err, speedup_vs_single=single_ms / ms, **common))


if __name__ == "__main__":
    main()
