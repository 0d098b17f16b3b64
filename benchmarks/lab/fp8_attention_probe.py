"""Is there a float8 attention kernel usable from torch on this machine? Tries each route and times what runs.

Routes: torch's scaled_dot_product_attention on float8_e4m3fn q/k/v under each SDPA backend (cuDNN, flash,
efficient, math), aten's cuDNN attention op directly, and the FlashAttention-3 package (flash_attn_interface, whose
Hopper kernels take float8) or FlashAttention-2 (flash_attn). Shapes: FLUX at 1024² on one GPU (24 heads x 128,
4096 image + 512 text tokens). Prints one JSON record per route: ok, the error if not, and its time against bf16
SDPA (cuDNN) where it runs.

    python benchmarks/lab/fp8_attention_probe.py
"""
from __future__ import annotations

import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def emit(record: dict) -> None:
    line = json.dumps(dict(check="fp8-attention", card=torch.cuda.get_device_name(), torch=torch.__version__,
                           cudnn=torch.backends.cudnn.version(), **record))
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp8-attention.jsonl"), "a") as f:
            f.write(line + "\n")


def attempt(route: str, fn, bf16_ms: float | None, ref: torch.Tensor | None) -> None:
    try:
        out = fn()
        torch.cuda.synchronize()
        out = out[0] if isinstance(out, tuple) else out
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item() if ref is not None else None
        ms = timed_ms(fn)
        emit(dict(route=route, ok=True, ms=round(ms, 3), vs_bf16=round(ms / bf16_ms, 3) if bf16_ms else None,
                  rel_err=round(err, 4) if err is not None else None))
    except Exception as e:  # noqa: BLE001 (each route's failure is the finding)
        emit(dict(route=route, ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))


def main() -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 24, 4608, 128)  # [B, H, S, D]
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v)
        bf16_ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    emit(dict(route="bf16 sdpa cudnn", ok=True, ms=round(bf16_ms, 3)))
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q8, k8, v8)
        attempt(f"fp8 sdpa {backend.name}", run, bf16_ms, ref)
    op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    if op is not None:
        attempt("fp8 aten._scaled_dot_product_cudnn_attention",
                lambda: op(q8, k8, v8, None, False, 0.0, False, False), bf16_ms, ref)
    for package in ("flash_attn_interface", "flash_attn"):
        try:
            module = importlib.import_module(package)
        except Exception as e:  # noqa: BLE001
            emit(dict(route=package, ok=False, error=f"{type(e).__name__}: {e}"))
            continue
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q8, k8, v8))  # [B, S, H, D]
        attempt(f"{package}.flash_attn_func fp8", lambda: module.flash_attn_func(qt, kt, vt), bf16_ms,
                ref.transpose(1, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
