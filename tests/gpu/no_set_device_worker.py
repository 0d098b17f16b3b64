"""A script that initializes NCCL itself and never calls torch.cuda.set_device: every rank's current device stays
cuda:0 while its model runs on cuda:LOCAL_RANK. fastusp must still compute on each rank's own GPU, eager (the RoPE
and merge kernels launch on the current device unless told otherwise) and with CUDA graphs (a capture on cuda:0's stream
records nothing of a forward that runs on cuda:1, and its replays return the capture's output).

Launched by tests/gpu/test_gpu_parity.py as `torchrun --nproc-per-node 2 tests/gpu/no_set_device_worker.py`. Tiny
FLUX in float32 under Ulysses and under Ring, three inputs per mode against the unparallelized model on the same GPU;
prints one JSON line per rank.
"""
import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import fastusp  # noqa: E402
from fastusp.testing import flux_inputs, tiny_flux  # noqa: E402


def main() -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a rank left waiting on its peer fails instead of hanging
    dist.init_process_group("nccl")  # no device_id and no set_device: the script this worker stands for
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    reference = tiny_flux().to(device)
    world = dist.get_world_size()
    errors = {}
    for ulysses, ring in ((world, 1), (1, world)):  # Ring launches the merge kernel too
        model = fastusp.parallelize(tiny_flux().to(device), ulysses=ulysses, ring=ring)
        with torch.no_grad():
            for mode in ("eager", "graphs"):
                if mode == "graphs":
                    fastusp.compile_pipeline(model, backend=None, cuda_graphs=True)
                for seed in (1, 2, 3):  # with graphs, the first input captures and the others replay
                    inputs = {k: v.to(device) for k, v in flux_inputs(height=4, width=6, text_len=8, seed=seed).items()}
                    want = reference(**inputs, return_dict=False)[0]
                    got = model(**inputs, return_dict=False)[0]
                    error = ((got - want).abs().max() / want.abs().max()).item()
                    key = f"{mode} u{ulysses}r{ring}"
                    errors[key] = max(errors.get(key, 0.0), error)
    record = dict(check="no_set_device", rank=rank, current_device=torch.cuda.current_device(), device=str(device),
                  **errors, ok=max(errors.values()) < 1e-4)
    print(json.dumps(record), flush=True)
    # hung while the CUDA graphs held NCCL's collectives, until fastusp released them first (the timer above fails it)
    dist.destroy_process_group()
    sys.exit(0 if record["ok"] else 1)


if __name__ == "__main__":
    main()
