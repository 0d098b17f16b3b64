"""Rank 0 drives: only rank 0 is called (by a server, a notebook, a queue), the other ranks make the same call.

    if rank == 0:
        with fastusp.lead(pipe):          # every pipe(...) made here, rank 0 first sends to the others
            serve_requests(pipe)
    else:
        fastusp.follow(pipe)              # make each call rank 0 sends; return when rank 0 leaves lead()

Each call's arguments travel from rank 0 as one pickled message on a gloo group of its own, whose timeout is long
(followers wait there for the next request, however idle rank 0 is). Tensors travel on the CPU and land on the
follower's execution device; a generator's state travels with it; callables (callback_on_step_end) stay on rank 0.
After the call every rank reports how it ended on that group: a call that raised on any rank raises on rank 0 (its
own exception, or a RuntimeError naming the rank that failed and its error), and every rank is ready for the next.
A rank that fails in the middle of a call leaves the others waiting in a collective until the process group's
timeout (parallelize(timeout=...)); they then raise too, but the group may be out of step for good: every later
call raises at once, saying so (restart the processes).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import threading
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._forward import patch_attribute, wrap_call
from .agreement import CollectiveTimeout

logger = logging.getLogger("fastusp")

# Followers wait for rank 0's next call on this group as long as a server idles; a crashed rank 0 still ends the
# wait at once (gloo sees the connection close).
_IDLE_TIMEOUT = datetime.timedelta(days=30)


def _control_group():
    """A gloo group over every rank, for call arguments and call outcomes (made on first use: collective)."""
    return _control_group_of(dist.group.WORLD)


@functools.cache
def _control_group_of(world):  # one per default process group: a new one after destroy + init_process_group
    return dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)


@dataclass
class _Outcome:
    error: str | None = None       # "TypeName: message", None if the call returned
    collective_failed: bool = False


class _Leader:
    """rank 0's side: while leading, each call is sent to the followers first, and their outcomes gathered after."""

    def __init__(self):
        self.leading, self.broken = False, None
        self.lock = threading.Lock()  # one call at a time: a server's handlers run in threads

    def __call__(self, call, *args, **kwargs):
        if not self.leading:
            return call(*args, **kwargs)
        with self.lock:
            if self.broken:
                raise RuntimeError(self.broken)
            _send(("call", _to_wire(args), _to_wire(kwargs)))
            result, error = None, None
            try:
                result = call(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- reported to every rank, then raised
                error = e
            outcomes = _exchange_outcomes(error)
            self.broken = _broken(outcomes)
            # the cause: a rank's own error, rather than the timeouts of the ranks that waited for it
            failed = [(rank, o.error) for rank, o in enumerate(outcomes) if o.error and not o.collective_failed]
            if error is not None and (not failed or failed[0][0] == 0):
                raise error
            if failed:
                raise RuntimeError("; ".join(f"rank {rank} failed this call: {e}" for rank, e in failed)) from error
            return result


def _broken(outcomes: list[_Outcome]) -> str | None:
    if any(o.collective_failed for o in outcomes):
        return ("an earlier call failed inside a collective on some rank (a timeout, or a rank that left): the "
                "ranks may be out of step for good; restart the processes")
    return None


@contextlib.contextmanager
def lead(pipe):
    """On rank 0: within this context, every call of `pipe` runs on every rank (the others in fastusp.follow);
    leaving it stops the followers. The pipeline must be parallelized (parallelize) on every rank."""
    if dist.get_rank() != 0:
        raise ValueError("fastusp.lead is for rank 0; the other ranks call fastusp.follow(pipe)")
    leader = pipe.__dict__.get("_fastusp_leader")
    if leader is None:
        leader = _Leader()
        patch_attribute(pipe, "_fastusp_leader", leader)
        wrap_call(pipe, leader, outermost=True)  # outside the agreement check: followers run that check too
    if leader.leading:
        raise ValueError("fastusp.lead(pipe) is active already")
    _control_group()  # with the followers, who make it on entering follow()
    leader.leading = True
    try:
        yield pipe
    finally:
        leader.leading = False
        _send(("stop",))


def follow(pipe) -> int:
    """On every rank but 0: make each call that rank 0 makes inside fastusp.lead(pipe), until it leaves lead().
    A call that raises here is reported to rank 0 (and logged) and the loop goes on. Returns the number of calls."""
    if dist.get_rank() == 0:
        raise ValueError("rank 0 drives: it runs fastusp.lead(pipe), the other ranks fastusp.follow(pipe)")
    device = pipe._execution_device
    calls, broken = 0, None
    while True:
        message = _receive()
        if message[0] == "stop":
            return calls
        _, args, kwargs = message
        calls += 1
        error = RuntimeError(broken) if broken else None
        if error is None:
            try:
                pipe(*_from_wire(args, device), **_from_wire(kwargs, device))
            except Exception as e:  # noqa: BLE001 -- reported to rank 0
                logger.error("fastusp: rank %d: call %d failed:\n%s", dist.get_rank(), calls, traceback.format_exc())
                error = e
        broken = _broken(_exchange_outcomes(error)) or broken


def _send(message) -> None:
    if dist.get_world_size() > 1:
        dist.broadcast_object_list([message], src=0, group=_control_group())


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def _exchange_outcomes(error: Exception | None) -> list[_Outcome]:
    mine = _Outcome()
    if error is not None:
        mine = _Outcome(f"{type(error).__name__}: {error}", isinstance(error, (CollectiveTimeout, dist.DistError)))
    if dist.get_world_size() == 1:
        return [mine]
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine, group=_control_group())
    return outcomes


@dataclass
class _Tensor:
    value: torch.Tensor            # on the CPU
    on_accelerator: bool


@dataclass
class _Generator:
    seed: int                      # initial_seed(), which the agreement check reports
    state: torch.Tensor
    on_accelerator: bool


def _to_wire(value):
    """Call arguments as rank 0 sends them: tensors and generators on the CPU, callables dropped."""
    if isinstance(value, torch.Tensor):
        return _Tensor(value.detach().cpu(), value.device.type != "cpu")
    if isinstance(value, torch.Generator):
        return _Generator(value.initial_seed(), value.get_state(), value.device.type != "cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_wire(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return None if callable(value) else value


def _from_wire(value, device: torch.device):
    if isinstance(value, _Tensor):
        return value.value.to(device) if value.on_accelerator else value.value
    if isinstance(value, _Generator):
        generator = torch.Generator(device if value.on_accelerator else "cpu").manual_seed(value.seed)
        generator.set_state(value.state)
        return generator
    if isinstance(value, (list, tuple)):
        return type(value)(_from_wire(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _from_wire(v, device) for k, v in value.items()}
    return value
