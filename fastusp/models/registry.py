"""The models fastusp supports: the only list of them. One line per model family: its diffusers transformer class,
the fastusp.models module that defines its `SPEC`, and the diffusers ControlNet classes fastusp shards for it.

Classes are named, not imported: diffusers loads a model's module on first use, and the model's fastusp module is
imported only when a transformer of its class is parallelized or compiled.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import diffusers

from .spec import ModelSpec


class Model(NamedTuple):
    transformer: str  # diffusers' transformer class
    module: str  # fastusp.models.<module> defines SPEC
    controlnets: tuple[str, ...] = ()  # diffusers' ControlNet classes that feed it, sharded like it


MODELS = (
    Model("FluxTransformer2DModel", "flux", controlnets=("FluxControlNetModel",)),
    Model("Flux2Transformer2DModel", "flux2"),
    Model("QwenImageTransformer2DModel", "qwen_image", controlnets=("QwenImageControlNetModel",)),
    Model("QwenImage21Transformer2DModel", "qwen_image21"),
)


def spec_for(transformer) -> ModelSpec | None:
    """The spec of the transformer's class (exactly that class, not a subclass); None for a class fastusp does not
    support."""
    cls = type(transformer)
    for model in MODELS:
        if cls.__name__ == model.transformer and cls is getattr(diffusers, model.transformer):
            return importlib.import_module(f"{__package__}.{model.module}").SPEC
    return None


def transformer_names() -> list[str]:
    return [model.transformer for model in MODELS]


def controlnet_names() -> list[str]:
    return [name for model in MODELS for name in model.controlnets]


def shards_controlnet(net) -> bool:
    """Whether fastusp shards this ControlNet (an instance of a listed class)."""
    return isinstance(net, tuple(getattr(diffusers, name) for name in controlnet_names()))
