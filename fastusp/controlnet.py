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

import functools
import inspect
import logging

import torch

from .config import ParallelConfig
from .processors.context import USPContext
from .sharding import SeqLayout, key_bias_from_text_mask

logger = logging.getLogger("fastusp")


def controlnets(pipe) -> list:
    """The pipeline's ControlNets: none, one, or a Multi-ControlNet's nets."""
    controlnet = getattr(pipe, "controlnet", None)
    return [] if controlnet is None else list(getattr(controlnet, "nets", [controlnet]))


def apply_controlnet_sharding(pipe, config: ParallelConfig, make_processor) -> None:
    """Shard every ControlNet of the pipeline. make_processor(context) -> the attention processor for this model
    family."""
    for net in controlnets(pipe):
        shard_controlnet(net, config, make_processor)


def shard_controlnet(net, config: ParallelConfig, make_processor) -> None:
    from diffusers import FluxControlNetModel, QwenImageControlNetModel

    from .parallelize import _refuse_processor_changes

    if getattr(net, "_fastusp_config", None) is not None:
        return  # shared with a pipeline parallelized before (from_pipe)
    if not isinstance(net, (FluxControlNetModel, QwenImageControlNetModel)):  # still correct, just not sharded
        logger.warning("fastusp: %s runs whole on every rank (fastusp shards FluxControlNetModel and "
                       "QwenImageControlNetModel)", type(net).__name__)
        return
    context = USPContext(config)
    net.set_attn_processor(make_processor(context))
    _refuse_processor_changes(net)
    if isinstance(net, FluxControlNetModel):
        _shard_flux_controlnet(net, context)
    else:
        _shard_qwen_controlnet(net, context)
    net._fastusp_config = config


def _wrap(net, context: USPContext, prepare) -> None:
    """Replace net.forward: prepare(inputs) shards the bound inputs in place and returns the layout; the original
    forward runs with it and its output (this rank's residuals) is returned as is."""
    forward = net.forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def sharded(*args, **kwargs):
        inputs = signature.bind(*args, **kwargs).arguments
        context.layout = prepare(inputs)
        try:
            return forward(**inputs)
        finally:
            context.layout = None

    net.forward = sharded


def _narrow(value: torch.Tensor, index: slice, dim: int = -2) -> torch.Tensor:
    return value.narrow(dim, index.start, index.stop - index.start)


def _shard_flux_controlnet(net, context: USPContext) -> None:
    config = context.config
    ranks, rank = config.sequence_size, config.sequence_rank
    union = bool(net.union)

    def prepare(inputs: dict) -> SeqLayout:
        hidden = inputs["hidden_states"]
        layout = SeqLayout.even(inputs["encoder_hidden_states"].shape[1], hidden.shape[1], ranks)
        text_rows = layout.text_slice(rank)
        for name in ("encoder_hidden_states", "txt_ids"):  # txt_ids: 2D (tokens, 3), or deprecated 3D
            inputs[name] = _narrow(inputs[name], text_rows)
        image_rows = layout.image_slice(rank)
        for name in ("hidden_states", "img_ids"):
            inputs[name] = _narrow(inputs[name], image_rows)
        if net.input_hint_block is None:
            inputs["controlnet_cond"] = _narrow(inputs["controlnet_cond"], image_rows)
        if union:  # every rank's text chunk gets the mode token in front; only rank 0's copy is a key
            layout = SeqLayout(tuple(t + 1 for t in layout.text), layout.image)
            layout = SeqLayout(layout.text, layout.image, _mode_token_copies_bias(layout, hidden))
        return layout

    if net.input_hint_block is not None:  # the control image becomes full-length tokens inside the forward
        net.controlnet_x_embedder.register_forward_pre_hook(
            lambda module, args: (_narrow(args[0], context.current_layout().image_slice(rank)),))
    _wrap(net, context, prepare)


def _mode_token_copies_bias(layout: SeqLayout, hidden: torch.Tensor) -> torch.Tensor:
    """Key bias in the global key order masking the first text token of every rank but the first."""
    keep = torch.ones(hidden.shape[0], sum(layout.text), dtype=torch.bool, device=hidden.device)
    first = 0
    for t in layout.text[:-1]:
        first += t
        keep[:, first] = False  # the next rank's first text token: its mode-token copy
    return key_bias_from_text_mask(keep, layout.text, layout.image, hidden.dtype)


def _shard_qwen_controlnet(net, context: USPContext) -> None:
    from .parallelize import _shard_qwen_rope

    config = context.config
    ranks, rank = config.sequence_size, config.sequence_rank
    _shard_qwen_rope(net.pos_embed, context, rank)

    def prepare(inputs: dict) -> SeqLayout:
        hidden, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
        layout = SeqLayout.even(text.shape[1], hidden.shape[1], ranks)
        mask = inputs.get("encoder_hidden_states_mask")
        if mask is not None:  # carried by the key bias, as in the transformer
            layout = SeqLayout(layout.text, layout.image,
                               key_bias_from_text_mask(mask, layout.text, layout.image, hidden.dtype))
            inputs["encoder_hidden_states_mask"] = None
        inputs["encoder_hidden_states"] = _narrow(text, layout.text_slice(rank))
        for name in ("hidden_states", "controlnet_cond"):
            inputs[name] = _narrow(inputs[name], layout.image_slice(rank))
        return layout

    _wrap(net, context, prepare)
