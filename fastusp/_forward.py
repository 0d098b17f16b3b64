"""Every change fastusp makes to a diffusers object, made so that it can be undone (fastusp.unparallelize).

Three ways, each recording its undo on the object it belongs to (`undo_changes`):
- hook_forward(module, run): the module's forward wrapped, as a diffusers ModelHook in the module's HookRegistry
  (the registry diffusers' own caches, group offloading and context parallelism use): each call runs
  run(forward, *args, **kwargs), `forward` being what the module ran before. wrap_forward, replace_forward and
  pre_forward_hook are its shapes for fastusp's uses.
- patch_attribute(obj, name, value): any other attribute (a pipeline's prepare_latents or progress_bar, a
  scheduler's step, fastusp's own settings on a model; set_forward: a forward replaced, not wrapped).
- wrap_call(pipe, wrapper): `pipe(...)` runs through wrappers. Python looks `__call__` up on the class, so the
  pipeline gets a subclass of its own class (same name) whose `__call__` runs the wrappers around the original one.

Beneath an accelerate hook (diffusers' enable_model_cpu_offload puts one on each model of a pipeline), the forward
to wrap is the one the hook calls, `_old_forward`: the pipeline removes its hooks after every call, which puts
`_old_forward` back as the model's forward, and adds them again. A forward wrapped outside the hook would be lost
there, and the hook still moves the weights to the GPU before anything of fastusp runs.

Beneath diffusers' hooks (a cache such as First Block Cache, group offloading, fastusp's own) is the module's own
forward, the first link of the chain: compiled blocks go there (own_forward, set_own_forward), so the hooks' Python
(a cache's host-side decision) runs around the compiled code instead of breaking it.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

_CHANGES = "_fastusp_changes"  # on each changed object: [(order, undo)], undone newest first
_ORDER = itertools.count()


def record_change(owner, undo) -> None:
    """Note undo() as the way back from a change that belongs to owner (a module, pipeline or scheduler)."""
    owner.__dict__.setdefault(_CHANGES, []).append((next(_ORDER), undo))


def has_changes(owner) -> bool:
    return bool(owner.__dict__.get(_CHANGES))


def undo_changes(owners) -> None:
    """Undo every change recorded on these objects, newest first across all of them (a later change may build on
    an earlier one of another object)."""
    owners = list({id(o): o for o in owners}.values())
    changes = sorted((change for owner in owners for change in owner.__dict__.get(_CHANGES, [])),
                     key=lambda change: change[0], reverse=True)
    for owner in owners:
        owner.__dict__.pop(_CHANGES, None)
    for _, undo in changes:
        undo()


_ABSENT = object()


def patch_attribute(obj, name: str, value, owner=None) -> None:
    """Set obj.name = value, recording on owner (default obj) how to put back what was there (or nothing)."""
    old = obj.__dict__.get(name, _ABSENT)
    setattr(obj, name, value)

    def undo():
        if old is _ABSENT:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, old)

    record_change(obj if owner is None else owner, undo)


class FastUSPHook(ModelHook):
    """fastusp's wrapper of a module's forward in diffusers' HookRegistry: run(forward, *args, **kwargs) is called in
    place of the forward beneath it."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def new_forward(self, module, *args, **kwargs):
        return self.run(self.fn_ref.original_forward, *args, **kwargs)


def is_fastusp_hook(hook) -> bool:
    return isinstance(hook, FastUSPHook)


def _has_accelerate_hook(module) -> bool:
    return hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")


@contextlib.contextmanager
def _beneath_accelerate(module):
    """While inside, module.forward is the forward an accelerate hook calls (its `_old_forward`): diffusers'
    registry wraps or unwraps that one, and the accelerate hook stays outermost."""
    if not _has_accelerate_hook(module):
        yield
        return
    outer = module.forward
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.forward
        module.forward = outer


_NAMES = itertools.count()


def hook_forward(module, run) -> None:
    """Wrap the module's forward (beneath any accelerate hook): each call runs run(forward, *args, **kwargs), forward
    being the module's forward before this. The one way fastusp wraps a forward; undone by undo_changes(module).
    An object that is not a torch module (cfg parallelism's ForwardSlot) has its forward attribute patched."""
    if not isinstance(module, torch.nn.Module):
        forward = module.forward
        patch_attribute(module, "forward", functools.wraps(forward)(lambda *args, **kw: run(forward, *args, **kw)))
        return
    name = f"fastusp.{next(_NAMES)}"
    created = not hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    with _beneath_accelerate(module):
        registry.register_hook(FastUSPHook(run), name)

    def undo():
        with _beneath_accelerate(module):
            _remove_hook(registry, name)
            _drop_bound_class_forward(module)
        if created and not registry.hooks and getattr(module, "_diffusers_hook", None) is registry:
            del module._diffusers_hook

    record_change(module, undo)


