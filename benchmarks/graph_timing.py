"""Kernel-level timing for the 1-GPU prototype scripts: a call captured `iters` times in one CUDA graph, so that
launch gaps do not count, and the best of `repeats` replays."""
import torch


def graph_time_us(fn, iters: int = 40, repeats: int = 7) -> float:
    """Microseconds per call of fn (after three warm-up calls), the best of `repeats` replays."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / iters)
    return best
