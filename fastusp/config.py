"""Parallel degrees and the process groups they imply, validated in one place.

World ranks are laid out as a (cfg, ring, ulysses) grid with ulysses innermost: ranks r*ulysses ..
r*ulysses+ulysses-1 form one Ulysses group, so its all-to-alls stay on the fastest links (inside a node), and ring
point-to-point traffic is what crosses nodes. The cfg groups exchange one output per guidance pass, the least traffic
of all, so they are outermost. The ring x ulysses ranks of one cfg group share one sequence ("sequence group").
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import operator
import os
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

logger = logging.getLogger("fastusp")


@dataclass
class ParallelConfig:
    """Degrees of Unified Sequence Parallelism, and of classifier-free-guidance parallelism.

    cfg:     1, or 2 to run the two guidance passes of a step (conditional, unconditional) on two halves of the
             ranks at the same time; each half shards the sequence by ulysses x ring. Needs a pipeline.
    ulysses: ranks that exchange sequence shards for head shards by all-to-all (1 = off).
    ring:    ranks that rotate key/value chunks point to point (1 = off).
    fp8_comm: quantize the payload of collectives to float8_e4m3fn with per-token, per-head scales that travel
              with the data. False (default) keeps communication lossless. "qkv" (or True) quantizes q/k/v and the
              ring key/value exchange; "all" also quantizes the attention output on its way back. The examples'
              --fp8-comm takes the same words.
    ring_overlap: post the next key/value transfer before computing on the current chunk (the pipelined ring).
              False waits for each transfer first; it exists to measure what the overlap buys.
    ulysses_chunks: send each rank's heads in this many chunks, so one chunk's all-to-all overlaps another's
              attention (1 = one exchange, no overlap); rounded down to a divisor of the heads per rank. None
              (default): 2 where the forward is compiled or captured in a CUDA graph, 1 in plain eager, where
              every extra launch costs host time the GPUs wait for.
    """

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    fp8_comm: bool | str = False
    ring_overlap: bool = True
    ulysses_chunks: int | None = None
    _mesh: object = field(default=None, init=False, repr=False)
    _groups: dict = field(default_factory=dict, init=False, repr=False)
    _rank: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        counts = {"ulysses": self.ulysses, "ring": self.ring, "cfg": self.cfg}
        if self.ulysses_chunks is not None:  # None: chosen per forward (see head_chunks)
            counts["ulysses_chunks"] = self.ulysses_chunks
        for name, value in counts.items():
            setattr(self, name, as_degree(name, value))
        if self.cfg > 2:
            raise ValueError(f"cfg must be 1 or 2 (one group of ranks per guidance pass), got {self.cfg}")
        if isinstance(self.fp8_comm, str) and self.fp8_comm not in ("qkv", "all") or \
                not isinstance(self.fp8_comm, (bool, str)):
            raise ValueError(f"fp8_comm must be False, True or 'all' ('qkv' is True), got {self.fp8_comm!r}")
        self.fp8_comm = True if self.fp8_comm == "qkv" else self.fp8_comm  # one value per meaning

    def settings(self) -> dict:
        """The arguments this config was made with (what parallelize() takes), without the groups built from them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @property
    def sequence_size(self) -> int:
        """Ranks that share one token sequence: one cfg group."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sequence_size

    @property
    def fp8_qkv(self) -> bool:
        return bool(self.fp8_comm)

    @property
    def fp8_out(self) -> bool:
        return self.fp8_comm == "all"

    def head_chunks(self, num_heads: int, traced: bool) -> int:
        """How many chunks one rank's heads travel in: the largest divisor of them <= ulysses_chunks (None: 2 if
        `traced`, i.e. compiled or captured in a CUDA graph, else 1)."""
        wanted = self.ulysses_chunks or (2 if traced else 1)
        per_rank = num_heads // self.ulysses
        return max(c for c in range(1, min(wanted, per_rank) + 1) if per_rank % c == 0)

    def validate_world(self, world_size: int) -> None:
        """Raise ValueError naming every factor when the degrees do not multiply to the number of processes."""
        if self.world_size != world_size:
            raise ValueError(
                f"cfg ({self.cfg}) * ulysses ({self.ulysses}) * ring ({self.ring}) = {self.world_size} must equal "
                f"the number of processes ({world_size}); launch with `torchrun --nproc-per-node {self.world_size}` "
                f"or change the degrees"
            )

    def validate_heads(self, num_heads: int) -> None:
        """Raise ValueError listing the valid Ulysses degrees when ulysses does not divide the head count."""
        if num_heads % self.ulysses != 0:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"ulysses ({self.ulysses}) must divide the number of attention heads ({num_heads}); "
                f"valid ulysses degrees: {divisors}. Move the rest of the parallelism to ring"
            )

    def set_timeout(self, timeout: datetime.timedelta | None) -> None:
        """Every collective fastusp issues (on the default group and on each group built here) raises after waiting
        this long, instead of torch's default (30 minutes on gloo, 10 on NCCL). None: leave them as they are."""
        if timeout is None:
            return
        for group in {dist.group.WORLD, *self._groups.values()}:
            if group is not None and dist.get_world_size(group) > 1:
                dist.distributed_c10d._set_pg_timeout(timeout, group)

    # --- process groups -----------------------------------------------------------------------------------------

    def build_mesh(self, device_type: str):
        """Build the (cfg, ring, ulysses) DeviceMesh over the default process group (once) and cache its groups,
        plus the sequence group (this rank's cfg group: ring x ulysses ranks).

        Groups and rank are looked up here, not per attention call: mesh look-ups cost host time on every layer.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if self._mesh is None:
            names = ("cfg", "ring", "ulysses")
            self._mesh = init_device_mesh(device_type, (self.cfg, self.ring, self.ulysses), mesh_dim_names=names)
            self._groups = {name: self._mesh.get_group(name) for name in names}
            self._groups["sequence"] = self._new_sequence_group()
            self._rank = dist.get_rank()
        return self._mesh

    def _new_sequence_group(self):
        if self.cfg == 1:
            return dist.group.WORLD
        n = self.sequence_size  # every rank creates every group, then keeps its own
        group, _ = dist.new_subgroups_by_enumeration([list(range(c * n, (c + 1) * n)) for c in range(self.cfg)])
        return group

    @property
    def ulysses_group(self):
        return self._groups["ulysses"]

    @property
    def ring_group(self):
        return self._groups["ring"]

    @property
    def cfg_group(self):
        return self._groups["cfg"]

    @property
    def sequence_group(self):
        return self._groups["sequence"]

    @property
    def shared_sequence_group(self):
        """The sequence group where several ranks share the sequence; None where one rank holds all of it."""
        return self.sequence_group if self.sequence_size > 1 else None

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def ulysses_rank(self) -> int:
        return self._rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return self._rank // self.ulysses % self.ring

    @property
    def sequence_rank(self) -> int:
        """This rank's place in its sequence group: which chunk of the tokens it holds."""
        return self._rank % self.sequence_size

    @property
    def cfg_rank(self) -> int:
        return self._rank // self.sequence_size


