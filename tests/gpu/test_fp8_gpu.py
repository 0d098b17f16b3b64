"""Float8 GEMMs (torchao) through fastusp on one CUDA GPU of compute capability 8.9+; skipped elsewhere."""
import os

import pytest
import torch

from _launch import run_worker

FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
WORKER = os.path.join(os.path.dirname(__file__), "fp8_worker.py")


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9 or newer")
def test_fp8_quantize_parallelize_compile_on_cuda():
    pytest.importorskip("torchao")
    proc, records = run_worker(WORKER, 1, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(records) == 12 and all(r["ok"] for r in records)
