"""Replacing a diffusers model's forward (a transformer's, a ControlNet's) while keeping its call contract.

Beneath an accelerate hook (diffusers' enable_model_cpu_offload puts one on each model of a pipeline), the forward
to replace is the one the hook calls, `_old_forward`: the pipeline removes its hooks after every call, which puts
`_old_forward` back as the model's forward, and adds them again. A replaced `forward` would be lost there, and
the hook still moves the weights to the GPU before anything of fastusp runs.

Beneath diffusers' own hooks (a cache such as First Block Cache, group offloading: a registry that chains hook
functions in front of the forward) is the module's own forward, the first link of the chain: compiled blocks go
there, so the hooks' Python (a cache's host-side decision) runs around the compiled code instead of breaking it.
"""
from __future__ import annotations

import functools
import inspect

from diffusers.models.modeling_outputs import Transformer2DModelOutput


def _forward_attribute(module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def forward_of(module):
    """The module's forward beneath any accelerate hook."""
    return getattr(module, _forward_attribute(module))


def set_forward(module, forward) -> None:
    """Make `forward` the module's forward beneath any accelerate hook."""
    setattr(module, _forward_attribute(module), forward)


def _first_link(module):
    links = getattr(getattr(module, "_diffusers_hook", None), "_fn_refs", None)
    return links[0] if links else None


def own_forward(module):
    """The module's own forward, beneath diffusers' hooks and any accelerate hook."""
    link = _first_link(module)
    if link is None:
        return forward_of(module)
    return link.original_forward if link.original_forward is not None else link.forward


def set_own_forward(module, forward) -> None:
    """Make `forward` the module's own forward, beneath diffusers' hooks (hooks added later wrap it too)."""
    link = _first_link(module)
    if link is None:
        set_forward(module, forward)
    elif link.original_forward is not None:
        link.original_forward = forward
    else:
        link.forward = forward


def replace_forward(module, run) -> None:
    """Replace the module's forward (beneath any accelerate hook) by one that binds each call to the current
    forward's signature and returns run(forward, inputs) as it is (inputs: the bound arguments by name,
    return_dict included if given)."""
    forward = forward_of(module)
    signature = inspect.signature(forward)

    @functools.wraps(forward)
    def replaced(*args, **kwargs):
        return run(forward, signature.bind(*args, **kwargs).arguments)

    set_forward(module, replaced)


def wrap_forward(module, run_sample) -> None:
    """Replace a transformer's forward: run_sample(forward, inputs) (inputs without return_dict) gives the sample,
    returned as diffusers does: a Transformer2DModelOutput, or a 1-tuple for return_dict=False."""
    def run(forward, inputs):
        return_dict = inputs.pop("return_dict", True)
        sample = run_sample(forward, inputs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    replace_forward(module, run)
