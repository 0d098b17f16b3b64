"""Inductor pre-grad rewrites that compile_pipeline applies to the code it compiles, so that the blocks' MLPs
write fewer bytes between their GEMMs. Same math; the model's code is untouched and eager runs are as diffusers'.

- gelu(linear(x), approximate="tanh") -> one GEMM with the GELU in cuBLASLt's epilogue (torch._addmm_activation).
  Inductor would write the GEMM's output, read it back in a gelu kernel and write it again (FLUX's and
  Qwen-Image's feed-forwards, FLUX's single-stream MLP).
- linear(cat([a, b], -1)), where a part is a GEMM's output -> linear(a, W[:, :ka]) + linear(b, W[:, ka:]): the
  concatenation is never written. FLUX's single-stream blocks join the attention output and the 4x wider MLP
  output before proj_out; Inductor adds the two partial products in the pointwise kernel that follows (gate,
  residual).

At 2 GPUs' per-rank sizes (one H200) FLUX's single-stream tail took 549 us instead of 590, its double-stream image
feed-forward 413 instead of 448. Compiled steps on 2xH200, u2r1, with Inductor's peak-memory reorder off (see
compile.py): FLUX 74.5 ms against 76.5-76.9 with either change alone, Qwen-Image 83.5 against 86.1 without both
(benchmarks/results/2026-11-28-2xH200-gemm-rewrites.md).
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

logger = logging.getLogger("fastusp")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(linear(x, weight, bias), approximate="tanh"), on CUDA with the GELU in the GEMM's epilogue."""
    if not x.is_cuda:  # on CPU _addmm_activation's GELU is the exact (erf) one; cuBLASLt's is the tanh one
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_of_parts(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear(cat(parts, -1), weight, bias) as a sum of GEMMs over weight's column blocks, without the cat."""
    out, start = None, 0
    for part in parts:
        width = part.shape[-1]
        partial = F.linear(part, weight[:, start:start + width], bias if out is None else None)
        out = partial if out is None else out + partial
        start += width
    return out


class GemmRewrites(CustomGraphPass):
    """The rewrites above on a Dynamo graph (torch-level calls). A custom pass with a uuid, so that Inductor's
    caches key on this file."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if _is_call(node, torch._C._nn.gelu):
                _fuse_gelu_into_linear(graph, node)
        for node in list(graph.nodes):
            if _is_call(node, torch._C._nn.linear):
                _split_linear_of_cat(graph, node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _fuse_gelu_into_linear(graph: torch.fx.Graph, gelu: torch.fx.Node) -> None:
    linear = gelu.args[0]
    approximate = gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")
    if approximate != "tanh" or not _is_call(linear, torch._C._nn.linear) or len(linear.users) != 1:
        return
    x, weight, bias = _linear_args(linear)
    # _addmm_activation takes a bias, has no derivative and is not cast by autocast (under which the linear's output
    # dtype differs from its inputs')
    if bias is None or not _plain_matrix(weight) or _value(linear) is None or _value(linear).requires_grad:
        return
    if len({getattr(_value(n), "dtype", None) for n in (x, weight, bias, linear)}) != 1:
        return
    _replace(graph, gelu, linear_gelu, (x, weight, bias), erase=[gelu, linear])


def _split_linear_of_cat(graph: torch.fx.Graph, linear: torch.fx.Node) -> None:
    cat, weight, bias = _linear_args(linear)
    if not _is_call(cat, torch.cat) or len(cat.users) != 1:
        return
    parts = cat.args[0]
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    values = [_value(p) if isinstance(p, torch.fx.Node) else None for p in parts]
    if len(parts) < 2 or any(v is None for v in values) or not _plain_matrix(weight):
        return
    # Only where a part is a GEMM's output, which Inductor copies into the cat (a pointwise part, like FLUX.2's
    # SwiGLU, is written into it directly: splitting would only add a read of the partial product)
    if dim not in (-1, values[0].dim() - 1) or not any(_is_call(p, linear_gelu) or _is_call(p, torch._C._nn.linear)
                                                         for p in parts):
        return
    _replace(graph, linear, linear_of_parts, (list(parts), weight, bias), erase=[linear, cat])


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, fn, args: tuple, erase: list[torch.fx.Node]) -> None:
    """Put a call of fn(*args) in node's place (with the example value later pre-grad passes may read), then erase
    the nodes it replaces."""
    with graph.inserting_before(node):
        new = graph.call_function(fn, args)
    example = torch.fx.node.map_arg(args, _value)
    fake_modes = [t.fake_mode for t in torch.utils._pytree.tree_leaves(example) if hasattr(t, "fake_mode")]
    with fake_modes[0] if fake_modes else contextlib.nullcontext():  # the example values' mode, not the caller's
        new.meta["example_value"] = fn(*example)
    node.replace_all_uses_with(new)
    for old in erase:
        graph.erase_node(old)


def _linear_args(linear: torch.fx.Node):
    """(input, weight, bias) of a call of torch._C._nn.linear, however they were passed."""
    args = list(linear.args) + [None] * (3 - len(linear.args))
    return (linear.kwargs.get("input", args[0]), linear.kwargs.get("weight", args[1]),
            linear.kwargs.get("bias", args[2]))


def _plain_matrix(node) -> bool:
    """A 2-D weight that is a plain tensor. A quantized weight (a tensor subclass: torchao's Float8Tensor) is left
    alone: its GEMM (torch._scaled_mm) has no GELU epilogue, and splitting its input would change the activation's
    per-row float8 scales, so neither rewrite keeps the math; a failed compile would also leave every block eager."""
    value = _value(node)
    if value is not None and is_traceable_wrapper_subclass(value):
        _note_quantized_weights(type(value).__name__)
        return False
    return value is not None and value.dim() == 2


_NOTED: set[str] = set()


def _note_quantized_weights(kind: str) -> None:
    if kind not in _NOTED:
        _NOTED.add(kind)
        logger.info("fastusp: gemm_rewrites leave the linear layers with %s weights as they are (GELU epilogue and "
                    "split proj_out are for bf16 GEMMs)", kind)


def _is_call(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _value(node):
    """A node's example value (a fake tensor) where Dynamo recorded one."""
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
