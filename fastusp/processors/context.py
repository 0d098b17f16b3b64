"""What a fastusp processor needs besides its module: the parallel config and this forward's sequence layout."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ParallelConfig
from ..sharding import SeqLayout


@dataclass
class USPContext:
    """Shared by one transformer's processors. `layout` is set by the sharded forward before the blocks run."""

    config: ParallelConfig
    layout: SeqLayout | None = None

    def current_layout(self) -> SeqLayout:
        if self.layout is None:
            raise RuntimeError("fastusp processor called outside a parallelized transformer forward")
        return self.layout
