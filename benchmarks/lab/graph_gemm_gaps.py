"""Idle gaps before cuBLAS GEMMs inside a CUDA graph, on one GPU, with FLUX single-block shapes.

    python benchmarks/lab/graph_gemm_gaps.py TAG MODE...          MODE: linear | fused | nobias; TAG: a label
    M=4608 python benchmarks/lab/graph_gemm_gaps.py one-gpu linear            (tokens; default 2304 = 2 GPUs)
    CUBLASLT_WORKSPACE_SIZE=0 python benchmarks/lab/graph_gemm_gaps.py ws0 linear

Per MODE, a graph of R=20 blocks [layer_norm -> q, k, v GEMMs (one fused GEMM with `fused`; mm + bias add with
`nobias`) -> stand-in attention -> MLP GEMM + gelu -> cat -> proj_out GEMM] is replayed; prints the replay time per
block and, from one profiled replay, each kernel's mean idle gap before it and its mean duration. cuBLAS reads its
workspace size once per process: one process per environment. Results: benchmarks/results/2026-11-27-2xH200-cublaslt-workspace.md.
"""
import collections
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trace_exposure import chrome_trace, kernel_events  # noqa: E402  (the harness's trace arithmetic)

R = 20
D, MLP = 3072, 12288


def make_weights(device, dt=torch.bfloat16):
    """Random weights, drawn in the order the measured run drew them (after x)."""
    Wq, Wk, Wv = (torch.randn(D, D, device=device, dtype=dt) * 0.02 for _ in range(3))
    Wm = torch.randn(MLP, D, device=device, dtype=dt) * 0.02
    Wo = torch.randn(D, D + MLP, device=device, dtype=dt) * 0.02
    bq, bm, bo = (torch.randn(n, device=device, dtype=dt) for n in (D, MLP, D))
    return dict(Wq=Wq, Wk=Wk, Wv=Wv, Wqkv=torch.cat([Wq, Wk, Wv]), Wm=Wm, Wo=Wo, bq=bq, bm=bm, bo=bo,
                bqkv=torch.cat([bq, bq, bq]))


def block(h, w, mode):
    n = F.layer_norm(h, (D,))
    if mode == "fused":
        q, k, v = F.linear(n, w["Wqkv"], w["bqkv"]).chunk(3, -1)
    elif mode == "nobias":
        q, k, v = (torch.mm(n, W.t()) + w["bq"] for W in (w["Wq"], w["Wk"], w["Wv"]))
    else:
        q, k, v = (F.linear(n, W, w["bq"]) for W in (w["Wq"], w["Wk"], w["Wv"]))
    a = (q * k + v)  # stands in for attention
    m = F.gelu(F.linear(n, w["Wm"], w["bm"]), approximate="tanh")
    if mode == "nobias":
        return torch.mm(torch.cat([a, m], -1), w["Wo"].t()) + w["bo"] + h
    return F.linear(torch.cat([a, m], -1), w["Wo"], w["bo"]) + h


def gaps_by_kernel(trace: dict) -> dict:
    """{kernel name (first 70 chars): [(gap before it, its duration) in us, ...]}: the gap is measured from the end
    of the kernel that started before it (one stream, as in this script's graph); the first kernel has none."""
    gaps = collections.defaultdict(list)
    end = None
    for e in kernel_events(trace):
        if end is not None:
            gaps[e["name"][:70]].append((e["ts"] - end, e["dur"]))
        end = e["ts"] + e["dur"]
    return dict(gaps)


def run(tag, mode, x, w):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            y = x
            for _ in range(R):
                y = block(y, w, mode)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x
        for _ in range(R):
            y = block(y, w, mode)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / 20 / R
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        g.replay()
        torch.cuda.synchronize()
    trace = chrome_trace(p)
    busy = sum(e["dur"] for e in kernel_events(trace)) / 1e3 / R
    print(f"{tag} {mode:7s} M={x.shape[0]} replay {ms:.4f} ms/block, kernels busy {busy:.4f} ms/block")
    for n, v in sorted(gaps_by_kernel(trace).items(), key=lambda kv: -sum(g for g, _ in kv[1])):
        print(f"    gap {sum(g for g, _ in v) / len(v):6.2f} us  dur {sum(d for _, d in v) / len(v):7.2f} us  "
              f"x{len(v):3d}  {n}")


def main():
    tag, modes = sys.argv[1], sys.argv[2:]
    torch.manual_seed(0)
    x = torch.randn(int(os.environ.get("M", 2304)), D, device="cuda", dtype=torch.bfloat16)
    w = make_weights("cuda")
    for mode in modes:
        run(tag, mode, x, w)


if __name__ == "__main__":
    main()
