"""One CUDA graph per input signature for a whole transformer forward.

A FLUX step launches thousands of kernels; once the work is split over several GPUs the host cannot launch them
as fast as the GPUs finish them. Replaying a captured graph launches the whole forward (collectives included)
at once. Graphs are keyed by everything that could change what the forward does: the structure of the inputs,
every tensor's shape, dtype, device and strides, and every non-tensor value. A call with a new key captures a
new graph; it never replays a graph recorded for other inputs. Tensor values are copied into the graph's static
inputs before each replay, so new latents, timesteps or prompts are fine.

A graph also bakes in the model as it was at capture: which modules run, where their weights live, and the
Python numbers adapters keep on modules (a LoRA's scale, which adapters are active, merged or disabled; an
IP-Adapter's scale). ModelState notices when any of that changes (load_lora_weights, set_adapters, fuse_lora,
unload_lora_weights, set_ip_adapter_scale, .to()) and the graphs are dropped and captured again; replaying them
would silently run the old model.

Under NCCL the graphs are captured in memory from NCCL's own allocator (ncclMemAlloc). NCCL registers the buffers
of every collective it captures, and with that memory a captured all-to-all copies straight between the ranks'
tensors instead of staging through NCCL's buffers: 0.7-1.0 ms off a step (FLUX on 2 and 4 GPUs, Qwen-Image on 2;
benchmarks/results/2026-11-27-4xH200-cfg-parallel-nccl-graph-memory.md). Registering only the graphs' memory is the safe way: it belongs to
the graphs' private pool, so it is never freed and reused while a graph can still replay. Registering all of
torch's allocations instead (TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK) was as fast but gave a NaN once.
FASTUSP_NCCL_GRAPH_MEMORY=0 captures in torch's default graph pool instead.

NCCL's communicators cannot shut down while a captured graph still holds their collectives: destroy_process_group()
hung after any graphed forward, in torch's memory pool as in NCCL's (2xH200, torch 2.11). So every graph is dropped
first, when a process group shuts down (ProcessGroup.shutdown, which destroy_process_group calls, is wrapped once a
GraphedForward exists) and at interpreter exit; a later call on the model captures again.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import weakref

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .config import on_device

logger = logging.getLogger("fastusp")


class GraphedForward:
    """Wraps forward(**kwargs) -> a tensor or a pytree of them (a ControlNet's residual lists, a diffusers output
    class); replays a CUDA graph per input signature, up to `max_graphs`."""

    def __init__(self, forward, model: torch.nn.Module | None = None, max_graphs: int = 8, warmup: int = 2):
        self.forward, self.max_graphs, self.warmup = forward, max_graphs, warmup
        self.model_state = ModelState(model) if model is not None else None
        self.graphs: dict = {}
        self.pool = None  # one memory pool for all graphs: graphs for other shapes reuse the memory
        self._nccl_pool = None  # owns the NCCL memory for as long as the graphs may replay from it
        _GRAPHED.add(self)
        _release_graphs_before_process_group_teardown()

    def __call__(self, **kwargs):
        leaves, spec = pytree.tree_flatten(kwargs)
        with _on_inputs_gpu(leaves):
            return self._run(leaves, spec, kwargs)

    def _run(self, leaves, spec, kwargs):
        """Replay the graph for these inputs: captured first if new, the eager forward where none may be kept."""
        if self.model_state is not None and self.model_state.changed() and self.graphs:
            logger.info("fastusp: the model changed (modules, weights or adapter settings): recapturing its CUDA graphs")
            self.graphs.clear()  # their memory goes back to the pool, for the new captures
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

    def release(self) -> None:
        """Drop every graph and their memory; the next call captures again."""
        self.graphs.clear()
        self.pool = self._nccl_pool = None

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


def graphed_or_eager(graphed_forward: GraphedForward, report, region: str):
    """call(inputs, eager): the graphed forward on inputs, or eager() when autograd records or capture failed; a
    failure is noted in report.fell_back[region] (a compile.CompileReport) and logged."""
    state = {"graphed": graphed_forward}

    def call(inputs: dict, eager):
        if torch.is_grad_enabled() or state["graphed"] is None:  # graphs are for inference only
            return eager()
        try:
            return state["graphed"](**inputs)
        except RuntimeError as e:
            if "captur" not in str(e).lower():  # only capture failures fall back; real errors propagate
                raise
            state["graphed"] = None
            report.fell_back[region] = " ".join(str(e).split())[:300]
            logger.warning(report.summary())
            return eager()

    return call


_GRAPHED: weakref.WeakSet = weakref.WeakSet()
_TEARDOWN_WRAPPED = False


def release_all_graphs() -> None:
    """Drop the CUDA graphs of every GraphedForward, so that NCCL's communicators can shut down."""
    for graphed in list(_GRAPHED):
        graphed.release()


