"""Shared modulation (fastusp/modulation.py): each rank computes the AdaLN modulation of its share of the blocks,
one all-gather gives every rank all of it, and the output is the single-process one.

The parallel-equals-single tests elsewhere (test_models, test_lora, test_compile, ...) run with it on; here: that
each block's modulation is computed once over all ranks (a sharded ControlNet's too), and still on every rank under a
cache that skips blocks, under group offloading, and for a norm class fastusp does not know.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from _dist import run_distributed
from fastusp.testing import flux_inputs, qwen_inputs, tiny_qwen


def _tiny_flux_more_blocks():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


MODELS = {
    "flux": (_tiny_flux_more_blocks, flux_inputs),
    "qwen": (tiny_qwen, qwen_inputs),
    "qwen-edit-2511": (lambda: tiny_qwen(zero_cond_t=True), qwen_inputs),
}


def _modulation_linears(model) -> list[torch.nn.Linear]:
    """Every block's modulation layers, in block order."""
    linears = []
    for blocks in (model.transformer_blocks, getattr(model, "single_transformer_blocks", [])):
        for block in blocks:
            for name in ("norm1", "norm1_context", "norm", "img_mod", "txt_mod"):
                module = getattr(block, name, None)
                if module is not None and hasattr(module, "linear"):
                    linears.append(module.linear)
                elif isinstance(module, torch.nn.Sequential):
                    linears.append(module[-1])
    return linears


def _counted_calls(model) -> list[int]:
    """How many times each of the model's modulation layers has run, updated as they run."""
    linears = _modulation_linears(model)
    calls = [0] * len(linears)
    for index, linear in enumerate(linears):
        linear.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


def _counted_forward(name: str, ulysses: int, ring: int, hooks: str | None, batch: int):
    """The parallel output, and how many times this rank ran each modulation layer in one forward. hooks: diffusers'
    First Block Cache ("cache") or group offloading ("block_level", "leaf_level"; CPU to CPU, so it moves nothing)
    on the transformer after parallelize, or "own-norm-class"."""
    import fastusp
    from diffusers.hooks import FirstBlockCacheConfig

    build, make_inputs = MODELS[name]
    model = build()
    if hooks == "own-norm-class":  # a norm class of its own in one block: fastusp does not know its forward
        norm = model.transformer_blocks[0].norm1
        norm.__class__ = type("OwnAdaLayerNormZero", (type(norm),), {})
    model = fastusp.parallelize(model, ulysses=ulysses, ring=ring)
    calls = _counted_calls(model)
    extra = {"reference_hw": (2, 3)} if name == "qwen-edit-2511" else {}
    if hooks == "cache":
        model.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips, but turns sharing off
    elif hooks in ("block_level", "leaf_level"):
        model.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type=hooks, num_blocks_per_group=1)
    with torch.no_grad(), model.cache_context("cond") if hooks == "cache" else contextlib.nullcontext():
        out = model(**make_inputs(batch=batch, **extra), return_dict=False)[0]
    return out, calls


@pytest.mark.parametrize("name, layout, batch", [
    ("flux", (2, 1), 1), ("flux", (1, 2), 2), ("flux", (2, 2), 1), ("qwen", (2, 1), 2), ("qwen", (2, 2), 1),
    ("qwen-edit-2511", (2, 1), 1)])
def test_each_block_modulation_computed_once_over_the_ranks(name, layout, batch):
    build, make_inputs = MODELS[name]
    extra = {"reference_hw": (2, 3)} if name == "qwen-edit-2511" else {}
    with torch.no_grad():
        expected = build()(**make_inputs(batch=batch, **extra), return_dict=False)[0]
    results = run_distributed(_counted_forward, layout[0] * layout[1], name, *layout, None, batch)
    for out, _ in results:
        assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    per_rank = [calls for _, calls in results]
    assert [sum(c) for c in zip(*per_rank)] == [1] * len(per_rank[0])  # every layer once, on one rank
    assert all(sum(calls) > 0 for calls in per_rank[:2])  # dealt out: no single rank does it all


@pytest.mark.parametrize("hooks", ["cache", "block_level", "leaf_level", "own-norm-class"])
def test_each_rank_computes_its_own_under_a_cache_or_group_offloading(hooks):
    # a First Block Cache step may run only the first block; group offloading brings a block's weights to the GPU
    # only when that block runs; a modulation module of a class fastusp does not know keeps its own forward
    with torch.no_grad():
        expected = _tiny_flux_more_blocks()(**flux_inputs(), return_dict=False)[0]
    for out, calls in run_distributed(_counted_forward, 2, "flux", 2, 1, hooks, 1):
        assert ((out - expected).norm() / expected.norm()).item() < 1e-5
        assert calls == [1] * len(calls)


def _controlnet_counts(ulysses: int):
    """A sharded FLUX ControlNet's residuals, and how many times this rank ran each of its modulation layers."""
    from diffusers import FluxControlNetPipeline
    from test_controlnet import controlnet_inputs, tiny_flux_controlnet
    from fastusp.testing import tiny_flux_pipeline

    import fastusp

    pipe = FluxControlNetPipeline.from_pipe(tiny_flux_pipeline(), controlnet=tiny_flux_controlnet("plain"))
    fastusp.parallelize(pipe, ulysses=ulysses)
    calls = _counted_calls(pipe.controlnet)
    with torch.no_grad():
        double, single = pipe.controlnet(**controlnet_inputs("plain"))
    return list(double) + list(single), calls


def test_a_sharded_controlnet_shares_its_blocks_modulation_too():
    [(expected, _)] = run_distributed(_controlnet_counts, 1, 1)
    results = run_distributed(_controlnet_counts, 2, 2)
    assert len(results[0][1]) == 3  # one double-stream block (two streams) and one single-stream block
    assert [sum(c) for c in zip(*(calls for _, calls in results))] == [1] * len(results[0][1])
    rows = torch.cat([residuals[0] for residuals, _ in results], dim=1)  # the ranks' rows, in rank order
    assert ((rows - expected[0]).norm() / expected[0].norm()).item() < 1e-5
