"""Shared modulation: each rank computes the AdaLN modulation of some of the blocks, one all-gather shares them.

Every FLUX and Qwen-Image block turns the timestep embedding `temb` into its shift / scale / gate vectors with one
linear layer per stream (3072 -> 18432 in a double-stream block, 3072 -> 9216 in FLUX's single-stream ones). Its input
is one row per sample, so the layer is a matrix-vector product bound by reading its weights: 6.4 GB a step for FLUX's
57 blocks, 13.6 GB for Qwen-Image's 60: 2.6 and 5.4 ms a step on an H100, 2.3 and 3.9 ms in H200 kernel traces
(benchmarks/results/2026-12-07-1xH100-shared-modulation.md). Every rank computed all of them, the same vectors.

Here the blocks (a transformer's, and a sharded ControlNet's apart) are dealt out to the ranks of the sequence group
by weight size. Before the first block each rank computes its blocks' modulation with diffusers' own modules (a LoRA
on them applies) and one all-gather gives every rank all of it. Each block's `temb` argument then becomes its own
modulation, [B, k, n] for its k streams, and the block's norm (FLUX) or mod (Qwen-Image) modules take their row of it
instead of computing it. The arithmetic is the model's: the same layers on the same input, some on another rank.

Off, per forward, when a cache that skips blocks sits on the first block (First Block Cache, MagCache: a step that
runs one block would compute every block's modulation), and under diffusers' group offloading (a block's weights
reach the GPU only when that block runs).
"""
from __future__ import annotations

import logging
import types

import torch
from diffusers.hooks.first_block_cache import FBCHeadBlockHook
from diffusers.hooks.group_offloading import GroupOffloadingHook
from diffusers.hooks.mag_cache import MagCacheHeadHook
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

from ._forward import hook_forward, patch_attribute, pre_forward_hook
from .distributed.gather import gather_seq
from .processors.context import USPContext

logger = logging.getLogger("fastusp")


