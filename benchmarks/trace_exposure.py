"""Which all-to-alls are exposed, and where the GPU idles, in a kernel trace of `step_latency.py --profile N`.

python benchmarks/trace_exposure.py $OUT/trace-flux-w2-fastusp-u2r1-c1.json.gz --steps 2 --per-layer 4
Numbers each step's NCCL kernels in launch order, and sums, per position modulo --per-layer (Ulysses, two head
chunks: 0, 1 = q/k/v of chunk 0, 1; 2, 3 = outputs of chunk 0, 1), their GPU time and the part of it with no other
kernel running. Collectives beyond the whole layers of a step (the final gather) are reported as "rest".
--idle instead sums the time no kernel runs at all, by the kernel that ends each idle gap (CUDA-graph replays
leave gaps of ~0.5 us between most kernels, and much longer ones before some).
--peers TRACE... (the other ranks' traces of the same run) instead says, per position, how long each rank's
collective kernels wait for the last rank to arrive: an exposed collective is transfer plus that wait.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import statistics
import tempfile


def merged_intervals(intervals) -> list[list[float]]:
    """(start, end) pairs -> the sorted, non-overlapping [start, end] spans that cover them."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def chrome_trace(prof) -> dict:
    """A finished torch.profiler profile as the chrome-trace dict its export writes."""
    with tempfile.TemporaryDirectory() as tmp:  # read back by name: the export may replace the file it writes
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


def kernel_events(trace: dict) -> list[dict]:
    """The trace's GPU kernels (with a duration), in start order."""
    return sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e),
                  key=lambda e: e["ts"])


def exposure_by_position(trace: dict, steps: int, per_layer: int) -> dict:
    """{position: {"calls", "ms", "exposed_ms"}} per step; position "rest" for calls past the last whole layer."""
    kernels = kernel_events(trace)
    nccl = [e for e in kernels if "nccl" in e["name"].lower()]
    compute = merged_intervals((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower())
    starts = [s for s, _ in compute]

    def hidden(s, e):
        total, i = 0.0, max(0, bisect.bisect_right(starts, s) - 1)
        while i < len(compute) and compute[i][0] < e:
            total += max(0.0, min(e, compute[i][1]) - max(s, compute[i][0]))
            i += 1
        return total

    per_step = len(nccl) // steps
    layers = per_step // per_layer
    out: dict = {}
    for i, e in enumerate(nccl[:per_step * steps]):
        k = i % per_step
        key = k % per_layer if k < layers * per_layer else "rest"
        row = out.setdefault(key, {"calls": 0, "ms": 0.0, "exposed_ms": 0.0})
        row["calls"] += 1 / steps
        row["ms"] += e["dur"] / 1e3 / steps
        row["exposed_ms"] += (e["dur"] - hidden(e["ts"], e["ts"] + e["dur"])) / 1e3 / steps
    return {k: {n: round(v, 3) for n, v in row.items()} for k, row in out.items()}


def idle_by_next_kernel(trace: dict, steps: int, max_gap_us: float = 1000.0) -> dict:
    """{kernel name (first 60 chars): {"gaps", "ms", "avg_us"}} per step, for the gaps when no kernel runs on any
    stream; gaps longer than max_gap_us (between profiled steps) are left out."""
    kernels = kernel_events(trace)
    out: dict = {}
    busy_until = kernels[0]["ts"] if kernels else 0.0
    for e in kernels:
        gap = e["ts"] - busy_until
        if 0 < gap <= max_gap_us:
            row = out.setdefault(e["name"][:60], {"gaps": 0, "ms": 0.0})
            row["gaps"] += 1 / steps
            row["ms"] += gap / 1e3 / steps
        busy_until = max(busy_until, e["ts"] + e["dur"])
    rows = sorted(out.items(), key=lambda kv: -kv[1]["ms"])
    return {name: {"gaps": round(r["gaps"], 3), "ms": round(r["ms"], 3), "avg_us": round(r["ms"] * 1e3 / r["gaps"], 1)}
            for name, r in rows}


def wait_by_position(traces: list[dict], steps: int, per_layer: int) -> dict:
    """Every rank's trace of the same profiled steps -> {position: {"transfer_us", "wait_us": [per rank]}}, medians.

    A collective's kernels end together on every rank, so a kernel that runs longer than the shortest one of the
    same collective spent the difference waiting for the last rank to arrive: no clock alignment across processes
    is needed. transfer_us is the shortest kernel of each call. Medians, because the first collective of a profile
    waits for the other processes to start profiling (20 ms in one FLUX trace: a mean over 114 calls read 205 us)."""
    per_rank = [[e for e in kernel_events(t) if "nccl" in e["name"].lower()] for t in traces]
    per_step = min(len(n) for n in per_rank) // steps
    layers = per_step // per_layer
    rows: dict = {}
    for i in range(per_step * steps):
        k = i % per_step
        key = k % per_layer if k < layers * per_layer else "rest"
        durs = [n[i]["dur"] for n in per_rank]
        rows.setdefault(key, []).append((min(durs), [d - min(durs) for d in durs]))
    return {k: {"calls_per_step": len(r) / steps, "transfer_us": round(statistics.median(t for t, _ in r), 1),
                "wait_us": [round(statistics.median(w[j] for _, w in r), 1) for j in range(len(per_rank))]}
            for k, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, required=True, help="the --profile N of the run")
    ap.add_argument("--per-layer", type=int, default=4, help="collectives per layer (Ulysses, 2 chunks: 4)")
    ap.add_argument("--idle", action="store_true", help="idle time by the kernel that ends each gap, instead")
    ap.add_argument("--peers", nargs="+", metavar="TRACE",
                    help="the other ranks' traces of the same steps (...-rank1.json.gz): instead, how long each "
                         "rank's collective kernels wait for the last rank to arrive")
    a = ap.parse_args()
    traces = []
    for path in [a.trace] + (a.peers or []):
        with gzip.open(path, "rt") as f:
            traces.append(json.load(f))
    if a.peers:
        out = wait_by_position(traces, a.steps, a.per_layer)
    elif a.idle:
        out = idle_by_next_kernel(traces[0], a.steps)
    else:
        out = exposure_by_position(traces[0], a.steps, a.per_layer)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