def _remove_hook(registry: HookRegistry, name: str) -> None:
    """registry.remove_hook(name), also where a hook registered later sits above it: diffusers' remove_hook then
    points the next link's `forward` at the forward beneath, which for a hook with its own new_forward (a cache)
    would drop that hook; the next link's `original_forward` is the one to repoint there."""
    index = registry._hook_order.index(name)
    if index == len(registry._hook_order) - 1:
        registry.remove_hook(name, recurse=False)
        return
    beneath = registry._fn_refs[index].original_forward  # a FastUSPHook has new_forward: never None
    above = registry._fn_refs[index + 1]
    setattr(above, "original_forward" if above.original_forward is not None else "forward", beneath)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def _drop_bound_class_forward(module) -> None:
    """The registry puts back the forward it found: where that was the class's own, leave none on the instance."""
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def forward_of(module):
    """The module's forward beneath any accelerate hook."""
    return module._old_forward if _has_accelerate_hook(module) else module.forward


def set_forward(module, forward) -> None:
    """Make `forward` the module's forward beneath any accelerate hook, in place of the one there (an attribute patch,
    undone by undo_changes(module)). To wrap a forward, use hook_forward."""
    patch_attribute(module, "_old_forward" if _has_accelerate_hook(module) else "forward", forward)


def pre_forward_hook(module, enter) -> None:
    """enter(module, args, kwargs) -> (args, kwargs) before each call of the module's forward."""
    def run(forward, *args, **kwargs):
        args, kwargs = enter(module, args, kwargs)
        return forward(*args, **kwargs)

    hook_forward(module, run)


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
    else:
        patch_attribute(link, "original_forward" if link.original_forward is not None else "forward", forward,
                        owner=module)


def replace_forward(module, run) -> None:
    """Replace the module's forward (beneath any accelerate hook) by one that binds each call to the current
    forward's signature and returns run(forward, inputs) as it is (inputs: the bound arguments by name,
    return_dict included if given)."""
    signature = inspect.signature(forward_of(module))
    hook_forward(module, lambda forward, *args, **kwargs: run(forward, signature.bind(*args, **kwargs).arguments))


def wrap_forward(module, run_sample) -> None:
    """Replace a transformer's forward: run_sample(forward, inputs) (inputs without return_dict) gives the sample,
    returned as diffusers does: a Transformer2DModelOutput, or a 1-tuple for return_dict=False."""
    def run(forward, inputs):
        return_dict = inputs.pop("return_dict", True)
        sample = run_sample(forward, inputs)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    replace_forward(module, run)


def wrap_call(pipe, wrapper, outermost: bool = False) -> None:
    """Make pipe(*args, **kwargs) run wrapper(call, *args, **kwargs), where call runs the next wrapper or the
    pipeline's own __call__. Wrappers added later run inside earlier ones, unless `outermost`."""
    if "_fastusp_call_wrappers" not in pipe.__dict__:
        patch_attribute(pipe, "_fastusp_call_wrappers", [])
        cls = type(pipe)
        object.__setattr__(pipe, "__class__", _calling_wrappers(cls))
        record_change(pipe, lambda: object.__setattr__(pipe, "__class__", cls))
    wrappers = pipe._fastusp_call_wrappers
    wrappers.insert(0, wrapper) if outermost else wrappers.append(wrapper)


def original_call(pipe):
    """The pipeline class's own __call__ (beneath wrap_call's subclass), unbound."""
    cls = type(pipe)
    return cls.__mro__[1].__call__ if getattr(cls, "_fastusp_wraps_calls", False) else cls.__call__


@functools.cache
def _calling_wrappers(cls):
    @functools.wraps(cls.__call__)  # inspect.signature(pipe.__call__) still shows the pipeline's parameters
    def __call__(self, *args, **kwargs):
        call = functools.partial(cls.__call__, self)
        for wrapper in reversed(self._fastusp_call_wrappers):
            call = functools.partial(wrapper, call)
        return call(*args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_fastusp_wraps_calls": True})
