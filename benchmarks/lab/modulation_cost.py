"""What shared modulation (fastusp/modulation.py) takes off each rank: the AdaLN modulation of every block against
one rank's share, timed on one GPU; and, with --check, the whole model with it installed against without.

python benchmarks/lab/modulation_cost.py [--models flux,qwen-image] [--worlds 1,2,4] [--check]

Full-size FLUX / Qwen-Image blocks with random bf16 weights and one row of temb, as a denoising step has. Each variant
is captured in a CUDA graph (compile_pipeline's graphs run it so) and replayed; the median of --reps replays.
  every block     each block's modulation, as diffusers computes it inside the block (every rank did all of them)
  share W rank r  the blocks dealt to rank r of W, concatenated into the buffer the all-gather sends
The step waits for the slowest rank's share; the all-gather (a few MB) is not timed here (one GPU).
--check: the model's forward with shared modulation installed for a world of 1 (so no collective; the rank computes
every block's modulation before the first block and the blocks read theirs) and without, each compiled by
fastusp.compile_pipeline (Inductor and CUDA graphs): relative errors against the eager model as built, and the median
step of each (the same work: what the restructuring itself costs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness: benchmarks/
from step_latency import build_model, make_inputs  # noqa: E402


def fake_context(world: int, rank: int = 0):
    """What SharedModulation reads of a USPContext, for a sequence group of `world` ranks (no process group)."""
    return SimpleNamespace(config=SimpleNamespace(sequence_group=None, sequence_rank=rank, sequence_size=world))


def replay_ms(fn, reps: int) -> float:
    """Median ms of replaying a CUDA graph of fn()."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph (cuBLAS picks its kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def streams_of(model) -> dict:
    from fastusp.models.registry import spec_for

    return spec_for(model).modulated_streams


@torch.no_grad()
def time_shares(model, worlds: list[int], reps: int) -> list[dict]:
    from fastusp.modulation import _STREAM_KINDS, SharedModulation, modulated_blocks

    weight = next(model.parameters())
    temb = torch.randn(1, model.config.num_attention_heads * model.config.attention_head_dim, device=weight.device,
                       dtype=weight.dtype)
    blocks = modulated_blocks(model, streams_of(model))
    every = [m for _, modules in blocks for m in modules]
    records = [dict(variant="every block", ms=replay_ms(lambda: [_STREAM_KINDS[type(m)][1](m, temb) for m in every],
                                                         reps), blocks=len(blocks))]
    for world in worlds:
        shared = SharedModulation(model, streams_of(model), fake_context(world))
        for rank in range(world):
            records.append(dict(variant=f"share {world} rank {rank}", ms=replay_ms(lambda: shared.local(temb, rank),
                                                                                    reps),
                                blocks=len(shared.owned[rank])))
    return records


@torch.no_grad()
def check(name: str, steps: int, pairs: int) -> dict:
    """The compiled, graphed model without and with shared modulation (world 1), `pairs` times in turn: each one's
    relative error against the eager model as built, and the median ms of `steps` graph replays; each model is
    built and compiled anew."""
    import fastusp
    from fastusp.modulation import SharedModulation

    device = torch.device("cuda")
    inputs = make_inputs(name, device, torch.bfloat16, 1024, 1024, 512 if name == "flux" else 128, text_mask="none")
    result, reference = {}, None
    for pair, shared in [(p, s) for p in range(pairs) for s in (False, True)]:
        model = build_model(name, device, torch.bfloat16)
        if reference is None:
            reference = model(**inputs)[0].float()
        rel = lambda out: ((out.float() - reference).norm() / reference.norm()).item()
        key = ("shared" if shared else "plain") + (f" {pair + 1}" if pairs > 1 else "")
        if shared:
            SharedModulation(model, streams_of(model), fake_context(1)).install()
            result[f"{key} eager rel err"] = rel(model(**inputs)[0])
        fastusp.compile_pipeline(model)
        result[f"{key} compiled rel err"] = rel(model(**inputs)[0])  # captures the graph
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(**inputs)[0]
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        result[f"{key} replay rel err"] = rel(out)
        result[f"{key} step ms"] = statistics.median(times)
        result[f"{key} fell back"] = fastusp.compile_report(model).fell_back
        del model, out
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="flux,qwen-image")
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--check", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=1, help="--check: how many times to build both in turn")
    a = p.parse_args(argv)
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    for name in a.models.split(","):
        model = build_model(name, device, torch.bfloat16)
        for record in time_shares(model, [int(w) for w in a.worlds.split(",")], a.reps):
            print(json.dumps(dict(model=name, card=card, torch=torch.__version__, **record)), flush=True)
        del model
        torch.cuda.empty_cache()
        if a.check:
            print(json.dumps(dict(model=name, card=card, check=check(name, a.steps, a.pairs))), flush=True)


if __name__ == "__main__":
    main()
