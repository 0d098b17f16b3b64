"""Point-to-point rotation of a buffer around a ring of ranks: send to the next rank, receive from the previous.

Usage, so that transfer overlaps compute:
    nxt = comm.send_recv(buf, recv_shape)   # queued and launched at once
    ... compute on buf ...
    comm.wait(); buf = nxt
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


@functools.lru_cache(maxsize=None)
def _ring_peers(group) -> tuple[int, int, int, int]:
    """(size, rank in group, global rank of next, global rank of previous): looked up once per group."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return size, rank, dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)


class RingComm:
    def __init__(self, group):
        self.group = group
        self.size, self.rank, self.next_rank, self.prev_rank = _ring_peers(group)
        self._reqs = None

    def send_recv(self, buf: torch.Tensor, recv_shape: tuple[int, ...]) -> torch.Tensor:
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv called again before wait()")
        recv = buf.new_empty(recv_shape)
        buf = buf.contiguous()  # a send reads storage: a view's logical order would be lost (no copy when contiguous)
        ops = [dist.P2POp(dist.isend, buf, self.next_rank, self.group),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group)]
        self._reqs = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait called with nothing in flight")
        for req in self._reqs:
            req.wait()
        self._reqs = None
