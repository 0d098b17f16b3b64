"""Float8 GEMMs (torchao) through fastusp on one CUDA GPU of compute capability 8.9+; skipped elsewhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
WORKER = os.path.join(os.path.dirname(__file__), "fp8_worker.py")


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9 or newer")
def test_fp8_quantize_parallelize_compile_on_cuda():
    pytest.importorskip("torchao")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES="0")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           WORKER], env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(records) == 12 and all(r["ok"] for r in records)
