"""What a fastusp processor needs besides its module: the parallel config and this forward's sequence layout."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

from .._forward import patch_attribute, record_change
from ..config import ParallelConfig
from ..sharding import SeqLayout


@dataclass
class USPContext:
    """Shared by one transformer's processors. `layout` is set by the sharded forward before the blocks run."""

    config: ParallelConfig
    layout: SeqLayout | None = None

    def current_layout(self) -> SeqLayout:
        if self.layout is None:
            raise RuntimeError("fastusp processor called outside a parallelized transformer forward")
        return self.layout

    @contextlib.contextmanager
    def forward_with(self, layout: SeqLayout):
        """The layout for the processors while a sharded forward runs (cleared after it, also when it raises)."""
        self.layout = layout
        try:
            yield layout
        finally:
            self.layout = None


def cached_call_signature(cls: type) -> type:
    """Class decorator for processors: store __call__'s signature on it.

    diffusers' attention forward calls inspect.signature(processor.__call__) on every call, to filter its kwargs;
    with the signature stored, inspect returns it instead of rebuilding it (45 -> 12 us per call on a 2-core CPU):
    host time on every layer of an eager step.
    """
    cls.__call__.__signature__ = inspect.signature(cls.__call__)
    return cls


class USPProcessor:
    """Base of fastusp's processors: each is made by fastusp.parallelize with its transformer's USPContext."""

    def __init__(self, context: USPContext | None = None):
        self.context = require_context(context, type(self))


def require_context(context: USPContext | None, processor_cls: type) -> USPContext:
    """Processors are made by fastusp.parallelize with the transformer's context. diffusers' adapter loaders
    (load_ip_adapter, unload_ip_adapter) rebuild the processors they find with no arguments: after parallelize that
    must fail clearly, not run fastusp's processor without its sharded forward."""
    if context is None:
        raise ValueError(f"{processor_cls.__name__} is made by fastusp.parallelize; load or unload adapters that "
                         f"change the attention processors (IP-Adapter) before calling fastusp.parallelize")
    return context


def apply_usp_processors(model, spec, context: USPContext) -> None:
    """Every attention layer of the model (a transformer, a ControlNet) gets fastusp's processor for it
    (spec.usp_processors), and later processor changes are refused."""
    original = model.attn_processors
    model.set_attn_processor(spec.usp_processors(model, context))
    record_change(model, lambda: model.set_attn_processor(original))
    _refuse_processor_changes(model)


def _refuse_processor_changes(model) -> None:
    """A processor set after parallelize (set_attn_processor, diffusers' unload_ip_adapter) would run diffusers'
    attention on this rank's tokens alone: refuse it rather than return a silently wrong image."""
    def set_attn_processor(processor):
        raise ValueError("this transformer is parallelized by fastusp: set attention processors, and load or unload "
                         "adapters that change them (IP-Adapter), before fastusp.parallelize")

    patch_attribute(model, "set_attn_processor", set_attn_processor)
