"""Run a function in N forked CPU processes with a gloo process group, and return what each rank returned.

fork keeps start-up fast (no re-import) and lets workers see objects built by the test. Any rank's exception is
re-raised here with its traceback, and a run that does not finish in `timeout` seconds fails instead of hanging.
"""
from __future__ import annotations

import io
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, fn, args, queue):
    # As under torchrun, the store is hosted outside the ranks (here by the parent), so every rank is a client.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()
        torch.save(fn(*args), buf)  # by value: shared-memory tensors would die with this process
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0) -> list:
    """Call fn(*args) on `world` ranks; returns [result of rank 0, rank 1, ...]."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    # The parent binds the store on a free port itself: no window in which another process can take the port.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    port = store.port
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
    del store
    if errors:
        # Every failing rank's traceback: the first one is often only a peer noticing that another rank crashed.
        raise AssertionError("\n".join(f"rank {rank} failed:\n{tb}" for rank, tb in sorted(errors)))
    if len(results) < world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished within {timeout}s (hang?)")
    return [results[r] for r in range(world)]
