"""Run a function in N forked CPU processes with a gloo process group, and return what each rank returned.

fork keeps start-up fast (no re-import) and lets workers see objects built by the test. Any rank's exception is
re-raised here with its traceback, and a run that does not finish in `timeout` seconds fails instead of hanging.
"""
from __future__ import annotations

import io
import os
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # by value: shared-memory tensors would die with this process
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0) -> list:
    """Call fn(*args) on `world` ranks; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.01)
            continue
        rank, status, payload = queue.get()
        if status == "error":
            errors.append((rank, payload))
        else:
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        rank, tb = sorted(errors)[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if len(results) < world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished within {timeout}s (hang?)")
    return [results[r] for r in range(world)]
