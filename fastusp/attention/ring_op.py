"""Ring attention as an opaque torch.library op, so torch.compile can trace the block around it.

Dynamo cannot trace point-to-point sends (batch_isend_irecv), so inside a compiled region the ring is called
through this op: Inductor compiles everything else in the block (projections, norms, RoPE, the Ulysses
all-to-alls) and calls the ring as one extern kernel. Eager code calls ring_attention directly and skips the
op's dispatch cost.
"""
from __future__ import annotations

import torch
import torch.distributed.distributed_c10d as c10d

from .ring import ring_attention


@torch.library.custom_op("fastusp::ring_attention", mutates_args=())
def ring_attention_op(q: torch.Tensor, kv: torch.Tensor, chunk_lens: list[int], group_name: str,
                      text_bias: torch.Tensor | None, text_lens: list[int], fp8: bool, overlap: bool) -> torch.Tensor:
    """q [B, H, S, D] and kv as ring_attention takes them -> a fresh contiguous [B, S_q, H, D] (the fake below
    promises these strides). The merge kernel already writes that memory, so on CUDA contiguous() copies nothing."""
    group = c10d._resolve_process_group(group_name)
    out = ring_attention(q, kv, chunk_lens, group, text_bias, text_lens, fp8, overlap)
    return out.transpose(1, 2).contiguous()


@ring_attention_op.register_fake
def _(q, kv, chunk_lens, group_name, text_bias, text_lens, fp8, overlap):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


def maybe_traceable_ring_attention(q, kv, chunk_lens, group, text_bias=None, text_lens=None, fp8=False,
                                   overlap=True):
    """As ring_attention: q [B, H, S, D] in, [B, H, S, D] out."""
    if torch.compiler.is_compiling():
        return ring_attention_op(q, kv, list(chunk_lens), group.group_name, text_bias, list(text_lens or []), fp8,
                                 overlap).transpose(1, 2)
    return ring_attention(q, kv, chunk_lens, group, text_bias, text_lens, fp8, overlap)
