"""Ring attention, pipelined: key/value chunks rotate around the ring while the current chunk computes.

Each step posts the send/receive of the chunk for step i+1 before attending to chunk i (double buffer: the chunk
in use and the chunk in flight), then merges by log-sum-exp (merge.py, float32 arithmetic). Chunks may differ in
length. With a text mask, each chunk's keys come as [its text keys | its image keys]: the image keys, almost all of
them, are attended without a bias (cuDNN's kernel), the few text keys with theirs, and the two blocks merge like
any others. A bias over the whole chunk would send every key through the slower biased kernel.
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


def _chunk_blocks(q, k, v, text_len: int, text_bias: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(out, lse) of q over one chunk's keys: all at once, or with a text bias the image keys and the text keys
    apart (every chunk has image keys: no rank holds fewer than one)."""
    if text_bias is None:
        return [attention_with_lse(q, k, v)]
    image = attention_with_lse(q, k[:, :, text_len:], v[:, :, text_len:])
    if text_len == 0:
        return [image]
    return [image, attention_with_lse(q, k[:, :, :text_len], v[:, :, :text_len], text_bias)]


def ring_attention(q: torch.Tensor, kv: torch.Tensor, chunk_lens: list[int], group,
                   text_bias: torch.Tensor | None = None, text_lens: list[int] | None = None, fp8: bool = False,
                   overlap: bool = True) -> torch.Tensor:
    """Attend q [B, H, S_q, D] to the keys/values of every rank in `group`.

    kv: this rank's chunk [S_kv, 2, B, H, D] (contiguous). chunk_lens[r]: S_kv of ring rank r.
    text_bias: None, or an additive mask [B, sum(text_lens)] over the text keys. Then the first text_lens[r] keys
    of ring rank r's chunk are its text keys, with their bias at offset sum(text_lens[:r]); its other keys are
    attended unmasked.
    overlap=False waits for each transfer before computing (the unpipelined ring, kept to measure the overlap).
    Returns [B, H, S_q, D] in q.dtype; on CUDA it lies in [B, S_q, H, D] memory (see merge.py).
    """
    comm = RingComm(group)
    text_lens = text_lens or [0] * comm.size
    text_starts = [sum(text_lens[:r]) for r in range(comm.size)]
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
        bias = None if text_bias is None else text_bias[:, text_starts[src]: text_starts[src] + text_lens[src]]
        blocks = _chunk_blocks(q, *_as_bhsd(chunk), text_lens[src], bias)
        for i, block in enumerate(blocks):
            # the last merge writes q's dtype; before it the running result is float32
            last = step + 1 == comm.size and i + 1 == len(blocks)
            out, lse = merge_attention(out, lse, *block, q.dtype if last else torch.float32)
        if step + 1 < comm.size:
            if overlap:
                comm.wait()
            wire = next_wire
    return out.to(q.dtype)
