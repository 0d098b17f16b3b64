"""Ulysses: all-to-all between sequence sharding and head sharding, with uneven sequence chunks, in head chunks.

Layouts (B batch, S_local this rank's tokens, H heads, U group size, h = H / U heads per rank after the exchange,
c head chunks of hc = h / c heads, D head dim, n packed tensors):
  pack_head_chunks:     n x [B, S_local, H, D]  ->  c send buffers [U, S_local, n, B, hc, D]
  start_seq_to_head:    one send buffer          ->  [S_chunk, n, B, hc, D] in flight (S_chunk: the group's tokens)
  start_head_to_seq:    [B, hc, S_chunk, D]      ->  [U, S_local, B, hc, D] in flight
  join_head_chunks:     c received outputs       ->  [B, S_local, H, D]
Each send block is sequence-major, so the received blocks concatenated in rank order are already the whole chunk:
nothing is copied after the collective. q, k and v travel together in one collective per head chunk.

Why head chunks: attention on chunk j can run while chunk j+1's all-to-all is in flight and chunk j-1's output
travels back, so most of the communication hides behind attention instead of adding to it.

The collectives are torch's functional ops (traceable by torch.compile). start_* only issue them; `wait` before
use. The NCCL stream serializes them in issue order, which is the order the pipeline needs.
"""
from __future__ import annotations

import torch

from .fp8 import SCALE_BYTES, dequantize_fp8, quantize_fp8

_c10d = torch.ops._c10d_functional


def _all_to_all(x: torch.Tensor, send_rows: list[int], recv_rows: list[int], row_numel: int, group) -> torch.Tensor:
    # The raw functional op rather than fc.all_to_all_single: that wrapper waits at once while tracing (so Inductor
    # saw nothing to overlap) and wraps eager results in a Python tensor subclass (host time on every layer).
    return _collective(_c10d.all_to_all_single, x.reshape(-1), [r * row_numel for r in recv_rows],
                       [r * row_numel for r in send_rows], group.group_name)


def wait(x: torch.Tensor) -> torch.Tensor:
    """Make the current stream wait for a collective issued by start_*; returns its result."""
    return _collective(_c10d.wait_tensor, x)


def _collective(op, *args):
    """op(*args), below the autograd kernel in eager inference: torch 2.13 registers the functional collectives'
    autograd in Python (torch.library.register_autograd), which cost 52 -> 24 us per all-to-all + wait on a 2-core
    CPU with a fake process group; two of them run on every layer. With grad on, and in traced code (Dynamo does
    not take the guard; Inductor adds no such wrapper), the plain call."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def pack_head_chunks(tensors: list[torch.Tensor], group_size: int, chunks: int) -> list[torch.Tensor]:
    """n tensors [B, S_local, H, D] -> `chunks` contiguous send buffers [U, S_local, n, B, hc, D] (one copy)."""
    batch, seq, heads, dim = tensors[0].shape
    hc = heads // (group_size * chunks)
    # [B, S, U, c, hc, D] -> [c, U, S, B, hc, D], stacked on a new dim 3 for the n tensors
    parts = [t.view(batch, seq, group_size, chunks, hc, dim).permute(3, 2, 1, 0, 4, 5) for t in tensors]
    return list(torch.stack(parts, dim=3).unbind(0))


def start_seq_to_head(send: torch.Tensor, group_seq_lens: list[int], group, fp8: bool = False) -> torch.Tensor:
    """Issue the exchange of one send buffer [U, S_local, n, B, hc, D]; wait, then finish_seq_to_head."""
    if fp8:
        send = quantize_fp8(send)
    row = send.shape[2:].numel()  # from the shape: indexing would dispatch two ops
    return _all_to_all(send, [send.shape[1]] * send.shape[0], group_seq_lens, row, group)


def finish_seq_to_head(received: torch.Tensor, send: torch.Tensor, dtype: torch.dtype,
                       fp8: bool = False) -> torch.Tensor:
    """The waited result of start_seq_to_head(send) -> [S_chunk, n, B, hc, D]."""
    _, _, n, batch, hc, dim = send.shape
    out = received.view(-1, n, batch, hc, dim + (SCALE_BYTES if fp8 else 0))
    return dequantize_fp8(out, dtype) if fp8 else out


def start_head_to_seq(out: torch.Tensor, group_seq_lens: list[int], group_rank: int, group,
                      fp8: bool = False) -> torch.Tensor:
    """Issue the exchange of attention output [B, hc, S_chunk, D] back to sequence shards; wait, then join."""
    batch, hc, _, dim = out.shape
    send = out.permute(2, 0, 1, 3).contiguous()  # [S_chunk, B, hc, D]: rows for rank r are contiguous
    if fp8:
        send = quantize_fp8(send)
    seq = group_seq_lens[group_rank]
    return _all_to_all(send, group_seq_lens, [seq] * len(group_seq_lens), send.shape[1:].numel(), group)


def join_head_chunks(received: list[torch.Tensor], batch: int, seq: int, group_size: int, dim: int,
                     dtype: torch.dtype, fp8: bool = False) -> torch.Tensor:
    """Waited results of start_head_to_seq for every head chunk -> [B, S_local, H, D] (one copy)."""
    parts = []
    for r in received:
        r = r.view(group_size, seq, batch, -1, dim + (SCALE_BYTES if fp8 else 0))
        r = dequantize_fp8(r, dtype) if fp8 else r
        parts.append(r.permute(2, 1, 0, 3, 4))  # [B, S_local, U, hc, D]
    if len(parts) == 1:  # one chunk (plain eager): a single copy, without stack's extra ops
        return parts[0].reshape(batch, seq, -1, dim)
    joined = torch.stack(parts, dim=3)  # [B, S_local, U, c, hc, D]: head index u*h + j*hc + i
    return joined.view(batch, seq, -1, dim)
