"""GPU parity on CUDA + NCCL (bf16): run on a machine with 2 or more GPUs; skipped elsewhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORKER = os.path.join(os.path.dirname(__file__), "parity_worker.py")
NO_SET_DEVICE_WORKER = os.path.join(os.path.dirname(__file__), "no_set_device_worker.py")


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= GPUS])
def test_parity_on_cuda(world):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES=",".join(map(str, range(world))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", WORKER], env=env, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert records and all(r["ok"] for r in records)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
def test_ranks_whose_script_never_set_the_device_compute_on_their_own_gpu():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES="0,1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           NO_SET_DEVICE_WORKER], env=env, capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(r["rank"] for r in records) == [0, 1] and all(r["ok"] for r in records)
    assert all(r["current_device"] == 0 for r in records)  # rank 1 really ran with cuda:0 current
