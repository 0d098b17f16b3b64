"""GPU parity on CUDA + NCCL (bf16): run on a machine with 2 or more GPUs; skipped elsewhere."""
import os

import pytest
import torch

from _launch import run_worker

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORKER = os.path.join(os.path.dirname(__file__), "parity_worker.py")
NO_SET_DEVICE_WORKER = os.path.join(os.path.dirname(__file__), "no_set_device_worker.py")


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= GPUS])
def test_parity_on_cuda(world):
    proc, records = run_worker(WORKER, world, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert records and all(r["ok"] for r in records)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
def test_ranks_whose_script_never_set_the_device_compute_on_their_own_gpu():
    proc, records = run_worker(NO_SET_DEVICE_WORKER, 2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(r["rank"] for r in records) == [0, 1] and all(r["ok"] for r in records)
    assert all(r["current_device"] == 0 for r in records)  # rank 1 really ran with cuda:0 current
