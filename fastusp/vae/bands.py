"""Row bands: which image rows each rank holds, and fetching the rows a rank needs from the ranks that hold them.

The bands are cut on the coarsest grid (the latent) and scale with it: at a resolution `scale` times the latent's,
rank r holds rows [scale * start_r, scale * stop_r). A rank finds the scale of a tensor from its own height, so the
modules in between need no bookkeeping, and a stride-2 convolution's output band starts where its input band's
half does (stride alignment).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RowBands:
    """counts[r] latent rows for rank r (of `group`), in rank order; every rank holds at least one."""

    counts: tuple[int, ...]
    rank: int
    group: object

    @classmethod
    def even(cls, rows: int, group) -> RowBands:
        """Near-even bands of `rows` latent rows (the first ranks take one more); needs rows >= the group's size."""
        size = dist.get_world_size(group)
        if rows < size:
            raise ValueError(f"{rows} latent rows cannot be split over {size} ranks")
        return cls(tuple(rows // size + (r < rows % size) for r in range(size)), dist.get_rank(group), group)

    @property
    def size(self) -> int:
        return len(self.counts)

    def start(self, rank: int) -> int:
        return sum(self.counts[:rank])

    def scale_of(self, local_rows: int) -> int:
        """The resolution of a tensor with `local_rows` rows on this rank, in multiples of the latent grid."""
        scale, rest = divmod(local_rows, self.counts[self.rank])
        if rest or scale < 1:
            raise RuntimeError(f"a tensor of {local_rows} rows does not fit this rank's band of "
                               f"{self.counts[self.rank]} latent rows: a module changed the height unevenly")
        return scale

    def spans(self, scale: int) -> list[tuple[int, int]]:
        """[start, stop) rows of every rank at `scale`."""
        starts = [scale * self.start(r) for r in range(self.size)]
        return [(a, a + scale * n) for a, n in zip(starts, self.counts)]

    def rows(self, scale: int) -> list[int]:
        return [scale * n for n in self.counts]

    def local(self, x: torch.Tensor, scale: int, dim: int = -2) -> torch.Tensor:
        """This rank's rows of the whole tensor `x` (at `scale`)."""
        a, b = self.spans(scale)[self.rank]
        return x.narrow(dim, a, b - a)


def fetch_rows(x: torch.Tensor, bands: RowBands, wanted: list[tuple[int, int]]) -> torch.Tensor:
    """Rows [lo, hi) of the whole tensor, with `x` this rank's band (rows on dim -2) and wanted[r] = (lo, hi) the
    rows rank r asks for (every rank passes the same list). Rows outside the image are zeros: a convolution's zero
    padding."""
    return fetch_many(x, bands, [wanted])[0]


def fetch_many(x: torch.Tensor, bands: RowBands, requests: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """fetch_rows for several requests at once (one batch of point-to-point transfers): each request is a list of
    (lo, hi) by rank, and this rank gets one tensor per request. Each rank sends the parts of its band that others
    want and receives its own from their holders; a neighbour's band may be thinner than the halo (small images),
    then farther ranks send too."""
    spans = bands.spans(bands.scale_of(x.shape[-2]))
    ops, results = [], []
    for wanted in requests:
        pieces = _receive_rows(x, bands, spans, wanted[bands.rank], ops)
        results.append(pieces[0] if len(pieces) == 1 else pieces)
        _send_rows(x, bands, spans, wanted, ops)
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return [r if isinstance(r, torch.Tensor) else torch.cat(r, dim=-2) for r in results]


def _receive_rows(x, bands: RowBands, spans, wanted: tuple[int, int], ops: list) -> list[torch.Tensor]:
    """The pieces of rows [lo, hi) in order: zeros outside the image, views of this rank's rows, receive buffers
    (their irecv ops appended to `ops`)."""
    lo, hi = wanted
    height = spans[-1][1]
    pieces = []
    if lo < 0:
        pieces.append(_zero_rows(x, min(hi, 0) - lo))
    for peer, (a, b) in enumerate(spans):
        start, stop = max(lo, a), min(hi, b)
        if start >= stop:
            continue
        if peer == bands.rank:
            pieces.append(x.narrow(-2, start - a, stop - start))
        else:
            pieces.append(x.new_empty(_with_rows(x, stop - start)))
            ops.append(dist.P2POp(dist.irecv, pieces[-1], dist.get_global_rank(bands.group, peer), bands.group))
    if hi > height:
        pieces.append(_zero_rows(x, hi - max(lo, height)))
    return pieces


def _send_rows(x, bands: RowBands, spans, wanted: list[tuple[int, int]], ops: list) -> None:
    mine = spans[bands.rank]
    for peer, (peer_lo, peer_hi) in enumerate(wanted):
        start, stop = max(peer_lo, mine[0]), min(peer_hi, mine[1])
        if peer != bands.rank and start < stop:
            part = x.narrow(-2, start - mine[0], stop - start).contiguous()
            ops.append(dist.P2POp(dist.isend, part, dist.get_global_rank(bands.group, peer), bands.group))


def _with_rows(x: torch.Tensor, rows: int) -> tuple[int, ...]:
    return (*x.shape[:-2], rows, x.shape[-1])


def _zero_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_zeros(_with_rows(x, rows))