def _ada_norm_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """AdaLayerNormZero.forward (FLUX's double-stream norms) given emb = the block's precomputed modulation."""
    if emb.dim() == 2:  # a plain temb: fastusp did not precompute this forward's modulation
        return type(self).forward(self, x, timestep, class_labels, hidden_dtype, emb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb[:, self._fastusp_stream].chunk(6, dim=1)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_norm_zero_single(self, x, emb=None):
    """AdaLayerNormZeroSingle.forward (FLUX's single-stream norm) given the block's precomputed modulation."""
    if emb.dim() == 2:
        return type(self).forward(self, x, emb)
    shift_msa, scale_msa, gate_msa = emb[:, self._fastusp_stream].chunk(3, dim=1)
    x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa


def _mod_sequential(self, temb):
    """Qwen-Image's img_mod / txt_mod (SiLU, Linear) given the block's precomputed modulation."""
    if temb.dim() == 2:
        return type(self).forward(self, temb)
    return temb[:, self._fastusp_stream]


def _ada_norm_modulation(norm, temb):
    return norm.linear(norm.silu(temb))


def _sequential_modulation(mod, temb):
    return type(mod).forward(mod, temb)


# module type -> (its forward given the precomputed modulation, how diffusers computes that modulation from temb,
# its linear layer: plain or a LoRA layer, both have out_features)
_STREAM_KINDS = {
    AdaLayerNormZero: (_ada_norm_zero, _ada_norm_modulation, lambda norm: norm.linear),
    AdaLayerNormZeroSingle: (_ada_norm_zero_single, _ada_norm_modulation, lambda norm: norm.linear),
    torch.nn.Sequential: (_mod_sequential, _sequential_modulation, lambda mod: mod[-1]),
}


def deal_blocks(costs: list[int], ranks: int) -> list[list[int]]:
    """Block indices per rank, in block order: the costliest block first to the least loaded rank."""
    loads, owned = [0] * ranks, [[] for _ in range(ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        loads[rank] += costs[index]
        owned[rank].append(index)
    return [sorted(indices) for indices in owned]


class SharedModulation:
    """The modulated blocks of one transformer (in call order), who computes each, and this forward's results."""

    def __init__(self, transformer, streams: dict[str, tuple[str, ...]], context: USPContext):
        config = context.config
        self.transformer, self.group = transformer, config.sequence_group
        self.rank = config.sequence_rank
        self.blocks = modulated_blocks(transformer, streams)
        self.shapes = [(len(modules), _width(modules)) for _, modules in self.blocks]  # (streams, width) per block
        self.owned = deal_blocks([k * width for k, width in self.shapes], config.sequence_size)
        # per sample, how many values each rank's share holds
        self.share_sizes = [sum(self.shapes[i][0] * self.shapes[i][1] for i in indices) for indices in self.owned]
        self.modulations: list[torch.Tensor] | None = None

    def install(self) -> None:
        for index, (block, modules) in enumerate(self.blocks):
            for stream, module in enumerate(modules):
                patch_attribute(module, "_fastusp_stream", stream)
                patch_attribute(module, "forward", types.MethodType(_STREAM_KINDS[type(module)][0], module))
            pre_forward_hook(block, self._enter_hook(index))
        hook_forward(self.blocks[-1][0], self._release)

    def _enter_hook(self, index: int):
        def enter(block, args, kwargs):
            if index == 0:  # else each block computes its own, as diffusers does
                share = "temb" in kwargs and not _blocks_compute_their_own(*self.blocks[0])
                self.modulations = self.compute(kwargs["temb"]) if share else None
            if self.modulations is not None:
                kwargs["temb"] = self.modulations[index]
            return args, kwargs

        return enter

    def _release(self, forward, *args, **kwargs):
        output = forward(*args, **kwargs)
        self.modulations = None
        return output

    def compute(self, temb: torch.Tensor) -> list[torch.Tensor]:
        """Every block's modulation [B, k, n], this rank's blocks computed here, the others gathered."""
        batch = temb.shape[0]
        flat = gather_seq(self.local(temb, self.rank), [batch * n for n in self.share_sizes], self.group, dim=0)
        modulations, start = [None] * len(self.blocks), 0
        for indices in self.owned:
            for index in indices:
                k, width = self.shapes[index]
                modulations[index] = flat[start:start + k * batch * width].view(k, batch, width).transpose(0, 1)
                start += k * batch * width
        return modulations

    def local(self, temb: torch.Tensor, rank: int) -> torch.Tensor:
        """The modulation of the blocks dealt to `rank`, flattened in block and stream order."""
        mine = [_STREAM_KINDS[type(m)][1](m, temb).reshape(-1)
                for index in self.owned[rank] for m in self.blocks[index][1]]
        return torch.cat(mine) if mine else temb.new_empty(0)


def modulated_blocks(transformer, streams: dict[str, tuple[str, ...]]) -> list[tuple[torch.nn.Module, tuple]]:
    """(block, its modulation modules in stream order) for every block of the transformer's block lists, in call
    order."""
    return [(block, tuple(getattr(block, name) for name in streams[type(block).__name__]))
            for blocks in transformer.children() if isinstance(blocks, torch.nn.ModuleList)
            for block in blocks if type(block).__name__ in streams]


def _width(modules) -> int:
    widths = {_STREAM_KINDS[type(m)][2](m).out_features for m in modules}
    if len(widths) != 1:
        raise NotImplementedError(f"fastusp's shared modulation expects one width for a block's streams, got {widths}")
    return widths.pop()


def _blocks_compute_their_own(first_block, first_modules) -> bool:
    """Whether diffusers' hooks on the first block (a cache that skips blocks) or on it or its modulation modules
    (group offloading, block or leaf level) need each block to compute its own modulation when it runs."""
    hooked = [first_block, *(m for module in first_modules for m in module.modules())]
    hooks = [hook for m in hooked for hook in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).values()]
    return any(isinstance(hook, (FBCHeadBlockHook, MagCacheHeadHook, GroupOffloadingHook)) for hook in hooks)


def apply_shared_modulation(transformer, streams: dict[str, tuple[str, ...]] | None, context: USPContext) -> None:
    """streams: block class name -> the names of its modulated modules, one per stream, in the order the block uses
    them (None: the model has none to share). Modules of a kind fastusp does not know keep computing their own."""
    if not streams or context.config.sequence_size == 1:
        return
    unknown = {type(m).__name__ for _, modules in modulated_blocks(transformer, streams) for m in modules
               if type(m) not in _STREAM_KINDS}
    if unknown:
        logger.info("fastusp: each rank computes every block's modulation (modules %s are not shared)", unknown)
        return
    SharedModulation(transformer, streams, context).install()
