"""ModelSpec: what the generic code (parallelize, controlnet, compile) needs to know of one transformer class.

Plain data says where the forward's inputs live (text / image token axis, as a dim counted from the end) and which
attention processors fastusp replaces; hooks carry what only some models need (Qwen-Image's RoPE rows built from
shapes, Qwen-Image 2.1's joint sequence and its graphs of all blocks, FLUX's ControlNet variants). A hook left None
means the generic behaviour. Each model module of fastusp.models defines one `SPEC`; models/registry.py lists them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..sharding import SeqLayout


@dataclass(frozen=True)
class ControlNetSetup:
    """How a sharded ControlNet's forward is cut, beyond its transformer's spec: image_inputs are its own per-image-
    token inputs (the control image's tokens); adjust_layout(layout, inputs) -> the layout its attention uses (None:
    the layout as cut)."""

    image_inputs: dict[str, int]
    adjust_layout: Callable[[SeqLayout, dict], SeqLayout] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One transformer class, for fastusp."""

    # diffusers' attention processors (by class name) -> fastusp's, made with the context; layers with the same
    # diffusers processor share one instance
    processors: dict[str, type]
    text_inputs: dict[str, int] = field(default_factory=dict)
    image_inputs: dict[str, int] = field(default_factory=dict)
    # ControlNet residuals: full length, or already this rank's image tokens (from a sharded ControlNet)
    residual_inputs: dict[str, int] = field(default_factory=dict)
    # diffusers adapter processors (by class name) -> fastusp's version, made from the loaded one and the context
    adapter_processors: dict[str, Callable] | None = None
    # the forward's text padding mask ([B, S_text], 1 = keep): sharded as a key bias, and what
    # compile_pipeline(text_bucket=...) pads behind
    text_mask: str | None = None
    # without a text mask: why text_bucket cannot pad this model's prompts (the end of compile_pipeline's error)
    no_text_mask: str = "does not take"
    # forward inputs fastusp does not shard -> what they are for: a call that sets one raises, rather than run
    # diffusers' per-position code on this rank's tokens alone
    refused_inputs: dict[str, str] | None = None
    # how many tokens the forward returns for these inputs (the image tokens unless set): cfg=2 makes a skipped
    # pass's placeholder from it
    output_tokens: Callable[[dict], int] | None = None
    # block class name -> its AdaLN modulation modules, one per stream, each taking `temb` (modulation.py)
    modulated_streams: dict[str, tuple[str, ...]] | None = None
    # whether Ring runs as fastusp's pipelined ring op (opaque to Inductor); False: the model's processors gather
    # the other ring chunks' keys instead
    ring_op: bool = True

    # Hooks, each given the module and its USPContext (fastusp.processors.context):
    # shard_internals(transformer, context): before the forward is wrapped, shard what the forward builds itself
    # from full shapes (per-token tables, per-token block inputs) to this rank's tokens
    shard_internals: Callable | None = None
    # shard_sequence(transformer, context): the model shards its forward itself, in place of cutting the inputs by
    # the token axes above (a forward that builds its joint sequence from whole inputs)
    shard_sequence: Callable | None = None
    # controlnet_setup(net, context) -> ControlNetSetup, for a ControlNet feeding this model (None: its
    # controlnet_cond is its image tokens' control input)
    controlnet_setup: Callable | None = None
    # cuda_graphs(transformer, report): compile_pipeline's CUDA graphs for a model whose forward cannot be captured
    # whole (None: one graph of the whole forward)
    cuda_graphs: Callable | None = None

    def output_tokens_of(self, inputs: dict) -> int:
        return self.output_tokens(inputs) if self.output_tokens else inputs["hidden_states"].shape[1]

    def check_processors(self, model) -> None:
        """Raise unless every attention processor of the model is one fastusp replaces."""
        supported = {*self.processors, *(self.adapter_processors or {})}
        others = {type(p).__name__ for p in model.attn_processors.values()} - supported
        if others:
            raise NotImplementedError(f"attention processors {sorted(others)} are not supported; fastusp replaces "
                                      f"diffusers' {', '.join(sorted(supported))}")

    def usp_processors(self, model, context) -> dict:
        """fastusp's processor for each of the model's attention layers (layer name -> processor); a layer with an
        adapter's processor (FLUX IP-Adapter) gets fastusp's version of it, which keeps the adapter's weights."""
        shared = {kind: cls(context) for kind, cls in self.processors.items()}
        adapters = self.adapter_processors or {}
        processors = {}
        for name, processor in model.attn_processors.items():
            kind = type(processor).__name__
            processors[name] = adapters[kind](processor, context) if kind in adapters else shared[kind]
        return processors
