"""compile_pipeline(): regional torch.compile of the repeated transformer blocks, with CUDA graphs optional.

Why regional: the 19 + 38 FLUX blocks (60 Qwen-Image blocks) share one code object, so Dynamo/Inductor compile
each block kind once and every layer reuses it; whole-model compile spends minutes on the same work. The rest
of the forward (embeddings, sequence split/gather) stays eager: a few dozen kernels.

Ring attention cannot be traced (point-to-point sends), so inside a compiled block it runs as the opaque op
fastusp::ring_attention while Inductor compiles the rest. If compilation fails anyway, every block of the model
falls back to eager together (so all ranks keep issuing the same collectives), and the report says why.
Shapes: compiled code is guarded on shapes (dynamic=False), so a new resolution or text length recompiles, and
CUDA graphs are recorded per shape: a graph is never replayed for a shape it was not recorded for.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("fastusp")


@dataclass
class CompileReport:
    """What compile_pipeline did: regions compiled, what runs opaque or eager, and why."""

    mode: str
    compiled: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    fell_back: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"compiled {', '.join(self.compiled) or 'nothing'} (mode={self.mode})"]
        if self.opaque:
            parts.append(f"opaque to Inductor: {', '.join(self.opaque)}")
        for region, reason in self.fell_back.items():
            parts.append(f"fell back to eager: {region} ({reason})")
        return "fastusp: " + "; ".join(parts)


def compile_pipeline(obj, *, mode: str | None = None, cuda_graphs: bool | None = None, fullgraph: bool = True,
                     reorder_comm: bool = True, backend: str | object = "inductor"):
    """Compile a pipeline's (or a transformer's) repeated blocks in place; returns `obj`.

    mode: torch.compile mode; default "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere.
    cuda_graphs: shorthand to force CUDA graphs on (True) or off (False); overrides the default mode.
    reorder_comm: let Inductor reorder collectives against compute for overlap.
    The report is available as fastusp.compile_report(obj).
    """
    transformer = getattr(obj, "transformer", obj)
    mode = mode or _default_mode(transformer, cuda_graphs)
    report = CompileReport(mode=mode)
    config = getattr(transformer, "_fastusp_config", None)
    if config is not None and config.ring > 1:
        report.opaque.append("ring attention (fastusp::ring_attention custom op)")
    options = None
    if backend == "inductor":  # torch.compile takes mode or options, not both: spell the mode out as options
        options = dict(torch._inductor.list_mode_options(mode), reorder_for_compute_comm_overlap=reorder_comm)
    blocks = _repeated_blocks(transformer)
    fallback = _EagerFallback(report, blocks)
    for name, block in blocks:
        compiled = torch.compile(block._call_impl, fullgraph=fullgraph, dynamic=False, backend=backend,
                                 options=options)
        block._compiled_call_impl = fallback.guard(name, compiled, block)
    report.compiled = sorted({type(b).__name__ for _, b in blocks})
    transformer._fastusp_compile_report = report
    logger.info(report.summary())
    return obj


def compile_report(obj) -> CompileReport | None:
    """The CompileReport of a compiled pipeline or transformer (None if compile_pipeline was not applied)."""
    return getattr(getattr(obj, "transformer", obj), "_fastusp_compile_report", None)


def _default_mode(transformer, cuda_graphs: bool | None) -> str:
    if cuda_graphs is None:
        cuda_graphs = transformer.device.type == "cuda"
    return "reduce-overhead" if cuda_graphs else "default"


def _repeated_blocks(transformer) -> list[tuple[str, torch.nn.Module]]:
    kinds = set(getattr(transformer, "_repeated_blocks", None) or [])
    blocks = [(n, m) for n, m in transformer.named_modules() if type(m).__name__ in kinds]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks to compile")
    return blocks


class _EagerFallback:
    """Runs compiled blocks until one fails to compile, then runs every block eagerly and records why."""

    def __init__(self, report: CompileReport, blocks):
        self.report, self.blocks, self.failed = report, blocks, False

    def guard(self, name, compiled, block):
        def call(*args, **kwargs):
            if not self.failed:
                try:
                    return compiled(*args, **kwargs)
                except torch._dynamo.exc.TorchDynamoException as e:  # tracing/compiling, before anything ran
                    self._give_up(name, e)
            return block._call_impl(*args, **kwargs)

        return call

    def _give_up(self, name, error: Exception) -> None:
        self.failed = True
        for _, block in self.blocks:
            block._compiled_call_impl = None
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"  # one line for the log
        self.report.fell_back["all blocks"] = f"{name} failed to compile: {reason}"
        logger.warning(self.report.summary())
