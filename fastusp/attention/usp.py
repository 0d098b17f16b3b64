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

    qkv = seq_to_head_shard([q, k, v], group_lens, ulysses_group, fp8=config.fp8_qkv)  # [S_chunk, 3, B, h, D]
    q_h = qkv[:, 0].permute(1, 2, 0, 3)
    if r == 1:
        k_h, v_h = qkv[:, 1].permute(1, 2, 0, 3), qkv[:, 2].permute(1, 2, 0, 3)
        out = attention(q_h, k_h, v_h, layout.key_bias)
    else:
        out = maybe_traceable_ring_attention(q_h, qkv[:, 1:].contiguous(), chunk_lens, config.ring_group,
                                             layout.key_bias, config.fp8_qkv, config.ring_overlap)
    return head_to_seq_shard(out, group_lens, config.ulysses_rank, ulysses_group, fp8=config.fp8_out)
