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


def _to_wire(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """[B, H, S, D] -> the contiguous [B, S, H, D] that travels: the projections' own layout, so with no Ulysses
    the local k and v go out as they are, uncopied (no stacking either: k and v are two sends of one group)."""
    x = x.transpose(1, 2).contiguous()
    return quantize_fp8(x) if fp8 else x


def _from_wire(x: torch.Tensor, dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    return (dequantize_fp8(x, dtype) if fp8 else x).transpose(1, 2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_lens: list[int], group,
                   key_bias: torch.Tensor | None = None, fp8: bool = False, overlap: bool = True) -> torch.Tensor:
    """Attend q [B, H, S_q, D] to the keys/values of every rank in `group`.

    k, v: this rank's chunk [B, H, S_kv, D]. chunk_lens[r]: S_kv of ring rank r.
    key_bias: None or [B, sum(chunk_lens)], the keys of ring rank r at offset sum(chunk_lens[:r]).
    overlap=False waits for each transfer before computing (the unpipelined ring, kept to measure the overlap).
    Returns [B, H, S_q, D] in q.dtype; on CUDA it lies in [B, S_q, H, D] memory (see merge.py).
    """
    comm = RingComm(group)
    starts = [sum(chunk_lens[:r]) for r in range(comm.size)]
    # What goes out is what comes in, so a quantized chunk is quantized once, by its owner.
    wire = [_to_wire(k, fp8), _to_wire(v, fp8)]
    out = lse = None
    for step in range(comm.size):
        src = (comm.rank - step) % comm.size
        if step + 1 < comm.size:
            incoming = chunk_lens[(comm.rank - step - 1) % comm.size]
            next_wire = comm.send_recv(wire, [(w.shape[0], incoming, *w.shape[2:]) for w in wire])
            if not overlap:
                comm.wait()
        if step > 0:
            k, v = (_from_wire(w, q.dtype, fp8) for w in wire)
        bias = None if key_bias is None else key_bias[:, starts[src]: starts[src] + chunk_lens[src]]
        last = step + 1 == comm.size  # the last merge writes q's dtype; before it the running result is float32
        out, lse = merge_attention(out, lse, *attention_with_lse(q, k, v, bias), q.dtype if last else torch.float32)
        if step + 1 < comm.size:
            if overlap:
                comm.wait()
            wire = next_wire
    return out.to(q.dtype)
