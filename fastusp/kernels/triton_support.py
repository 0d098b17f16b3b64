"""What fastusp's Triton kernels (this package) share: Triton itself, which CUDA builds of
torch include and CPU-only builds lack (then `triton` is None and callers take torch's ops), and the check that a
kernel's 32-bit offsets reach every element of its tensors."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def addressable(*tensors: torch.Tensor) -> bool:
    """Whether 32-bit offsets reach every element: each tensor's first to last element spans fewer than 2**31
    elements (about 4 GiB in bf16 for one FLUX q)."""
    return all(sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) < 2**31 - 1 for t in tensors)
