"""FP8 payloads with the sender's scales inside the same buffer.

A row (the last dim: one token of one head) is quantized to float8_e4m3fn with scale = absmax / 448, and its
float32 scale is appended as 4 bytes: [..., D] -> uint8 [..., D + 4]. The receiver dequantizes each row with the
scale that came with it, so ranks with different value ranges decode correctly, and a single collective moves
payload and scales together. Pure tensor ops: traceable by torch.compile, and gloo can carry the uint8 view.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4


def quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> uint8 [..., D + 4]: float8 payload then the row's float32 scale."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    # Zero rows get scale 1 (payload is zeros anyway); non-finite rows would poison the scale, so clamp them into
    # range instead of spreading inf/NaN to every value of the row.
    absmax = torch.where(torch.isfinite(absmax) & (absmax > 0), absmax, torch.ones_like(absmax))
    scale = absmax / FP8_MAX
    payload = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    # Bytes of the scale from a flat view: Inductor (GPU) lowers a float32 -> uint8 view only when the last dim has
    # stride 1, and it may give the size-1 last dim of the amax some other stride (seen on H200: the compiled FP8
    # step then fell back to eager).
    scale_bytes = scale.reshape(-1).view(torch.uint8).view(*scale.shape[:-1], SCALE_BYTES)
    return torch.cat([payload, scale_bytes], dim=-1)


def dequantize_fp8(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., D + 4] -> [..., D] in `dtype`, using the scales carried in the buffer."""
    payload = packed[..., :-SCALE_BYTES].contiguous().view(torch.float8_e4m3fn)
    scale = packed[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (payload.float() * scale).to(dtype)
