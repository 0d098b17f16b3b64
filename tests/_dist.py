"""Run a function in N forked CPU processes with a gloo process group, and return what each rank returned.

fork keeps start-up fast (no re-import) and lets workers see objects built by the test. The group is initialized
here, through a file store: no port to race for and no store thread in the test process at fork time, so code
under test finds torch.distributed already initialized (as after torchrun + init_process_group). Any rank's
exception is re-raised with its traceback; a rank stuck in a collective raises after `timeout` (gloo's own
timeout), and a run that still does not finish fails with every stuck rank's stack instead of hanging.
"""
from __future__ import annotations

import datetime
import faulthandler
import io
import os
import shutil
import signal
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, store_file, timeout, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before killing us
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
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
    tmp = tempfile.mkdtemp(prefix="fastusp-test-")
    collective_timeout = max(10.0, timeout / 2)  # a stuck collective raises before the harness gives up
    procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "store"), collective_timeout, fn, args,
                                               queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.01)
            continue
        rank, status, payload = queue.get()
        if status == "error":
            errors.append((rank, payload))
        else:
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    stuck = [r for r, p in enumerate(procs) if p.is_alive() and r not in results and r not in dict(errors)]
    for r in stuck:  # stacks go to this process's stderr (captured by pytest and shown with the failure)
        os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(0.5 if stuck else 0)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        # Every failing rank's traceback: the first one is often only a peer noticing that another rank crashed.
        raise AssertionError("\n".join(f"rank {rank} failed:\n{tb}" for rank, tb in sorted(errors)))
    if len(results) < world:
        raise AssertionError(f"only ranks {sorted(results)} of {world} finished within {timeout}s; "
                             f"stuck ranks {stuck} dumped their stacks to stderr")
    return [results[r] for r in range(world)]
