"""ControlNets sharded like the transformer they feed: same processors, same image-token split, residuals kept sharded.

A ControlNet is a smaller copy of the transformer's first blocks whose outputs (one residual per block, image tokens
only) the transformer adds to its own image tokens. Run whole on every rank it repeats a quarter of a one-GPU step
there (a FLUX ControlNet of 5 double and 10 single blocks). Sharded, each rank runs it on its own tokens, and since
its image tokens are split exactly as the transformer's, each rank's residuals are the rows its transformer adds:
they stay sharded, and the transformer's forward takes them as they are (apply_sequence_sharding's residual inputs).

FLUX ControlNet-Union prepends a mode token to the text inside its forward, on every rank. Each rank's text chunk
therefore starts with a copy of it; the copies of ranks other than the first are masked out as keys, so attention
sees exactly one mode token, as on one device (a copy's own output is only text, which no residual carries).
XLabs-style ControlNets (input_hint_block) embed a full control image inside the forward: their tokens are cut to
this rank's rows where they are embedded.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ._forward import replace_forward
from .config import ParallelConfig
from .modulation import apply_shared_modulation
from .processors.context import USPContext
from .sharding import SeqLayout

logger = logging.getLogger("fastusp")


def controlnets(pipe) -> list:
    """The pipeline's ControlNets: none, one, or a Multi-ControlNet's nets, each once (a Multi-ControlNet may use one
    net for several control images; it is sharded, compiled and graphed once)."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = [] if controlnet is None else getattr(controlnet, "nets", [controlnet])
    return list({id(net): net for net in nets}.values())


def apply_controlnet_sharding(pipe, config: ParallelConfig, spec) -> None:
    """Shard every ControlNet of the pipeline. spec: the ModelSpec of the transformer they feed."""
    for net in controlnets(pipe):
        shard_controlnet(net, config, spec)


def shard_controlnet(net, config: ParallelConfig, spec) -> None:
    """The transformer's sharding, minus the gather: its processors, its ModelSpec's inputs (plus the control
    tokens, without the residuals it takes), its RoPE rows, its blocks' modulation shared over the ranks."""
    from diffusers import FluxControlNetModel, QwenImageControlNetModel

    from .parallelize import (_refuse_processor_changes, _shard, _shard_qwen_rope, check_processors, shard_inputs,
                              usp_processors)

    if getattr(net, "_fastusp_config", None) is not None:
        return  # shared with a pipeline parallelized before (from_pipe)
    if not isinstance(net, (FluxControlNetModel, QwenImageControlNetModel)):  # still correct, just not sharded
        logger.warning("fastusp: %s runs whole on every rank (fastusp shards FluxControlNetModel and "
                       "QwenImageControlNetModel)", type(net).__name__)
        return
    check_processors(net, spec)
    context = USPContext(config)
    net.set_attn_processor(usp_processors(net, spec, context))
    _refuse_processor_changes(net)
    ranks, rank = config.sequence_size, config.sequence_rank
    if spec.rope_from_shapes:
        _shard_qwen_rope(net.pos_embed, context, rank)
    hint_block = getattr(net, "input_hint_block", None) is not None
    if hint_block:  # the control image becomes full-length tokens inside the forward: cut them there
        net.controlnet_x_embedder.register_forward_pre_hook(
            lambda module, args: (_shard(args[0], context.current_layout().image_slice(rank), -2),))
    cond = {} if hint_block else {"controlnet_cond": -2}
    net_spec = replace(spec, image_inputs={**spec.image_inputs, **cond}, residual_inputs={}, block_image_inputs=None)
    union = bool(getattr(net, "union", False))

    def prepare(inputs: dict) -> SeqLayout:
        layout = shard_inputs(inputs, net_spec, ranks, rank)
        if union:  # every rank's text chunk gets the mode token in front; only rank 0's copy is a key
            layout = _with_mode_token_copies(layout, inputs["hidden_states"])
        return layout

    _wrap(net, context, prepare)
    apply_shared_modulation(net, spec.modulated_streams, context)
    net._fastusp_config = config


def _wrap(net, context: USPContext, prepare) -> None:
    """Replace net.forward: prepare(inputs) shards the bound inputs in place and returns the layout; the original
    forward runs with it and its output (this rank's residuals) is returned as is."""
    def sharded(forward, inputs):
        with context.forward_with(prepare(inputs)):
            return forward(**inputs)

    replace_forward(net, sharded)


def _with_mode_token_copies(layout: SeqLayout, hidden: torch.Tensor) -> SeqLayout:
    """The layout with each rank's text one token longer (its copy of the mode token), and a key bias masking the
    copies of every rank but the first. FLUX ControlNets take no text mask, so there is no other bias to merge."""
    text = tuple(t + 1 for t in layout.text)
    keep = torch.ones(hidden.shape[0], sum(text), dtype=torch.bool, device=hidden.device)
    first = 0
    for t in text[:-1]:
        first += t
        keep[:, first] = False  # the next rank's first text token: its mode-token copy
    return SeqLayout(text, layout.image).with_text_mask(keep, hidden.dtype)
