"""ControlNets sharded like the transformer they feed: same processors, same image-token split, residuals kept sharded.

A ControlNet is a smaller copy of the transformer's first blocks whose outputs (one residual per block, image tokens
only) the transformer adds to its own image tokens. Run whole on every rank it repeats a quarter of a one-GPU step
there (a FLUX ControlNet of 5 double and 10 single blocks). Sharded, each rank runs it on its own tokens, and since
its image tokens are split exactly as the transformer's, each rank's residuals are the rows its transformer adds:
they stay sharded, and the transformer's forward takes them as they are (apply_sequence_sharding's residual inputs).

What differs between ControlNet classes (inputs embedded inside the forward, extra tokens) is the model's:
ModelSpec.controlnet_setup.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ._forward import patch_attribute, replace_forward
from .config import ParallelConfig
from .models import registry
from .models.spec import ControlNetSetup, ModelSpec
from .modulation import apply_shared_modulation
from .processors.context import USPContext, apply_usp_processors
from .sharding import SeqLayout, shard_inputs

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


def shard_controlnet(net, config: ParallelConfig, spec: ModelSpec) -> None:
    """The transformer's sharding, minus the gather: its processors, its ModelSpec's inputs (plus the control
    tokens, without the residuals it takes), what the model's controlnet_setup cuts inside the forward, its blocks'
    modulation shared over the ranks."""
    if getattr(net, "_fastusp_config", None) is not None:
        return  # shared with a pipeline parallelized before (from_pipe)
    if not registry.shards_controlnet(net):  # still correct, just not sharded
        logger.warning("fastusp: %s runs whole on every rank (fastusp shards %s)", type(net).__name__,
                       " and ".join(registry.controlnet_names()))
        return
    spec.check_processors(net)
    context = USPContext(config)
    apply_usp_processors(net, spec, context)
    setup = (spec.controlnet_setup(net, context) if spec.controlnet_setup is not None
             else ControlNetSetup(image_inputs={"controlnet_cond": -2}))
    net_spec = replace(spec, image_inputs={**spec.image_inputs, **setup.image_inputs}, residual_inputs={})
    ranks, rank = config.sequence_size, config.sequence_rank

    def prepare(inputs: dict) -> SeqLayout:
        layout = shard_inputs(inputs, net_spec, ranks, rank)
        return layout if setup.adjust_layout is None else setup.adjust_layout(layout, inputs)

    _wrap(net, context, prepare)
    apply_shared_modulation(net, spec.modulated_streams, context)
    patch_attribute(net, "_fastusp_config", config)


def _wrap(net, context: USPContext, prepare) -> None:
    """Replace net.forward: prepare(inputs) shards the bound inputs in place and returns the layout; the original
    forward runs with it and its output (this rank's residuals) is returned as is."""
    def sharded(forward, inputs):
        with context.forward_with(prepare(inputs)):
            return forward(**inputs)

    replace_forward(net, sharded)