def _release_graphs_before_process_group_teardown() -> None:
    """Release the graphs before any process group shuts down, and at exit.

    destroy_process_group shuts each group down through ProcessGroup.shutdown (torch 2.11-2.15), so that method is
    wrapped: it covers every way in, a script that imported destroy_process_group by name before fastusp built a
    graph included (`from torch.distributed import destroy_process_group`, as torch's DDP tutorial writes). atexit
    callbacks run before the interpreter's teardown destroys the process groups left alive."""
    global _TEARDOWN_WRAPPED
    if _TEARDOWN_WRAPPED or not dist.is_available():
        return
    shutdown = dist.ProcessGroup.shutdown

    @functools.wraps(shutdown)
    def release_graphs_then_shutdown(self, *args, **kwargs):
        release_all_graphs()
        return shutdown(self, *args, **kwargs)

    dist.ProcessGroup.shutdown = release_graphs_then_shutdown
    atexit.register(release_all_graphs)
    _TEARDOWN_WRAPPED = True


def _on_inputs_gpu(leaves):
    """Capture and replay on the GPU the inputs are on: captured on another device, the forward's kernels would run
    outside the capture and every replay would return the capture's output."""
    device = next((leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.is_cuda), None)
    return contextlib.nullcontext() if device is None else on_device(device)


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
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), _pinned_host_data() as host_buffers:
        output = fn()
    graph.fastusp_host_buffers = host_buffers  # every replay copies from them: they live as long as the graph
    return graph, output


@contextlib.contextmanager
def _pinned_host_data():
    """While capturing, torch.tensor(data, device=<cuda>) and torch.as_tensor(data, device=<cuda>) stage Python data
    in pinned host memory.

    Both build a CUDA tensor from Python data by copying from pageable memory, which capture refuses, so without this
    any such call fails the capture: diffusers' Qwen-Image-Edit-2511 forward builds modulate_index so, from
    img_shapes, and every Qwen-Image forward given a text mask builds torch.as_tensor(text_seq_len, device=...) (in
    compute_text_seq_len_from_mask; a parallelized forward never calls it, a plain one fell back from graphs). A
    copy from pinned memory can be captured; each replay repeats it from the same buffer, so the values are those
    computed at capture, like every Python value a graph bakes in (img_shapes is part of the key).
    Only calls that would otherwise fail change (other threads see the patch too while it lasts; their copies then
    come from pinned memory, with the same result). Patched on torch itself, not on the model's module: Dynamo
    guards the module's globals, and replacing its `torch` would recompile the compiled blocks in mid-capture.
    """
    reals, buffers = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}, []

    def staged(name):
        real = reals[name]

        def make(data, *args, device=None, **kwargs):
            on_gpu = device is not None and torch.device(device).type == "cuda"
            if not on_gpu or (isinstance(data, torch.Tensor) and data.is_cuda):
                return real(data, *args, device=device, **kwargs)
            host = real(data, *args, **kwargs).pin_memory()
            buffers.append(host)
            return host.to(device, non_blocking=True)

        return make

    for name in reals:
        setattr(torch, name, staged(name))
    try:
        yield buffers
    finally:
        for name, real in reals.items():
            setattr(torch, name, real)


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


