"""Running a kernel test file's checks on CPU under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton
is imported, so the file runs again as a script in a fresh interpreter)."""
import os
import subprocess
import sys

import pytest
import torch


def run_under_triton_interpreter(test_file: str) -> None:
    """Run test_file as a script with the interpreter on; fails the calling test unless it exits 0."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, test_file], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def script_main(problems) -> None:
    """The script side: problems(device, dtypes) -> list of failures, on CPU in float32 and float16 (the interpreter
    rounds float32 to bfloat16 by truncation, where GPUs round to nearest even as torch does)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: fastusp
    bad = problems("cpu", (torch.float32, torch.float16))
    print("\n".join(bad) or "no problems")
    sys.exit(1 if bad else 0)
