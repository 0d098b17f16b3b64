"""Launch a GPU worker under torchrun (NVLink multicast off, as on the shared hosts) and read its JSON records."""
import json
import os
import subprocess
import sys


def run_worker(worker: str, nproc: int, timeout: float, args: tuple = ()) -> tuple[subprocess.CompletedProcess, list]:
    """-> (the finished process, the JSON lines it printed), on the first `nproc` GPUs."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES=",".join(map(str, range(nproc))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", worker, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout)
    return proc, [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
