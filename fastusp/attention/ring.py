"""Ring attention, pipelined: key/value chunks rotate around the ring while the current chunk computes.

Each step posts the send/receive of the chunk for step i+1 before attending to chunk i (double buffer: the chunk
in use and the chunk in flight), then merges by log-sum-exp (merge.py, float32 arithmetic). Chunks may differ in
length.
"""
from __future__ import annotations

import torch

from ..distributed.fp8 import dequantize_fp8, quantize_fp8
from ..distributed.ring_comm import RingComm
from .local import attention_with_lse
from .merge import merge_attention


def _as_bhsd(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, 2, B, H, D] -> k, v as [B, H, S, D] views."""
    return kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3)


def ring_attention(q: torch.Tensor, kv: torch.Tensor, chunk_lens: list[int], group,
                   key_bias: torch.Tensor | None = None, fp8: bool = False, overlap: bool = True) -> torch.Tensor:
    """Attend q [B, H, S_q, D] to the keys/values of every rank in `group`.

    kv: this rank's chunk [S_kv, 2, B, H, D] (contiguous). chunk_lens[r]: S_kv of ring rank r.
    key_bias: None or [B, sum(chunk_lens)], the keys of ring rank r at offset sum(chunk_lens[:r]).
    overlap=False waits for each transfer before computing (the unpipelined ring, kept to measure the overlap).
    Returns [B, H, S_q, D] in q.dtype.
    """
    comm = RingComm(group)
    starts = [sum(chunk_lens[:r]) for r in range(comm.size)]
    # The wire format: what goes out is what comes in, so a quantized chunk is quantized once, by its owner.
    wire = quantize_fp8(kv) if fp8 else kv
    out = lse = None
    for step in range(comm.size):
        src = (comm.rank - step) % comm.size
        if step + 1 < comm.size:
            incoming = (comm.rank - step - 1) % comm.size
            next_wire = comm.send_recv(wire, (chunk_lens[incoming],) + tuple(wire.shape[1:]))
            if not overlap:
                comm.wait()
        chunk = kv if step == 0 else (dequantize_fp8(wire, q.dtype) if fp8 else wire)
        k, v = _as_bhsd(chunk)
        bias = None if key_bias is None else key_bias[:, starts[src]: starts[src] + chunk_lens[src]]
        last = step + 1 == comm.size  # the last merge writes q's dtype; before it the running result is float32
        out, lse = merge_attention(out, lse, *attention_with_lse(q, k, v, bias), q.dtype if last else torch.float32)
        if step + 1 < comm.size:
            if overlap:
                comm.wait()
            wire = next_wire
    return out.to(q.dtype)
