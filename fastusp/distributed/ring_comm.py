"""Point-to-point rotation of a buffer around a ring of ranks: send to the next rank, receive from the previous.

Usage, so that transfer overlaps compute:
    nxt = comm.send_recv(buf, recv_shape)   # queued and launched at once
    ... compute on buf ...
    comm.wait(); buf = nxt
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class RingComm:
    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self._reqs = None

    def send_recv(self, buf: torch.Tensor, recv_shape: tuple[int, ...]) -> torch.Tensor:
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv called again before wait()")
        recv = buf.new_empty(recv_shape)
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
