"""One CUDA graph per input signature for a whole transformer forward.

A FLUX step launches thousands of kernels; once the work is split over several GPUs the host cannot launch them
as fast as the GPUs finish them. Replaying a captured graph launches the whole forward (collectives included)
at once. Graphs are keyed by everything that could change what the forward does: the structure of the inputs,
every tensor's shape, dtype, device and strides, and every non-tensor value. A call with a new key captures a
new graph; it never replays a graph recorded for other inputs. Tensor values are copied into the graph's static
inputs before each replay, so new latents, timesteps or prompts are fine.

Under NCCL the graphs are captured in memory from NCCL's own allocator (ncclMemAlloc). NCCL registers the buffers
of every collective it captures, and with that memory a captured all-to-all copies straight between the ranks'
tensors instead of staging through NCCL's buffers: 0.7-1.0 ms off a step (FLUX on 2 and 4 GPUs, Qwen-Image on 2;
benchmarks/results/2026-11-27-4xH200-x-y.md). Registering only the graphs' memory is the safe way: it belongs to
the graphs' private pool, so it is never freed and reused while a graph can still replay. Registering all of
torch's allocations instead (TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK) was as fast but gave a NaN once.
FASTUSP_NCCL_GRAPH_MEMORY=0 captures in torch's default graph pool instead.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

logger = logging.getLogger("fastusp")


class GraphedForward:
    """Wraps forward(**kwargs) -> a tensor or a pytree of them (a ControlNet's residual lists, a diffusers output
    class); replays a CUDA graph per input signature, up to `max_graphs`."""

    def __init__(self, forward, max_graphs: int = 8, warmup: int = 2):
        self.forward, self.max_graphs, self.warmup = forward, max_graphs, warmup
        self.graphs: dict = {}
        self.pool = None  # one memory pool for all graphs: graphs for other shapes reuse the memory
        self._nccl_pool = None  # owns the NCCL memory for as long as the graphs may replay from it

    def __call__(self, **kwargs):
        leaves, spec = pytree.tree_flatten(kwargs)
        key = _signature(leaves, spec)
        entry = self.graphs.get(key)
        if entry is None:
            if key is None or len(self.graphs) >= self.max_graphs:  # unhashable inputs, or too many shapes
                return self.forward(**kwargs)
            entry = self.graphs[key] = self._capture(leaves, spec)
        static_inputs, graph, static_output = entry
        for static, leaf in zip(static_inputs, leaves):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        graph.replay()
        # the next replay overwrites the static output
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, static_output)

    def _capture(self, leaves, spec):
        static_inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        if self.pool is None:
            self._nccl_pool = nccl_memory_pool()
            self.pool = self._nccl_pool.id if self._nccl_pool is not None else torch.cuda.graph_pool_handle()
        # fresh dicts and lists around the same static tensors for every warm-up and the capture: diffusers' FLUX
        # forward pops ip_adapter_image_embeds out of joint_attention_kwargs, so a reused dict would lose it
        run = lambda: self.forward(**pytree.tree_unflatten(static_inputs, spec))
        graph, static_output = capture_graph(run, self.warmup, self.pool)
        logger.info("fastusp: captured CUDA graph %d for new input shapes", len(self.graphs) + 1)
        return static_inputs, graph, static_output


def capture_graph(fn, warmup: int = 2, pool=None):
    """Capture one call of fn() as a CUDA graph; returns (graph, the call's output, rewritten by each replay).

    fn first runs `warmup` times on a side stream: compilation, NCCL communicator creation, library handles and
    caches happen there, since none of that may happen during capture.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread keeps polling while this thread captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph, output


def nccl_memory_pool():
    """A torch MemPool backed by NCCL's allocator, or None: when the default process group is not NCCL (or the
    torch build cannot allocate through it), or FASTUSP_NCCL_GRAPH_MEMORY=0. The memory serves any NCCL
    communicator of the process, so the mesh's subgroups benefit too."""
    if os.environ.get("FASTUSP_NCCL_GRAPH_MEMORY", "1") == "0" or not (dist.is_available() and dist.is_initialized()):
        return None
    if "nccl" not in str(dist.get_backend()):
        return None
    try:  # an NCCL built without ncclMemAlloc (< 2.19) raises here: then the default pool, as before
        backend = dist.group.WORLD._get_backend(torch.device("cuda", torch.cuda.current_device()))
        return torch.cuda.MemPool(backend.mem_allocator)
    except (AttributeError, RuntimeError) as e:
        logger.warning("fastusp: CUDA graphs stay in torch's memory, NCCL's allocator is unavailable: %s", e)
        return None


def _signature(leaves, spec):
    parts = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            parts.append(leaf)
        else:
            return None
    return tuple(parts)
