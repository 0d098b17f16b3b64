"""compile_pipeline(): regional torch.compile of the repeated transformer blocks, plus whole-forward CUDA graphs.

Why regional: the 19 + 38 FLUX blocks (60 Qwen-Image blocks) share one code object, so Dynamo/Inductor compile
each block kind once and every layer reuses it; whole-model compile spends minutes on the same work.
Why our own CUDA graphs instead of mode="reduce-overhead": Inductor's CUDA-graph trees record one graph per
compiled region, and with one region replayed 57 times per step, a replay overwrites outputs the next block
still reads ("accessing tensor output of CUDAGraphs that has been overwritten", seen on H200). One graph of the
whole forward (fastusp.cuda_graphs) launches the entire step at once and has no such hazard.

Ring attention cannot be traced (point-to-point sends), so inside a compiled block it runs as the opaque op
fastusp::ring_attention while Inductor compiles the rest. If compilation fails anyway, every block falls back to
eager together (so all ranks keep issuing the same collectives), and the report says why; likewise a forward
that cannot be captured runs without CUDA graphs. Compiled code is guarded on shapes (dynamic=False) and graphs
are keyed by input shapes, so a new resolution or text length recompiles / recaptures instead of reusing; a model
changed after capture (a LoRA loaded, scaled, fused or unloaded) is captured again (cuda_graphs.ModelState).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.utils.torch_utils import get_module_execution_device

from ._forward import forward_of, is_fastusp_hook, own_forward, replace_forward, set_own_forward, wrap_forward
from .caches import FirstBlockCacheGraphs, is_first_block_cache_hook
from .controlnet import controlnets
from .cuda_graphs import GraphedForward, graphed_or_eager
from .gemm_rewrites import GemmRewrites
from .models.registry import spec_for

logger = logging.getLogger("fastusp")

_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# what a fullgraph compile raises past Dynamo's recompile_limit (so named in torch 2.11 to 2.15; () catches nothing)
_RECOMPILE_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


@dataclass
class CompileReport:
    """What compile_pipeline did: regions compiled, what runs opaque or eager, and why."""

    mode: str
    cuda_graphs: bool = False
    graphs_of: str = "whole-forward"  # or "all-blocks" (a model's own graphs: ModelSpec.cuda_graphs)
    text_bucket: int | None = None
    compiled: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    fell_back: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        what = f"compiled {', '.join(self.compiled)} (inductor mode={self.mode}, " if self.compiled else \
            "compiled nothing (eager kernels, "
        parts = [what + f"{self.graphs_of} CUDA graphs={'on' if self.cuda_graphs else 'off'})"]
        if self.text_bucket:
            parts.append(f"prompts padded to multiples of {self.text_bucket} tokens")
        if self.opaque:
            parts.append(f"opaque to Inductor: {', '.join(self.opaque)}")
        for region, reason in self.fell_back.items():
            parts.append(f"fell back: {region} ({reason})")
        return "fastusp: " + "; ".join(parts)


def compile_pipeline(obj, *, mode: str = "default", cuda_graphs: bool | None = None, regional: bool = True,
                     reorder_comm: bool = True, backend: str | object = "inductor", text_bucket: int | None = None):
    """Compile a pipeline's (or a transformer's) forward in place; returns `obj`. Parallelized or not.

    mode: Inductor mode for the compiled regions ("default", "max-autotune-no-cudagraphs").
    cuda_graphs: capture the whole transformer forward as one CUDA graph per input shape (default: on CUDA); under
        diffusers' First Block Cache, two per input shape and cache context, the cache deciding between them.
    regional: compile each repeated block once (default) instead of the whole transformer (slow to compile).
        A pipeline's ControlNets have their blocks compiled either way (they are the transformer's block kinds), and
        with cuda_graphs each ControlNet's forward is captured as graphs of its own.
    reorder_comm: turn on Inductor's reorder_for_compute_comm_overlap. Its list of passes is empty by default
        in torch 2.11 to 2.15, so this reorders nothing unless you set
        torch._inductor.config.reorder_for_compute_comm_overlap_passes; the overlap fastusp relies on comes from
        the order in which its own code issues collectives and waits for them (attention/usp.py).
    backend: torch.compile's backend; None skips torch.compile and only captures CUDA graphs of the eager
        forward (no compile time; removes the host launch overhead that bounds an eager step on several GPUs).
    text_bucket: Qwen-Image: pad each prompt to a multiple of this many tokens, the padding masked out as keys (the
        output is unchanged), so that prompts of different lengths share compiled code and graphs instead of each
        length compiling its own (seconds each; past Dynamo's recompile_limit the blocks run eagerly). For servers
        with varied prompts; every step then pays for the text mask. None (default): no padding.
    The report is available as fastusp.compile_report(obj). A pipeline made with from_pipe shares the compiled
    transformer: calling compile_pipeline on it compiles only its new ControlNets (this call's backend, the first
    call's mode, graphs and text_bucket settings) and raises if it has none.
    """
    if mode in _CUDA_GRAPH_MODES:
        raise ValueError(f"mode={mode!r} makes Inductor record CUDA graphs per region, which breaks with repeated "
                         f"blocks; use cuda_graphs=True (whole-forward graphs) with mode='default'")
    transformer = getattr(obj, "transformer", obj)
    on_cuda = get_module_execution_device(transformer).type == "cuda"  # an offloaded model's GPU, not the CPU
    use_graphs = on_cuda if cuda_graphs is None else cuda_graphs
    if use_graphs and not on_cuda:
        raise ValueError("cuda_graphs=True needs the transformer on a CUDA device")
    if use_graphs:
        for model in [transformer, *controlnets(obj)]:
            _check_weights_stay_put(model)
    if backend is None and not use_graphs:
        raise ValueError("backend=None compiles nothing, so it needs CUDA graphs (a CUDA transformer)")
    if text_bucket is not None:
        _check_text_bucket(transformer, text_bucket)
    new_controlnets = [net for net in controlnets(obj) if not getattr(net, "_fastusp_compiled", False)]
    report = getattr(transformer, "_fastusp_compile_report", None)
    if report is None:
        report = CompileReport(mode=mode, cuda_graphs=use_graphs, text_bucket=text_bucket)
        compile_transformer(transformer, report, regional, reorder_comm, backend)
        transformer._fastusp_compile_report = report
    elif not new_controlnets:
        raise ValueError("compile_pipeline was already applied to this transformer (a pipeline made with from_pipe "
                         "shares it, compiled: nothing more to do)")
    # a ControlNet pipeline made with from_pipe from a compiled one gets here with only its ControlNets to do
    compile_controlnets(new_controlnets, transformer, report, reorder_comm, backend)
    logger.info(report.summary())
    return obj


def compile_report(obj) -> CompileReport | None:
    """The CompileReport of a compiled pipeline or transformer (None if compile_pipeline was not applied)."""
    return getattr(getattr(obj, "transformer", obj), "_fastusp_compile_report", None)


def compile_transformer(transformer, report: CompileReport, regional: bool, reorder_comm: bool, backend) -> None:
    """Its repeated blocks (or the whole of it) compiled, then its forward graphed, as report.cuda_graphs says, and
    prompts padded to report.text_bucket tokens on their way in."""
    config, spec = getattr(transformer, "_fastusp_config", None), spec_for(transformer)
    if config is not None and config.ring > 1 and spec.ring_op:
        report.opaque.append("ring attention (fastusp::ring_attention custom op)")
    if backend is not None:
        regions = _repeated_blocks(transformer) if regional else [("transformer", transformer)]
        apply_compile(regions, report, reorder_comm, backend)
        report.compiled = sorted({type(m).__name__ for _, m in regions})
    slot = getattr(transformer, "_fastusp_forward_slot", transformer)
    if report.cuda_graphs and spec is not None and spec.cuda_graphs is not None:
        spec.cuda_graphs(transformer, report)  # the model's own graphs, for a forward that cannot be captured whole
    elif report.cuda_graphs:
        # beneath cfg parallelism's wrapper, if any: which guidance pass a group runs is not captured
        apply_cuda_graphs(slot, transformer, report)
    if report.text_bucket is not None:
        # above the graphs: they are keyed by the padded shapes
        apply_text_buckets(slot, transformer, report.text_bucket)


def compile_controlnets(nets, transformer, report: CompileReport, reorder_comm: bool, backend) -> None:
    """A pipeline's ControlNets: their blocks (the transformer's block kinds) compiled, their forwards graphed as
    report.cuda_graphs says and their prompts padded as report.text_bucket says, each net once (a later pipeline
    sharing it leaves it alone)."""
    if backend is not None and nets:
        regions = [(f"{type(net).__name__}: {name}", m) for net in nets
                   for name, m in _blocks_of_kinds(net, transformer._repeated_blocks)]
        apply_compile(regions, report, reorder_comm, backend)
        report.compiled += sorted({f"{type(net).__name__} blocks" for net in nets} - set(report.compiled))
    for net in nets:
        if report.cuda_graphs:
            apply_controlnet_cuda_graphs(net, report)
        if report.text_bucket is not None:  # a ControlNet takes the transformer's prompt inputs
            apply_text_buckets(net, transformer, report.text_bucket)
        net._fastusp_compiled = True


_SPMD_CHECK = "aten_distributed_optimizations.spmd_check"


def _inductor_options(mode: str, reorder_comm: bool) -> dict:
    """torch.compile takes a mode or options, not both: the mode spelled out as options, plus ours (among them
    gemm_rewrites' pass)."""
    options = dict(torch._inductor.list_mode_options(mode), reorder_for_compute_comm_overlap=reorder_comm)
    # Off: once gemm_rewrites had removed the MLPs' copies, with Inductor's peak-memory reorder the second head
    # chunk's q/k/v exchange started only after the first chunk's attention, and the exchanges no longer overlapped
    # attention (FLUX u2r1, 2xH200: 76.9 ms with it, 74.5 without; peak memory 22.35 GB either way). A block's
    # activations are small beside the weights: the memory it could save is not worth the order it costs.
    options["reorder_for_peak_memory"] = False
    if _SPMD_CHECK in torch._inductor.config.get_config_copy():
        # Off: Inductor's check that every rank traced the same graph (torch 2.12 runs it whenever
        # reorder_for_compute_comm_overlap is on) gathers a hash on the default group while compiling. Ranks of an
        # uneven token split trace different shapes by design: each block printed a mismatch report, and a FLUX
        # ring compile deadlocked (one rank waiting in the check, the other, fallen back to eager, sending ring
        # chunks).
        options[_SPMD_CHECK] = False
    if torch._inductor.config.pre_grad_custom_pass is None:  # a user's own pass is left in place, without ours
        options["pre_grad_custom_pass"] = GemmRewrites()
    return options


def apply_compile(regions, report: CompileReport, reorder_comm: bool, backend) -> None:
    """torch.compile each (name, module) region in place (fullgraph, except a whole transformer); if one fails to
    compile, all of these regions run eagerly."""
    options = _inductor_options(report.mode, reorder_comm) if backend == "inductor" else None
    fallback = _EagerFallback(report)
    for name, module in regions:
        if name == "transformer":  # its call with fastusp's wrappers in it, graph breaks allowed
            compiled = torch.compile(module._call_impl, dynamic=False, backend=backend, options=options)
            module._compiled_call_impl = fallback.guard(name, compiled, module._call_impl)
            continue
        # a block: its own forward, beneath diffusers' hooks (caches), whose host-side Python stays eager
        eager = own_forward(module)
        compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=backend, options=options)
        set_own_forward(module, fallback.guard(name, compiled, eager))


def apply_cuda_graphs(slot, transformer, report: CompileReport) -> None:
    """Replace the forward of slot (the transformer, or the slot that cfg parallelism calls) by one that replays a
    CUDA graph of the whole forward per input signature, captured again when the transformer changes. Under
    diffusers' First Block Cache, two graphs per signature and cache context, one per decision (caches.py)."""
    forward = forward_of(slot)
    cache_graphs = FirstBlockCacheGraphs(transformer, _sequence_group(transformer))
    sample = cache_graphs.forced(lambda **kw: forward(**kw, return_dict=False)[0])
    graphed = graphed_or_eager(GraphedForward(sample, transformer), report, "cuda graphs")
    transformer._fastusp_cache_graphs = cache_graphs

    def run(original, inputs):
        cache = getattr(transformer, "_cache_config", None)
        if cache is None:
            return graphed(inputs, lambda: original(**inputs, return_dict=False)[0])
        if not isinstance(cache, FirstBlockCacheConfig):
            raise ValueError(f"{type(cache).__name__} is enabled on {type(transformer).__name__}, whose forward is "
                             f"replayed from CUDA graphs: a replay would not run the cache. Of diffusers' caches only "
                             f"First Block Cache runs under fastusp's graphs; for the others call "
                             f"compile_pipeline(..., cuda_graphs=False)")
        return cache_graphs(inputs, lambda branch_inputs: graphed(branch_inputs, lambda: sample(**branch_inputs)))

    wrap_forward(slot, run)


def _sequence_group(transformer):
    """The group the sharded forward shares cache decisions over (None: not parallelized, or one rank per sequence):
    the same group, or share_cache_decisions would patch the cache's hook anew on every call."""
    config = getattr(transformer, "_fastusp_config", None)
    return config.shared_sequence_group if config is not None else None


def apply_text_buckets(slot, transformer, bucket: int) -> None:
    """Pad the text inputs of slot's forward (the transformer's, or a ControlNet's) to a multiple of `bucket` tokens
    with zeros, and the text mask (all ones where none was given) with zeros: padded tokens are never attended to as
    keys, and only image tokens come out (the sample, a ControlNet's residuals), so the output is the unpadded one."""
    spec = _text_mask_spec(transformer)

    def padded(forward, inputs):
        text = inputs.get("encoder_hidden_states")
        if text is not None:  # a mask even where no padding is needed: one input structure for every length
            extra = -text.shape[1] % bucket
            mask = inputs.get(spec.text_mask)
            if mask is None:
                mask = torch.ones(text.shape[:2], dtype=torch.long, device=text.device)
            inputs[spec.text_mask] = torch.nn.functional.pad(mask, (0, extra))
            for name, dim in spec.text_inputs.items():
                if inputs.get(name) is not None:
                    inputs[name] = _pad_tokens(inputs[name], dim, extra)
        return forward(**inputs)

    replace_forward(slot, padded)


def _pad_tokens(tensor: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    pad = [0, 0] * (-dim - 1) + [0, extra]  # F.pad lists dims from the last one
    return torch.nn.functional.pad(tensor, pad)


def _text_mask_spec(transformer):
    spec = spec_for(transformer)
    if spec is None or spec.text_mask is None:
        reason = "does not take" if spec is None else spec.no_text_mask
        raise ValueError(f"text_bucket pads prompts behind a text mask, which {type(transformer).__name__} {reason}")
    return spec


def _check_text_bucket(transformer, bucket) -> None:
    if not isinstance(bucket, int) or isinstance(bucket, bool) or bucket < 1:
        raise ValueError(f"text_bucket must be an integer >= 1, got {bucket!r}")
    _text_mask_spec(transformer)


def apply_controlnet_cuda_graphs(net, report: CompileReport) -> None:
    """The same for a ControlNet, whose forward returns its residuals (lists of tensors, or diffusers' output
    class): outside the transformer's graph, it would launch its blocks' kernels one by one."""
    graphed = graphed_or_eager(GraphedForward(forward_of(net), net), report, f"cuda graphs ({type(net).__name__})")
    replace_forward(net, lambda forward, inputs: graphed(inputs, lambda: forward(**inputs)))


def _check_weights_stay_put(model) -> None:
    """A CUDA graph replays with the weights at the addresses they had at capture. enable_model_cpu_offload moves a
    whole model before its forward starts, so the graphs see the move and are captured again (ModelState). Hooks on
    its modules (enable_sequential_cpu_offload, diffusers' group offloading or caches) change weights or decide what
    runs inside the forward, where a replay would not follow; First Block Cache's are the exception (its decision
    is taken between graphs, caches.FirstBlockCacheGraphs)."""
    # a registry without hooks is harmless: diffusers gives the transformer one in every pipeline call (cache_context);
    # fastusp's own hooks only wrap forwards
    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if any(not (is_first_block_cache_hook(h) or is_fastusp_hook(h))
                     for h in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).values())
              or (m is not model and hasattr(m, "_hf_hook"))]
    if hooked:
        shown = ", ".join(hooked[:3]) + (", ..." if len(hooked) > 3 else "")
        raise ValueError(
            f"{type(model).__name__} has hooks on its modules ({shown}): sequential CPU offload, group offloading or "
            f"a cache other than First Block Cache, which move weights or choose blocks during the forward, where a "
            f"CUDA graph would replay the first call's; use pipe.enable_model_cpu_offload() or none, or pass "
            f"cuda_graphs=False")


