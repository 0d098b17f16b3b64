"""Ulysses: one all-to-all between sequence sharding and head sharding, with uneven sequence chunks.

Layouts (B batch, S_local this rank's tokens, H heads, U group size, h = H / U, D head dim, n packed tensors):
  seq_to_head_shard:  n x [B, S_local, H, D]  ->  [S_chunk, n, B, h, D]   (S_chunk = sum of the group's S_local)
  head_to_seq_shard:  [B, h, S_chunk, D]      ->  [B, S_local, H, D]
Each send block is sequence-major, so the received blocks concatenated in rank order are already the whole chunk:
the output needs no copy after the collective. q, k and v travel together in one collective. The collectives are
torch's functional ones, which torch.compile can trace.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

from .fp8 import dequantize_fp8, quantize_fp8


def _all_to_all(x: torch.Tensor, send_rows: list[int], recv_rows: list[int], row_numel: int, group) -> torch.Tensor:
    flat = fc.all_to_all_single(
        x.reshape(-1), [r * row_numel for r in recv_rows], [r * row_numel for r in send_rows], group
    )
    return fc.wait_tensor(flat)


def seq_to_head_shard(tensors: list[torch.Tensor], group_seq_lens: list[int], group, fp8: bool = False) -> torch.Tensor:
    """Pack n tensors [B, S_local, H, D] and trade sequence shards for head shards across `group`."""
    batch, seq, heads, dim = tensors[0].shape
    n, u = len(tensors), len(group_seq_lens)
    h = heads // u
    # One pass writes every tensor straight into the send layout [U, S_local, n, B, h, D].
    send = tensors[0].new_empty(u, seq, n, batch, h, dim)
    for i, t in enumerate(tensors):
        send[:, :, i] = t.view(batch, seq, u, h, dim).permute(2, 1, 0, 3, 4)
    if u == 1:
        return send[0]
    if fp8:
        send = quantize_fp8(send)
    row = n * batch * h * send.shape[-1]
    out = _all_to_all(send, [seq] * u, group_seq_lens, row, group)
    out = out.view(sum(group_seq_lens), n, batch, h, send.shape[-1])
    return dequantize_fp8(out, tensors[0].dtype) if fp8 else out


def head_to_seq_shard(out: torch.Tensor, group_seq_lens: list[int], group_rank: int, group,
                      fp8: bool = False) -> torch.Tensor:
    """Trade the head shard of the whole chunk [B, h, S_chunk, D] back for all heads of local tokens."""
    batch, h, _, dim = out.shape
    u = len(group_seq_lens)
    if u == 1:
        return out.transpose(1, 2)
    send = out.permute(2, 0, 1, 3).contiguous()  # [S_chunk, B, h, D]: rows for rank r are contiguous
    if fp8:
        send = quantize_fp8(send)
    seq = group_seq_lens[group_rank]
    recv = _all_to_all(send, group_seq_lens, [seq] * u, batch * h * send.shape[-1], group)
    recv = recv.view(u, seq, batch, h, send.shape[-1])
    if fp8:
        recv = dequantize_fp8(recv, out.dtype)
    return recv.permute(2, 1, 0, 3, 4).reshape(batch, seq, u * h, dim)
