"""Unified Sequence Parallelism: Ulysses all-to-all, ring attention inside, Ulysses all-to-all back.

For world = ring x ulysses with ulysses innermost, rank (r, u) after the first all-to-all holds heads group u of
every token of ring chunk r (the tokens of ranks (r, 0..U-1)); ring attention then rotates those chunks across
the ring ranks (0..R-1, u) that share its heads.
"""
from __future__ import annotations

import torch

from ..config import ParallelConfig
from ..distributed.ulysses import head_to_seq_shard, seq_to_head_shard
from ..sharding import SeqLayout
from .local import attention
from .ring_op import maybe_traceable_ring_attention


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout,
                  config: ParallelConfig) -> torch.Tensor:
    """q, k, v: this rank's tokens [B, S_local, H, D] -> attention output for them, [B, S_local, H, D]."""
    u, r = config.ulysses, config.ring
    tokens = layout.tokens
    chunk_lens = [sum(tokens[i * u:(i + 1) * u]) for i in range(r)]
    group_lens = list(tokens[config.ring_rank * u:(config.ring_rank + 1) * u])
    ulysses_group = config.ulysses_group if u > 1 else None

    if u == 1:  # no all-to-all: q is used in place, only k|v are packed (the ring sends them)
        q_h = q.transpose(1, 2)
        kv = seq_to_head_shard([k, v], group_lens, None)  # [S_chunk, 2, B, H, D], contiguous
    else:
        qkv = seq_to_head_shard([q, k, v], group_lens, ulysses_group, fp8=config.fp8_qkv)  # [S_chunk, 3, B, h, D]
        q_h, kv = qkv[:, 0].permute(1, 2, 0, 3), qkv[:, 1:]
    if r == 1:
        out = attention(q_h, kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3), layout.key_bias)
    else:
        out = maybe_traceable_ring_attention(q_h, kv.contiguous(), chunk_lens, config.ring_group,
                                             layout.key_bias, config.fp8_qkv, config.ring_overlap)
    return head_to_seq_shard(out, group_lens, config.ulysses_rank, ulysses_group, fp8=config.fp8_out)
