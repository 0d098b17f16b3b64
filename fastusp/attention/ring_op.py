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
                      key_bias: torch.Tensor | None, fp8: bool, overlap: bool) -> torch.Tensor:
    group = c10d._resolve_process_group(group_name)
    # The op promises a fresh contiguous output (see the fake below); ring_attention's merge result already is.
    return ring_attention(q, kv, chunk_lens, group, key_bias, fp8, overlap).contiguous()


@ring_attention_op.register_fake
def _(q, kv, chunk_lens, group_name, key_bias, fp8, overlap):
    return q.new_empty(q.shape)


def maybe_traceable_ring_attention(q, kv, chunk_lens, group, key_bias=None, fp8=False, overlap=True):
    if torch.compiler.is_compiling():
        return ring_attention_op(q, kv, list(chunk_lens), group.group_name, key_bias, fp8, overlap)
    return ring_attention(q, kv, chunk_lens, group, key_bias, fp8, overlap)
