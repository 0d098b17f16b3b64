"""Replacing a diffusers transformer's forward while keeping its call contract."""
from __future__ import annotations

import functools
import inspect

from diffusers.models.modeling_outputs import Transformer2DModelOutput


def wrap_forward(module, run_sample) -> None:
    """Replace module.forward by one that binds each call to the current forward's signature, gets the sample from
    run_sample(forward, inputs) (inputs: the bound arguments without return_dict) and returns it as diffusers does:
    a Transformer2DModelOutput, or a 1-tuple for return_dict=False."""
    forward = module.forward
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        inputs = signature.bind(*args, **kwargs).arguments
        return_dict = inputs.pop("return_dict", True)
        sample = run_sample(forward, inputs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    module.forward = wrapped