def _repeated_blocks(transformer) -> list[tuple[str, torch.nn.Module]]:
    blocks = _blocks_of_kinds(transformer, getattr(transformer, "_repeated_blocks", None) or [])
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks to compile")
    return blocks


def _blocks_of_kinds(model, kinds) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every submodule whose class name is in kinds."""
    kinds = set(kinds)
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in kinds]


class _EagerFallback:
    """Runs compiled regions until one fails to compile, then runs every region eagerly and records why.

    Code is compiled per input shape (dynamic=False) and per model state (Dynamo guards on the modules and their
    Python values: a LoRA loaded, scaled or fused is a new state), and Dynamo keeps at most
    torch._dynamo.config.recompile_limit (8) versions per block kind; with fullgraph it then raises instead of
    running. Such a call runs eagerly (every rank sees the same shapes and states, so every rank does), versions
    compiled before stay compiled, and the report says so.
    """

    def __init__(self, report: CompileReport):
        self.report, self.failed = report, False

    def guard(self, name, compiled, eager):
        @functools.wraps(eager)  # a block's forward keeps its signature for code that inspects it
        def call(*args, **kwargs):
            if not self.failed:
                try:
                    return compiled(*args, **kwargs)
                except _RECOMPILE_LIMIT_HIT:  # raised before anything ran, as below
                    self._note_recompile_limit()
                except torch._dynamo.exc.TorchDynamoException as e:  # tracing/compiling, before anything ran
                    self._give_up(name, e)
            return eager(*args, **kwargs)

        return call

    def _note_recompile_limit(self) -> None:
        if "recompile limit" not in self.report.fell_back:
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            self.report.fell_back["recompile limit"] = (
                f"Dynamo's recompile_limit ({limit}) versions of the blocks are compiled, one per input shape or "
                f"model state (each LoRA change is a new state); blocks run eagerly for any other (raise "
                f"torch._dynamo.config.recompile_limit to compile more)")
            logger.warning(self.report.summary())

    def _give_up(self, name, error: Exception) -> None:
        self.failed = True
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"  # one line for the log
        self.report.fell_back["all blocks"] = f"{name} failed to compile: {reason}"
        logger.warning(self.report.summary())
