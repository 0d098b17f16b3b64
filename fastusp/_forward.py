"""Replacing a diffusers model's forward (a transformer's, a ControlNet's) while keeping its call contract."""
from __future__ import annotations

import functools
import inspect

from diffusers.models.modeling_outputs import Transformer2DModelOutput


def replace_forward(module, run) -> None:
    """Replace module.forward by one that binds each call to the current forward's signature and returns
    run(forward, inputs) as it is (inputs: the bound arguments by name, return_dict included if given)."""
    forward = module.forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def replaced(*args, **kwargs):
        return run(forward, signature.bind(*args, **kwargs).arguments)

    module.forward = replaced


def wrap_forward(module, run_sample) -> None:
    """Replace a transformer's forward: run_sample(forward, inputs) (inputs without return_dict) gives the sample,
    returned as diffusers does: a Transformer2DModelOutput, or a 1-tuple for return_dict=False."""
    def run(forward, inputs):
        return_dict = inputs.pop("return_dict", True)
        sample = run_sample(forward, inputs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    replace_forward(module, run)
