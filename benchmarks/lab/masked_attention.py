"""Masked attention as Ulysses leaves it, on one device: one call with the key bias, fastusp's
attention_text_keys_apart, and unmasked attention for reference; optionally cuDNN's time by head count.

python benchmarks/lab/masked_attention.py [--tokens 4224] [--text 128] [--cases 6:2 3:4 6:4] [--waves]
A case HEADS:RANKS lays the keys out as RANKS Ulysses ranks receive them, [text_0, image_0, text_1, image_1, ...],
with the last 5 text keys of rank 0 padded (all of them if it holds fewer). Each function is compiled (fullgraph,
static shapes) unless --no-compile; on CUDA the time is the median replay of a CUDA graph of 20 calls (the GPU time
a graphed step sees), per call. --waves adds cuDNN's unmasked kernel for 1..12 heads at --tokens (its time steps up
by whole waves).
One JSON record per line on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastusp.attention.local import attention, attention_text_keys_apart

CALLS = 20


def time_us(fn, device: torch.device) -> float:
    """Per-call time of fn: CUDA-graph replays of CALLS calls on CUDA, wall time elsewhere."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        return (time.perf_counter() - start) * 1e6 / CALLS
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def received_qkv(tokens: int, heads: int, head_dim: int, device, dtype) -> list[torch.Tensor]:
    """q, k, v [1, heads, tokens, head_dim] as views of one [tokens, 3, 1, heads, head_dim] buffer, the layout the
    Ulysses all-to-all leaves them in."""
    buf = torch.randn(tokens, 3, 1, heads, head_dim, device=device, dtype=dtype)
    return [buf[:, i].permute(1, 2, 0, 3) for i in range(3)]


def masked_case(heads: int, ranks: int, a) -> list[dict]:
    text, image = [a.text // ranks] * ranks, [(a.tokens - a.text) // ranks] * ranks
    q, k, v = received_qkv(sum(text) + sum(image), heads, a.head_dim, a.device, a.dtype)
    bias = torch.zeros(1, q.shape[2], device=a.device)
    bias[:, max(0, text[0] - 5):text[0]] = torch.finfo(torch.float32).min / 2
    fns = {"biased": lambda: attention(q, k, v, bias),
           "text_keys_apart": lambda: attention_text_keys_apart(q, k, v, bias, text, image),
           "unmasked": lambda: attention(q, k, v)}
    if a.compile:
        torch._dynamo.reset()
        fns = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in fns.items()}
    ref = fns["biased"]().float()
    records = []
    for name, fn in fns.items():
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        records.append(dict(bench="masked", kind=name, heads=heads, ranks=ranks, tokens=q.shape[2],
                            us=round(time_us(fn, a.device), 1), rel_err_vs_biased=round(err, 5)))
    return records


def waves(a) -> list[dict]:
    aten = torch.ops.aten
    records = []
    for heads in range(1, 13):
        q, k, v = received_qkv(a.tokens, heads, a.head_dim, a.device, a.dtype)
        us = time_us(lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, False), a.device)
        records.append(dict(bench="cudnn_waves", heads=heads, tokens=a.tokens, us=round(us, 1)))
    return records


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4224, help="text + image tokens of the whole sequence")
    ap.add_argument("--text", type=int, default=128)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--cases", nargs="+", default=["6:2", "3:4", "6:4"], metavar="HEADS:RANKS")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--waves", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    a.device = torch.device(a.device)
    a.dtype = torch.bfloat16 if a.device.type == "cuda" else torch.float32
    records = []
    for case in a.cases:
        heads, ranks = map(int, case.split(":"))
        records += masked_case(heads, ranks, a)
    if a.waves:
        records += waves(a)
    for r in records:
        print(json.dumps(dict(r, device=str(a.device), card=torch.cuda.get_device_name(a.device)
                              if a.device.type == "cuda" else "cpu", torch=torch.__version__)), flush=True)
    return records


if __name__ == "__main__":
    main()
