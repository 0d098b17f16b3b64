"""GroupNorm whose statistics cover the whole image while each rank holds a band of its rows.

Each rank computes, per (sample, group), its element count, mean and sum of squared deviations (M2) in float32;
one all-gather shares them and every rank merges them with Chan's pairwise formula. Sums of squares minus the
squared mean (one pass) lose digits where the mean is large against the spread, as it is in VAE decoders; merging
M2 does not. The normalization itself is one fused op: batch_norm in inference mode takes the merged mean and
variance as its running statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed.gather import gather_seq
from .bands import RowBands

# elements upcast to float32 at a time (64 MiB): bounds the extra memory for bfloat16 activations
_CHUNK = 1 << 24


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, dim: int = 0):
    """Merge (count, mean, M2) of disjoint parts along `dim` into the whole's."""
    total = count.sum(dim)
    merged_mean = (count * mean).sum(dim) / total
    merged_m2 = (m2 + count * (mean - merged_mean.unsqueeze(dim)) ** 2).sum(dim)
    return total, merged_mean, merged_m2


def _local_moments(grouped: torch.Tensor):
    """(count, mean, M2) per row of `grouped` [B, G, N], in float32, computed chunk by chunk."""
    parts = []
    for chunk in grouped.split(max(1, _CHUNK // (grouped.shape[0] * grouped.shape[1])), dim=-1):
        var, mean = torch.var_mean(chunk.float(), dim=-1, correction=0)
        parts.append((torch.full_like(mean, chunk.shape[-1]), mean, var * chunk.shape[-1]))
    if len(parts) == 1:
        return parts[0]
    return merge_moments(*(torch.stack(p) for p in zip(*parts)))


def group_norm_on_band(norm: torch.nn.GroupNorm, x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    """norm(x) as on the whole image, x: this rank's rows [B, C, ...] (any trailing dims)."""
    batch, channels, groups = x.shape[0], x.shape[1], norm.num_groups
    stats = torch.stack(_local_moments(x.reshape(batch, groups, -1)))  # [3, B, G]
    every = gather_seq(stats[None], [1] * bands.size, bands.group, dim=0)  # [ranks, 3, B, G]
    _, mean, m2 = merge_moments(every[:, 0], every[:, 1], every[:, 2])
    var = m2 / every[:, 0].sum(0)
    per_channel = channels // groups
    # batch_norm normalizes per channel: fold the batch into the channels, one mean / variance per channel
    mean = mean.repeat_interleave(per_channel, dim=1).reshape(-1)
    var = var.repeat_interleave(per_channel, dim=1).reshape(-1)
    weight = bias = None
    if norm.affine:
        weight, bias = (p.float().repeat(batch) for p in (norm.weight, norm.bias))
    out = F.batch_norm(x.reshape(1, batch * channels, -1), mean, var, weight, bias, training=False, eps=norm.eps)
    return out.reshape(x.shape)