def as_degree(name: str, value) -> int:
    """value as a plain int >= 1 (numpy and torch integers too: operator.index), or ValueError naming `name`."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def fill_degrees(ulysses, ring, cfg, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) with None filled in from the number of processes (torchrun's WORLD_SIZE, or the initialized
    process group's) and the head count: with neither given, ulysses is the largest degree that divides both the
    heads and the ranks of one guidance pass, and ring takes the rest; with one given, the other takes the rest.
    Degrees that cannot fit the world are left for ParallelConfig.validate_world to report."""
    ulysses = None if ulysses is None else as_degree("ulysses", ulysses)
    ring = None if ring is None else as_degree("ring", ring)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = as_degree("cfg", cfg)
    sequence = world // cfg if world % cfg == 0 else 1
    if ulysses is None and ring is None:
        ulysses = max(d for d in range(1, sequence + 1) if sequence % d == 0 and num_heads % d == 0)
        ring = sequence // ulysses
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info("fastusp: %d processes, cfg=%d, %d heads: chose ulysses=%d (the largest degree dividing the "
                        "heads), ring=%d", world, cfg, num_heads, ulysses, ring)
    elif ulysses is None:
        ulysses = sequence // ring if sequence % ring == 0 else 1
    elif ring is None:
        ring = sequence // ulysses if sequence % ulysses == 0 else 1
    return ulysses, ring


def as_timeout(timeout) -> datetime.timedelta | None:
    """Seconds (int or float) or a timedelta, as a timedelta; None stays None (torch's default)."""
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or a datetime.timedelta, got {timeout!r}")
    return datetime.timedelta(seconds=timeout)


def check_one_gpu_per_rank(device: torch.device) -> None:
    """Raise ValueError when a torchrun rank other than the first computes on GPU 0 although it has a GPU of its own:
    every rank would share GPU 0 (pipe.to("cuda"), enable_model_cpu_offload() without gpu_id)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type != "cuda" or not 0 < local_rank < torch.cuda.device_count():
        return
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": the current one
    if index == 0:
        raise ValueError(
            f"local rank {local_rank} computes on cuda:0, the first rank's GPU; put each rank on its own GPU: "
            f"pipe.to(f\"cuda:{{local_rank}}\"), or pipe.enable_model_cpu_offload(gpu_id=local_rank) "
            f"(LOCAL_RANK from torchrun)"
        )


def on_device(device: torch.device):
    """A context where `device`, if a CUDA device, is the current one. Kernels that are not torch ops (Triton's, a
    CUDA graph's capture and replay, with its streams and pool) go to the current device, not the tensors': on a rank
    whose script never called torch.cuda.set_device (rank 1, its model on cuda:1) that is still cuda:0."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def maybe_init_distributed(device: torch.device, timeout: datetime.timedelta | None = None) -> None:
    """Initialize torch.distributed from the torchrun environment if nobody has (NCCL on CUDA, gloo on CPU), with
    `timeout` for its collectives (None: torch's default)."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"torch.distributed is not initialized and the torchrun environment is missing {missing}; "
            f"launch the script with `torchrun --nproc-per-node N script.py` or call "
            f"torch.distributed.init_process_group yourself first"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
