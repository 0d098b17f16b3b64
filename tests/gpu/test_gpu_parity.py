"""GPU parity on CUDA + NCCL (bf16): run on a machine with 2 or more GPUs; skipped elsewhere. Float8 GEMMs on one GPU
of compute capability 8.9+."""
import json
import os
import subprocess
import sys

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
FP8_GPU = GPUS > 0 and torch.cuda.get_device_capability(0) >= (8, 9)
WORKER = os.path.join(os.path.dirname(__file__), "parity_worker.py")
NO_SET_DEVICE_WORKER = os.path.join(os.path.dirname(__file__), "no_set_device_worker.py")
FP8_WORKER = os.path.join(os.path.dirname(__file__), "fp8_worker.py")


def run_worker(script: str, world: int, timeout: int) -> list[dict]:
    """torchrun `script` on the first `world` GPUs (NVLink multicast off); returns the JSON records it printed, after
    checking it exited cleanly."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES=",".join(map(str, range(world))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world}", script], env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= GPUS])
def test_parity_on_cuda(world):
    records = run_worker(WORKER, world, timeout=600)
    assert records and all(r["ok"] for r in records)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 or more CUDA GPUs")
def test_ranks_whose_script_never_set_the_device_compute_on_their_own_gpu():
    records = run_worker(NO_SET_DEVICE_WORKER, 2, timeout=300)
    assert sorted(r["rank"] for r in records) == [0, 1] and all(r["ok"] for r in records)
    assert all(r["current_device"] == 0 for r in records)  # rank 1 really ran with cuda:0 current


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9 or newer")
def test_fp8_quantize_parallelize_compile_on_cuda():
    pytest.importorskip("torchao")
    records = run_worker(FP8_WORKER, 1, timeout=900)
    assert len(records) == 12 and all(r["ok"] for r in records)  # 6 checks for each of FLUX and Qwen-Image
