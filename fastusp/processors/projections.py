"""Projections computed per head chunk, so the attention pipeline (attention/usp.py) has work to overlap.

The model's nn.Linear weights are used as they are: the rows of to_q/to_k/to_v that produce heads [a, b), and the
columns of to_out that consume them. Any other module in those places (a LoRA wrapper, a quantized linear) keeps
its own forward: it runs once on the whole input and only its result is split, which is exact but overlaps less.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear


def head_projection(linear, x: torch.Tensor, head_dim: int) -> Callable[[slice], torch.Tensor]:
    """heads -> linear(x) for those output heads, [B, S, len(heads), D]."""
    if not _plain_linear(linear):  # run the module once; chunks are views of its result
        full = linear(x).unflatten(-1, (-1, head_dim))
        return lambda heads: full[:, :, heads]

    def project(heads: slice) -> torch.Tensor:
        rows = slice(heads.start * head_dim, heads.stop * head_dim)
        if rows == slice(0, linear.out_features):  # every head: the module itself (one chunk, plain eager)
            return linear(x).unflatten(-1, (-1, head_dim))
        bias = None if linear.bias is None else linear.bias[rows]
        return F.linear(x, linear.weight[rows], bias).unflatten(-1, (-1, head_dim))

    return project


class OutProjection:
    """linear(x) for x [B, S, H*D] that arrives in head chunks: each chunk's share of the GEMM runs on arrival."""

    def __init__(self, linear, head_dim: int):
        self.linear, self.head_dim = linear, head_dim
        self.result: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []

    def add(self, heads: slice, x: torch.Tensor) -> None:
        """x: the chunk's heads, [B, S, len(heads)*D]."""
        if not _plain_linear(self.linear) or x.shape[-1] == self.linear.in_features:
            self.parts.append(x)  # a module we do not slice, or every head at once: the module itself, at the end
            return
        cols = self.linear.weight[:, heads.start * self.head_dim:heads.stop * self.head_dim]
        if self.result is None:
            self.result = F.linear(x, cols, self.linear.bias)
        else:  # accumulate in the GEMM's epilogue (beta=1) rather than with a separate add
            flat = torch.addmm(self.result.reshape(-1, cols.shape[0]), x.reshape(-1, cols.shape[1]), cols.t())
            self.result = flat.view(self.result.shape)

    def output(self) -> torch.Tensor:
        if self.parts:
            return self.linear(torch.cat(self.parts, dim=-1) if len(self.parts) > 1 else self.parts[0])
        return self.result
