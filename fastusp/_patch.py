"""Attributes that fastusp sets on a user's object (a pipeline, a transformer), recorded where they are set, so
that they can be put back: `patch` records the value it replaces, `undo_patches` restores them in reverse order.
A hook's handle patched in as an attribute is removed with it (the hook goes too).

`wrap_call` makes `pipe(...)` run through wrappers: Python looks `__call__` up on the class, so the pipeline gets a
subclass of its own class (same name) whose `__call__` runs the wrappers around the original one; the swapped
`__class__` is recorded like any other attribute.
"""
from __future__ import annotations

import functools

from torch.utils.hooks import RemovableHandle

_MISSING = object()


def patch(obj, name: str, value) -> None:
    """setattr(obj, name, value), remembering the value it had before (the first time it is patched)."""
    record = obj.__dict__.setdefault("_fastusp_patches", {})
    if name not in record:
        record[name] = obj.__dict__.get(name, _MISSING) if name != "__class__" else obj.__class__
    object.__setattr__(obj, name, value) if name == "__class__" else setattr(obj, name, value)


def undo_patches(obj) -> None:
    """Put back every attribute `patch` set on obj (attributes it added are removed)."""
    record = obj.__dict__.pop("_fastusp_patches", {})
    for name, before in reversed(record.items()):
        if isinstance(obj.__dict__.get(name), RemovableHandle):
            obj.__dict__[name].remove()
        if name == "__class__":
            object.__setattr__(obj, "__class__", before)
        elif before is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, before)


def wrap_call(pipe, wrapper, outermost: bool = False) -> None:
    """Make pipe(*args, **kwargs) run wrapper(call, *args, **kwargs), where call runs the next wrapper or the
    pipeline's own __call__. Wrappers added later run inside earlier ones, unless `outermost`."""
    if "_fastusp_call_wrappers" not in pipe.__dict__:
        patch(pipe, "_fastusp_call_wrappers", [])
        patch(pipe, "__class__", _calling_wrappers(type(pipe)))
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
