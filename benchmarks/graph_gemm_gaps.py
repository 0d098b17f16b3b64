"""Idle gaps before cuBLAS GEMMs inside a CUDA graph, on one GPU, with FLUX single-block shapes.

    python benchmarks/graph_gemm_gaps.py TAG MODE...          MODE: linear | fused | nobias; TAG: a label
    M=4608 python benchmarks/graph_gemm_gaps.py one-gpu linear            (tokens; default 2304 = 2 GPUs)
    CUBLASLT_WORKSPACE_SIZE=0 python benchmarks/graph_gemm_gaps.py ws0 linear

Per MODE, a graph of R=20 blocks [layer_norm -> q, k, v GEMMs (one fused GEMM with `fused`; mm + bias add with
`nobias`) -> stand-in attention -> MLP GEMM + gelu -> cat -> proj_out GEMM] is replayed; prints the replay time per
block and, from one profiled replay, each kernel's mean idle gap before it and its mean duration. cuBLAS reads its
workspace size once per process: one process per environment. Results: benchmarks/results/2026-11-27-2xH200-n-*.
"""
import json, os, sys, collections
import torch
import torch.nn.functional as F

M = int(os.environ.get("M", 2304))
R = 20
dev = "cuda"
torch.manual_seed(0)
dt = torch.bfloat16
D, MLP = 3072, 12288
x = torch.randn(M, D, device=dev, dtype=dt)
Wq, Wk, Wv = (torch.randn(D, D, device=dev, dtype=dt) * 0.02 for _ in range(3))
Wqkv = torch.cat([Wq, Wk, Wv])
Wm = torch.randn(MLP, D, device=dev, dtype=dt) * 0.02
Wo = torch.randn(D, D + MLP, device=dev, dtype=dt) * 0.02
bq = torch.randn(D, device=dev, dtype=dt); bm = torch.randn(MLP, device=dev, dtype=dt); bo = torch.randn(D, device=dev, dtype=dt)
bqkv = torch.cat([bq, bq, bq])

def block(h, mode):
    n = F.layer_norm(h, (D,))
    if mode == "fused":
        q, k, v = F.linear(n, Wqkv, bqkv).chunk(3, -1)
    elif mode == "nobias":
        q, k, v = (torch.mm(n, W.t()) + bq for W in (Wq, Wk, Wv))
    else:
        q, k, v = (F.linear(n, W, bq) for W in (Wq, Wk, Wv))
    a = (q * k + v)  # stands in for attention
    m = F.gelu(F.linear(n, Wm, bm), approximate="tanh")
    if mode == "nobias":
        return torch.mm(torch.cat([a, m], -1), Wo.t()) + bo + h
    return F.linear(torch.cat([a, m], -1), Wo, bo) + h

def run(mode):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            y = x
            for _ in range(R): y = block(y, mode)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x
        for _ in range(R): y = block(y, mode)
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20): g.replay()
    e1.record(); torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / 20 / R
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        g.replay(); torch.cuda.synchronize()
    p.export_chrome_trace("/tmp/gg.json")
    ev = sorted((e for e in json.load(open("/tmp/gg.json"))["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    gaps = collections.defaultdict(list)
    end = None
    for e in ev:
        if end is not None:
            gaps[e["name"][:70]].append((e["ts"] - end, e["dur"]))
        end = e["ts"] + e["dur"]
    busy = sum(e["dur"] for e in ev) / 1e3 / R
    print(f"{tag} {mode:7s} M={M} replay {ms:.4f} ms/block, kernels busy {busy:.4f} ms/block")
    for n, v in sorted(gaps.items(), key=lambda kv: -sum(g for g, _ in kv[1])):
        print(f"    gap {sum(g for g,_ in v)/len(v):6.2f} us  dur {sum(d for _,d in v)/len(v):7.2f} us  x{len(v):3d}  {n}")

tag = sys.argv[1]
for mode in sys.argv[2:]:
    run(mode)
