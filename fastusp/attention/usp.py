"""Unified Sequence Parallelism: Ulysses all-to-all, ring attention inside, Ulysses all-to-all back.

For world = ring x ulysses with ulysses innermost, rank (r, u) after the first all-to-all holds heads group u of
every token of ring chunk r (the tokens of ranks (r, 0..U-1)); ring attention then rotates those chunks across
the ring ranks (0..R-1, u) that share its heads.

With Ulysses the heads travel in chunks of consecutive heads (config.head_chunks) and the whole layer is a
pipeline: the caller's projections for chunk j+1 run while chunk j's q/k/v are on the wire, chunk j's attention
runs while chunk j+1 arrives, and the caller's output projection of chunk j runs while chunk j+1's output travels
back. That is why usp_attention_chunks takes a function that projects a head range, and hands back each chunk's
output behind a function that waits for it only when called.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import ParallelConfig
from ..distributed import ulysses as a2a
from ..sharding import SeqLayout
from .local import attention
from .ring_op import maybe_traceable_ring_attention

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _traced(device: torch.device) -> bool:
    """Compiled or being captured in a CUDA graph: host launch cost is paid once, not every step.
    Eager, 2xH200, one attention call at 4608 tokens: 2.10 ms with two head chunks, 1.12 ms with one."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def head_chunk_slices(num_heads: int, config: ParallelConfig, device: torch.device) -> list[slice]:
    """The head ranges that travel together: config.head_chunks of them, each U*hc consecutive heads."""
    size = num_heads // config.head_chunks(num_heads, _traced(device))
    return [slice(start, start + size) for start in range(0, num_heads, size)]


def usp_attention_chunks(project: Callable[[slice], QKV], num_heads: int, layout: SeqLayout,
                         config: ParallelConfig, device: torch.device) -> list[tuple[slice, Callable[[], torch.Tensor]]]:
    """project(heads) -> this rank's q, k, v [B, S_local, len(heads), D] for that head range.

    Returns (heads, take) per head chunk; take() waits for that chunk's output and returns it, [B, S_local,
    len(heads), D]. Take them in order, doing the chunk's work in between, so it overlaps the next one's transfer.
    """
    u, r = config.ulysses, config.ring
    tokens = layout.tokens
    chunk_lens = [sum(tokens[i * u:(i + 1) * u]) for i in range(r)]
    group_lens = list(tokens[config.ring_rank * u:(config.ring_rank + 1) * u])

    def attend(q_h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q_h [B, h, S_chunk, D], kv [S_chunk, 2, B, h, D] -> [B, h, S_chunk, D]."""
        if r == 1:
            return attention(q_h, kv[:, 0].permute(1, 2, 0, 3), kv[:, 1].permute(1, 2, 0, 3), layout.key_bias)
        return maybe_traceable_ring_attention(q_h, kv.contiguous(), chunk_lens, config.ring_group,
                                              layout.key_bias, config.fp8_qkv, config.ring_overlap)

    if u == 1:  # no all-to-all: q is used in place, only k|v are packed (the ring sends them)
        heads = slice(0, num_heads)
        q, k, v = project(heads)
        out = attend(q.transpose(1, 2), a2a.pack_for_exchange([k, v], 1)[0]).transpose(1, 2)
        return [(heads, lambda: out)]

    group, fp8 = config.ulysses_group, config.fp8_qkv
    chunks = head_chunk_slices(num_heads, config, device)
    sends, in_flight = [], []
    for heads in chunks:  # issue every exchange as soon as its projections exist
        q, k, v = project(heads)
        sends.append(a2a.pack_for_exchange([q, k, v], u))
        in_flight.append(a2a.start_seq_to_head(sends[-1], group_lens, group, fp8))
    batch, seq, dim = q.shape[0], q.shape[1], q.shape[3]
    returning = []
    for send, received in zip(sends, in_flight):
        qkv = a2a.finish_seq_to_head(a2a.wait(received), send, q.dtype, fp8)  # [S_chunk, 3, B, hc, D]
        out = attend(qkv[:, 0].permute(1, 2, 0, 3), qkv[:, 1:])
        returning.append(a2a.start_head_to_seq(out, group_lens, config.ulysses_rank, group, config.fp8_out))

    def taker(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: a2a.unpack_returned(a2a.wait(x), batch, seq, u, dim, q.dtype, config.fp8_out)

    return [(heads, taker(x)) for heads, x in zip(chunks, returning)]


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout,
                  config: ParallelConfig) -> torch.Tensor:
    """Already projected q, k, v [B, S_local, H, D] -> attention output for this rank's tokens, [B, S_local, H, D]."""
    chunks = usp_attention_chunks(lambda heads: (q[:, :, heads], k[:, :, heads], v[:, :, heads]), q.shape[2],
                                  layout, config, q.device)
    return take_all(chunks)


def take_all(chunks: list[tuple[slice, Callable[[], torch.Tensor]]]) -> torch.Tensor:
    """Every chunk's output of usp_attention_chunks, heads in order: [B, S_local, H, D]."""
    outs = [take() for _, take in chunks]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
