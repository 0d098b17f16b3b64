"""Unified Sequence Parallelism: Ulysses all-to-all, ring attention inside, Ulysses all-to-all back.

For world = ring x ulysses with ulysses innermost, rank (r, u) after the first all-to-all holds heads group u of
every token of ring chunk r (the tokens of ranks (r, 0..U-1)); ring attention then rotates those chunks across
the ring ranks (0..R-1, u) that share its heads.

With Ulysses, the heads can travel in chunks (config.ulysses_chunks): every chunk's q/k/v exchange is issued up
front, then chunk j's attention runs while chunk j+1 is still arriving and chunk j-1's output is on its way back.
"""
from __future__ import annotations

import torch

from ..config import ParallelConfig
from ..distributed import ulysses as a2a
from ..sharding import SeqLayout
from .local import attention, attention_text_keys_apart
from .ring_op import maybe_traceable_ring_attention


def _traced(device: torch.device) -> bool:
    """Compiled or being captured in a CUDA graph: host launch cost is paid once, not every step.
    Eager, 2xH200, one attention call at 4608 tokens: 2.10 ms with two head chunks, 1.12 ms with one."""
    return torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _text_keys_first(kv: torch.Tensor, text: tuple[int, ...], image: tuple[int, ...]) -> torch.Tensor:
    """kv [S, 2, B, h, D] in the Ulysses group's order [text_0, image_0, text_1, image_1, ...] -> a contiguous copy
    in the order [text_0, text_1, ..., image_0, image_1, ...]: the one copy, which ring attention's send needs
    anyway."""
    starts = [sum(text[:j]) + sum(image[:j]) for j in range(len(text))]
    spans = [(s, t) for s, t in zip(starts, text)] + [(s + t, i) for s, t, i in zip(starts, text, image)]
    return torch.cat([kv.narrow(0, start, length) for start, length in spans])


def ring_chunk_lens(per_rank: tuple[int, ...], config: ParallelConfig) -> list[int]:
    """Per-rank counts (a layout's tokens, or its text tokens) -> each ring chunk's: the sum over the ranks of its
    Ulysses group."""
    u = config.ulysses
    return [sum(per_rank[i * u:(i + 1) * u]) for i in range(config.ring)]


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SeqLayout,
                  config: ParallelConfig, attend_group=None) -> torch.Tensor:
    """q, k, v: this rank's tokens [B, S_local, H, D] -> attention output for them, [B, S_local, H, D].

    attend_group(q_h [B, h, S_chunk, D], kv [S_chunk, 2, B, h, D]) -> [B, h, S_chunk, D]: the attention of the Ulysses
    group's tokens for this rank's h heads, in place of fastusp's own (local, or ring over the ring group); it gets
    all of them at once (one head chunk)."""
    if config.ulysses == 1:  # no all-to-all: q is used in place, only k|v are packed (the ring sends them)
        # not `attend_group or ...`: Dynamo in torch 2.11 cannot take a function's truth value (graph break)
        attend = _attend_fn(layout, config) if attend_group is None else attend_group
        kv = a2a.pack_head_chunks([k, v], 1, 1)[0][0]  # [S_local, 2, B, H, D]
        return attend(q.transpose(1, 2), kv).transpose(1, 2)
    return ulysses_attention(lambda chunks: a2a.pack_head_chunks([q, k, v], config.ulysses, chunks), q.shape,
                             q.dtype, q.device, layout, config, attend_group)


def ulysses_attention(pack, shape: torch.Size, dtype: torch.dtype, device: torch.device, layout: SeqLayout,
                      config: ParallelConfig, attend_group=None) -> torch.Tensor:
    """usp_attention with Ulysses > 1, from q/k/v that pack(chunks) packs into `chunks` send buffers
    [U, S_local, 3, B, hc, D] (a2a.pack_head_chunks' layout; a processor may fuse its last ops into the packing).
    shape, dtype, device: q's [B, S_local, H, D], dtype and device."""
    batch, seq, heads, dim = shape
    u = config.ulysses
    group_lens = list(layout.tokens[config.ring_rank * u:(config.ring_rank + 1) * u])  # this Ulysses group's ranks
    chunks = 1
    if attend_group is None:
        attend, chunks = _attend_fn(layout, config), config.head_chunks(heads, _traced(device))
    else:
        attend = attend_group
    group, fp8 = config.ulysses_group, config.fp8_qkv
    sends = pack(chunks)
    in_flight = [a2a.start_seq_to_head(send, group_lens, group, fp8) for send in sends]
    returning = []
    for send, received in zip(sends, in_flight):
        qkv = a2a.finish_seq_to_head(a2a.wait(received), send, dtype, fp8)  # [S_chunk, 3, B, hc, D]
        out = attend(qkv[:, 0].permute(1, 2, 0, 3), qkv[:, 1:])
        returning.append(a2a.start_head_to_seq(out, group_lens, config.ulysses_rank, group, config.fp8_out))
    return a2a.join_head_chunks([a2a.wait(x) for x in returning], batch, seq, u, dim, dtype, config.fp8_out)


def _attend_fn(layout: SeqLayout, config: ParallelConfig):
    """fastusp's attention of a Ulysses group's tokens for some heads: local, or ring over the ring group."""
    u, r = config.ulysses, config.ring
    tokens = layout.tokens
    rank_span = slice(config.ring_rank * u, (config.ring_rank + 1) * u)  # the world ranks of this Ulysses group

    def attend(q_h: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q_h [B, h, S_chunk, D], kv [S_chunk, 2, B, h, D] -> [B, h, S_chunk, D]."""
        if r == 1:
            k_h, v_h = kv.permute(1, 2, 3, 0, 4).unbind(0)  # two calls, not four: eager pays host time per op
            # Only when compiled: Inductor fuses the split's copies and merge. As separate kernels (eager, or eager
            # kernels in a CUDA graph) they cost more than the bias saves: 240 against 171 us (H200, 6 heads).
            if layout.key_bias is not None and torch.compiler.is_compiling():
                return attention_text_keys_apart(q_h, k_h, v_h, layout.key_bias, layout.text, layout.image)
            return attention(q_h, k_h, v_h, layout.key_bias)
        chunk_lens = ring_chunk_lens(tokens, config)
        text_lens = ring_chunk_lens(layout.text, config)
        if layout.text_bias is not None and u > 1:  # the ring wants each chunk's keys as [text | image]
            kv = _text_keys_first(kv, layout.text[rank_span], layout.image[rank_span])
        return maybe_traceable_ring_attention(q_h, kv.contiguous(), chunk_lens, config.ring_group, layout.text_bias,
                                              text_lens, config.fp8_qkv, config.ring_overlap)
    return attend
