"""fastusp's CUDA-graph capture replaced for CPU tests (capture needs CUDA).

A captured "graph" is its call on the static inputs; a replay calls it again and copies the result into the static
output, which is what a real replay leaves there. Given a model fingerprint, each replay first asserts that the
model is still the one the graph was captured from: a real graph would replay the old model.
"""
from __future__ import annotations

from types import SimpleNamespace


def fake_cuda_graphs(counts: dict, fingerprint=None) -> None:
    """Patch fastusp.cuda_graphs in this process: call it in a forked worker (run_distributed), where the patch dies
    with the worker. counts["captures"] and counts["replays"] are kept up to date. fingerprint: a function of nothing
    that describes the model (compared with ==)."""
    from torch.utils import _pytree as pytree

    from fastusp import cuda_graphs

    counts.setdefault("captures", 0)
    counts.setdefault("replays", 0)

    def capture_graph(fn, warmup, pool):
        counts["captures"] += 1
        captured = fingerprint() if fingerprint else None
        static_output = fn()

        def replay():
            counts["replays"] += 1
            if fingerprint:
                assert fingerprint() == captured, "a graph replayed on a changed model"
            for static, new in zip(pytree.tree_leaves(static_output), pytree.tree_leaves(fn())):
                static.copy_(new)

        return SimpleNamespace(replay=replay), static_output

    cuda_graphs.capture_graph = capture_graph
    cuda_graphs.nccl_memory_pool = lambda: SimpleNamespace(id=0)


def compile_as_on_cuda(transformer, backend=None, text_bucket=None):
    """What compile_pipeline(transformer, backend=...) does on CUDA, with graphs on (it refuses graphs on a CPU
    transformer): call fake_cuda_graphs first. Returns the compile report."""
    from fastusp import compile as fastusp_compile

    report = fastusp_compile.CompileReport(mode="default", cuda_graphs=True, text_bucket=text_bucket)
    fastusp_compile.compile_transformer(transformer, report, regional=True, reorder_comm=True, backend=backend)
    return report
