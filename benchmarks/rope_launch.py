"""Host cost of RoPE on q and k in an eager forward: fastusp's one Triton kernel against diffusers' apply_rotary_emb.

python3 benchmarks/rope_launch.py        (one CUDA GPU; diffusers and fastusp importable)
For q and k [1, S, 24, 128] in bf16 with float32 cos/sin [S, 128] (FLUX's heads; S = 1152 and 2304 are the tokens
per rank at 1024² with text 512 on 4 and 2 GPUs; S = 16 leaves only launch cost), prints microseconds per call:
`host`, the Python time of back-to-back calls without synchronizing; `events`, CUDA-event time of the same loop.
Where events ≈ host, the GPU waited on the host: that is the regime of an eager FLUX step on 4 GPUs.
"""
import time

import torch
from diffusers.models.embeddings import apply_rotary_emb

from fastusp.models.flux import rotated


def microseconds_per_call(fn, calls: int = 300) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return host, begin.elapsed_time(end) / calls * 1e3


def main() -> None:
    for seq in (1152, 2304, 16):
        q = torch.randn(1, seq, 24, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        emb = (torch.randn(seq, 128, device="cuda"), torch.randn(seq, 128, device="cuda"))
        with torch.no_grad():
            ops = microseconds_per_call(lambda: (apply_rotary_emb(q, emb, sequence_dim=1),
                                                 apply_rotary_emb(k, emb, sequence_dim=1)))
            kernel = microseconds_per_call(lambda: rotated(q, k, emb))
        print(f"seq {seq}: diffusers host {ops[0]:.1f} us, events {ops[1]:.1f} us | "
              f"fastusp kernel host {kernel[0]:.1f} us, events {kernel[1]:.1f} us", flush=True)


if __name__ == "__main__":
    main()
