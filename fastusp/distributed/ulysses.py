"""Ulysses: all-to-all between sequence sharding and head sharding, with uneven sequence chunks, for one head chunk.

Layouts (B batch, S_local this rank's tokens, U group size, hc heads per destination rank, D head dim, n packed
tensors). A head chunk holds U*hc consecutive heads; destination rank u gets the u-th hc of them:
  pack_for_exchange:    n x [B, S_local, U*hc, D]  ->  send buffer [U, S_local, n, B, hc, D] (one copy)
  start_seq_to_head:    one send buffer            ->  [S_chunk, n, B, hc, D] in flight (S_chunk: the group's tokens)
  start_head_to_seq:    [B, hc, S_chunk, D]        ->  [U, S_local, B, hc, D] in flight
  unpack_returned:      that, waited               ->  [B, S_local, U*hc, D] (one copy)
Each send block is sequence-major, so the received blocks concatenated in rank order are already the whole chunk:
nothing is copied after the collective. q, k and v travel together in one collective per head chunk.

The collectives are torch's functional ops (traceable by torch.compile). start_* only issue them; `wait` before
use. The NCCL stream serializes them in issue order, which is the order the pipeline in attention/usp.py needs.
"""
from __future__ import annotations

import torch

from .fp8 import dequantize_fp8, quantize_fp8

_c10d = torch.ops._c10d_functional


def _all_to_all(x: torch.Tensor, send_rows: list[int], recv_rows: list[int], row_numel: int, group) -> torch.Tensor:
    # The raw functional op rather than fc.all_to_all_single: that wrapper waits at once while tracing (so Inductor
    # saw nothing to overlap) and wraps eager results in a Python tensor subclass (host time on every layer).
    return _c10d.all_to_all_single(
        x.reshape(-1), [r * row_numel for r in recv_rows], [r * row_numel for r in send_rows], group.group_name
    )


def wait(x: torch.Tensor) -> torch.Tensor:
    """Make the current stream wait for a collective issued by start_*; returns its result."""
    return _c10d.wait_tensor(x)


def pack_for_exchange(tensors: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """n tensors [B, S_local, U*hc, D] (one head chunk) -> the send buffer [U, S_local, n, B, hc, D] (one copy)."""
    batch, seq, heads, dim = tensors[0].shape
    parts = [t.reshape(batch, seq, group_size, heads // group_size, dim).permute(2, 1, 0, 3, 4) for t in tensors]
    return torch.stack(parts, dim=2)


def start_seq_to_head(send: torch.Tensor, group_seq_lens: list[int], group, fp8: bool = False) -> torch.Tensor:
    """Issue the exchange of one send buffer [U, S_local, n, B, hc, D]; wait, then finish_seq_to_head."""
    if fp8:
        send = quantize_fp8(send)
    row = send[0, 0].numel()
    return _all_to_all(send, [send.shape[1]] * send.shape[0], group_seq_lens, row, group)


def finish_seq_to_head(received: torch.Tensor, send: torch.Tensor, dtype: torch.dtype,
                       fp8: bool = False) -> torch.Tensor:
    """The waited result of start_seq_to_head(send) -> [S_chunk, n, B, hc, D]."""
    _, _, n, batch, hc, dim = send.shape
    out = received.view(-1, n, batch, hc, dim + (4 if fp8 else 0))
    return dequantize_fp8(out, dtype) if fp8 else out


def start_head_to_seq(out: torch.Tensor, group_seq_lens: list[int], group_rank: int, group,
                      fp8: bool = False) -> torch.Tensor:
    """Issue the exchange of attention output [B, hc, S_chunk, D] back to sequence shards; wait, then unpack_returned."""
    batch, hc, _, dim = out.shape
    send = out.permute(2, 0, 1, 3).contiguous()  # [S_chunk, B, hc, D]: rows for rank r are contiguous
    if fp8:
        send = quantize_fp8(send)
    seq = group_seq_lens[group_rank]
    return _all_to_all(send, group_seq_lens, [seq] * len(group_seq_lens), send[0].numel(), group)


def unpack_returned(received: torch.Tensor, batch: int, seq: int, group_size: int, dim: int, dtype: torch.dtype,
                    fp8: bool = False) -> torch.Tensor:
    """The waited result of start_head_to_seq -> this rank's tokens with the chunk's heads, [B, S_local, U*hc, D]."""
    r = received.view(group_size, seq, batch, -1, dim + (4 if fp8 else 0))
    r = dequantize_fp8(r, dtype) if fp8 else r
    return r.permute(2, 1, 0, 3, 4).reshape(batch, seq, -1, dim)  # head index u*hc + i within the chunk