class ModelState:
    """Tells whether a module changed, since the last call, in a way a captured graph would not follow:
    - a module, parameter or buffer registered anywhere inside it (LoRA layers injected or removed, a processor set),
      seen by torch's global registration hooks, filtered to this module's own submodules;
    - a parameter or buffer moved to other memory (.to(), a merge that reallocates);
    - an adapter setting changed: a PEFT layer's active / disabled / merged adapters and scales, an IP-Adapter
      processor's scales.
    - weights that were away from the GPU when the call began: enable_model_cpu_offload keeps them on the CPU between
      pipeline calls, and its hook brings them back inside the call.
    Ranks must agree (a capture runs collectives: one rank capturing alone would hang), so the first, third and last
    need no memory addresses: they are what each rank's code did to its model. The data-pointer check is the
    exception: weights reallocated twice between two calls might land back at their old addresses on one rank and not
    on another. One `.to()` cannot do that (its new tensors exist before the old ones are freed); an offloaded model's
    return to the GPU can, hence the last check.
    Costs a data-pointer check of every weight per call (C++ under CUDA; ~1,200 tensors for FLUX).
    """

    def __init__(self, module: torch.nn.Module):
        self.module, self.registrations = module, 0
        self._snapshot()
        _install_registration_hooks()
        _STATES.add(self)
        # a forward pre-hook runs before the forward, so before an offload hook (which wraps the forward) moves weights
        module.register_forward_pre_hook(self._note_weights_away)

    def changed(self) -> bool:
        if self.weights_were_away or self.registrations != self._registrations_seen or not self._same_data_ptrs() \
                or not _same_settings(self._settings(), self.settings):
            self._snapshot()
            return True
        return False

    def _note_weights_away(self, module, args) -> None:
        if _device_of(module) != self.device:
            self.weights_were_away = True

    def owns(self, module: torch.nn.Module) -> bool:
        ref = self.members.get(id(module))
        return ref is not None and ref() is module  # the weakref: an id can be reused once its module is gone

    def _snapshot(self) -> None:
        modules = list(self.module.modules())
        self.members = {id(m): weakref.ref(m) for m in modules}
        weights = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        self.tensors = [t for t in weights if not is_traceable_wrapper_subclass(t)]
        self.data_ptrs = [t.data_ptr() for t in self.tensors]
        # a quantized weight (torchao's Float8Tensor) is a wrapper whose own data_ptr is 0: its inner tensors, looked
        # up again at every check (moving it replaces them), hold the memory a graph reads
        self.wrappers = [t for t in weights if is_traceable_wrapper_subclass(t)]
        self.wrapper_ptrs = _inner_data_ptrs(self.wrappers)
        self.device = _device_of(self.module)
        self.weights_were_away = False
        self.indices = list(range(len(self.tensors)))
        self.adapters = [m for m in modules if _adapter_settings(m) is not None]
        self.settings = self._settings()
        self._registrations_seen = self.registrations

    def _settings(self) -> list:
        return [_adapter_settings(m) for m in self.adapters]

    def _same_data_ptrs(self) -> bool:
        check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # CUDA builds; as Inductor's graphs
        if check is not None:
            same = check(self.tensors, self.data_ptrs, self.indices)
        else:
            same = all(t.data_ptr() == p for t, p in zip(self.tensors, self.data_ptrs))
        return same and (not self.wrappers or _inner_data_ptrs(self.wrappers) == self.wrapper_ptrs)


def _inner_data_ptrs(wrappers: list[torch.Tensor]) -> list[int]:
    """The data pointers of tensor subclasses' inner tensors (recursively), in order."""
    ptrs = []
    for tensor in wrappers:
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            ptrs.extend(_inner_data_ptrs([inner]) if is_traceable_wrapper_subclass(inner) else [inner.data_ptr()])
    return ptrs


def _device_of(module: torch.nn.Module) -> torch.device | None:
    first = next(module.parameters(), None)  # offloading moves all of them together
    return first.device if first is not None else None


_STATES: weakref.WeakSet = weakref.WeakSet()
_HOOKS_INSTALLED = False


def _install_registration_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return

    def registered(module, name, value):
        for state in list(_STATES):
            if state.owns(module):
                state.registrations += 1

    from torch.nn.modules import module as nn_module

    nn_module.register_module_module_registration_hook(registered)
    nn_module.register_module_parameter_registration_hook(registered)
    nn_module.register_module_buffer_registration_hook(registered)
    _HOOKS_INSTALLED = True


def _adapter_settings(module):
    """The Python values a module's adapters read in forward (None for a module without adapters)."""
    if hasattr(module, "to_k_ip") and isinstance(getattr(module, "scale", None), list):  # an IP-Adapter processor
        return ("ip-adapter", *module.scale)
    if hasattr(module, "merged_adapters") and hasattr(module, "active_adapters"):  # a PEFT tuner layer (LoRA ...)
        scaling = getattr(module, "scaling", {})
        return ("peft", tuple(module.active_adapters), bool(module.disable_adapters), tuple(module.merged_adapters),
                *(item for name in sorted(scaling) for item in (name, _plain(scaling[name]))))
    return None


def _plain(value):
    """A scale as a comparable value; a tensor (PEFT's hotswap keeps scales so) as _TensorScale."""
    return _TensorScale(value) if isinstance(value, torch.Tensor) else value


class _TensorScale:
    """Equal while it is the same tensor, not modified in place since (that bumps its version). Holds the tensor:
    compared by id, a new one could reuse a freed one's id."""

    __slots__ = ("tensor", "version")
    __hash__ = None

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def __eq__(self, other) -> bool:
        return isinstance(other, _TensorScale) and other.tensor is self.tensor and other.version == self.version


def _same_settings(now: list, before: list) -> bool:
    """Equal, floats within 1e-9: diffusers scales a LoRA for one call (joint_attention_kwargs["scale"]) by
    multiplying and dividing, which can leave the last bit different; that must not recapture every call."""
    if len(now) != len(before):
        return False
    for a, b in zip(now, before):
        if a == b:
            continue
        if a is None or b is None or len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if x != y and not (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, rel_tol=1e-9)):
                return False
    return True


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
