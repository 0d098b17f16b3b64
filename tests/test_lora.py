"""LoRA adapters (diffusers' load_lora_weights, PEFT layers): parallel == one process for FLUX, FLUX.2 and Qwen-Image,
with the LoRA loaded before or after parallelize, and CUDA-graphed (and compiled) models follow every later adapter
change.

A CUDA graph bakes in the model as it was captured; replaying it after load_lora_weights, set_adapters, fuse_lora or
unload_lora_weights would silently run the old model. Capture needs CUDA, so the graph tests replace it
(tests/_fake_graphs.py): a replay asserts that the model is still the one it was captured from (same tensors at the
same addresses with the same values, same adapter settings) before calling it again.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs
from fastusp.testing import flux_inputs, qwen_inputs, random_lora_state_dict
from fastusp.testing import tiny_call_kwargs, tiny_flux2_pipeline, tiny_flux_pipeline, tiny_qwen_pipeline

pytest.importorskip("peft")  # diffusers' LoRA loading needs it; the test extra installs it

TOL = 1e-4
BUILDERS = {"flux": tiny_flux_pipeline, "flux2": tiny_flux2_pipeline, "qwen": tiny_qwen_pipeline}
# FLUX.2's single-stream blocks: one projection for q/k/v and the MLP's input, one for both outputs
FLUX2_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "to_out", "proj_out")


def _lora(pipe, seed: int) -> dict:
    if type(pipe.transformer).__name__ == "Flux2Transformer2DModel":
        return random_lora_state_dict(pipe.transformer, seed, targets=FLUX2_TARGETS)
    return random_lora_state_dict(pipe.transformer, seed)


def _generate(pipe) -> torch.Tensor:
    return pipe(**tiny_call_kwargs(pipe, text_len=7), height=32, width=48, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _pipeline_with_lora(name: str, when: str | None, degrees: dict | None):
    """Images without and with a LoRA; when: "before" / "after" parallelize (with degrees), None: one process."""
    import fastusp

    pipe = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    lora = _lora(pipe, 1)
    if when == "before":
        pipe.load_lora_weights(lora, adapter_name="a")
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    without = _generate(pipe) if when != "before" else None
    if when != "before":
        pipe.load_lora_weights(lora, adapter_name="a")
    return without, _generate(pipe)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name, when, degrees", [
    ("flux", "before", dict(ulysses=2)), ("flux", "after", dict(ulysses=2)), ("flux", "before", dict(ring=2)),
    ("flux", "after", dict(ring=2)), ("qwen", "before", dict(ulysses=2)), ("qwen", "after", dict(ring=2)),
    ("flux2", "after", dict(ulysses=2)),
], ids=["flux-before-u2", "flux-after-u2", "flux-before-r2", "flux-after-r2", "qwen-before-u2", "qwen-after-r2",
        "flux2-after-u2"])
def test_lora_pipeline_matches_one_process(name, when, degrees):
    without, expected = _pipeline_with_lora(name, None, None)
    assert _rel(without, expected) > 1e-2  # precondition: the LoRA changes the image
    for rank_without, out in run_distributed(_pipeline_with_lora, 2, name, when, degrees):
        assert _rel(out, expected) < TOL
        if when == "after":
            assert _rel(rank_without, without) < TOL


# --- adapter changes after compile / CUDA graphs ------------------------------------------------------------------

def _changes(pipe) -> list:
    """(name, change to make, transformer call kwargs) in order; each call's output is compared with one process."""
    one_process = lambda: None
    lora_a, lora_b = _lora(pipe, 1), _lora(pipe, 2)  # now: once loaded, the layers are PEFT's, not nn.Linear
    call_scale = "joint_attention_kwargs" if type(pipe).__name__.startswith("Flux") else "attention_kwargs"
    return [
        ("no LoRA", one_process, {}),
        ("load a", lambda: pipe.load_lora_weights(lora_a, adapter_name="a"), {}),
        ("a at 0.8", lambda: pipe.set_adapters("a", 0.8), {}),
        ("call scale 0.7", one_process, {call_scale: {"scale": 0.7}}),
        ("call scale 0.7 again", one_process, {call_scale: {"scale": 0.7}}),
        ("load b, a + b", lambda: (pipe.load_lora_weights(lora_b, adapter_name="b"),
                                   pipe.set_adapters(["a", "b"], [1.0, 0.5])), {}),
        ("disabled", pipe.disable_lora, {}),
        ("enabled", pipe.enable_lora, {}),
        ("a fused", lambda: (pipe.set_adapters("a"), pipe.fuse_lora(adapter_names=["a"])), {}),
        ("unfused", pipe.unfuse_lora, {}),
        ("a weight reallocated", lambda: _reallocate(pipe.transformer), {}),
        ("another model built", lambda: torch.nn.Linear(4, 4), {}),
        ("unloaded", pipe.unload_lora_weights, {}),
    ]


def _reallocate(transformer) -> None:
    weight = transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    weight.data = weight.data.clone()  # same values, other memory: what a captured graph would no longer read


def _run_changes(name: str, degrees: dict | None, backend=None, graphs: bool = True):
    """Outputs after each change with how many graphs were captured by then, and what the compile report says fell
    back. degrees None and graphs False: the one-process reference, eager."""
    import fastusp

    pipe = tiny_flux_pipeline() if name == "flux" else tiny_qwen_pipeline()
    inputs = flux_inputs(height=3, width=5) if name == "flux" else qwen_inputs(height=4, width=6)
    counts, report = {"captures": 0}, None
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    if graphs:
        fake_cuda_graphs(counts, lambda: _model_fingerprint(pipe.transformer))
        report = compile_as_on_cuda(pipe.transformer, backend)
    outputs = []
    for name, change, kwargs in _changes(pipe):
        change()
        with torch.no_grad():
            out = pipe.transformer(**inputs, **kwargs, return_dict=False)[0]
        outputs.append((name, out, counts["captures"]))
    return outputs, sorted(report.fell_back) if report else None


def _model_fingerprint(transformer) -> tuple:
    """Every tensor's name, address and values, and every PEFT layer's adapter settings (values, not identities;
    scales to 9 digits, see EXPECTED_CAPTURES)."""
    tensors = tuple((name, t.data_ptr(), tuple(t.flatten()[:64].tolist()), t.sum().item())
                    for name, t in transformer.state_dict(keep_vars=True).items())
    adapters = tuple((name, tuple(m.active_adapters), m.disable_adapters, tuple(m.merged_adapters),
                      tuple((k, round(v, 9)) for k, v in sorted(m.scaling.items())))
                     for name, m in transformer.named_modules() if hasattr(m, "merged_adapters"))
    return tensors, adapters


EXPECTED_CAPTURES = {  # graphs captured by the end of each step
    "no LoRA": 1, "load a": 2, "a at 0.8": 3,
    "call scale 0.7": 4,  # a new Python value in the call: its own graph
    # replayed: diffusers multiplied the layers' 0.8 by 0.7 for the call and divided it out again, which leaves
    # 0.7999999999999999: the same model, not a reason to capture again
    "call scale 0.7 again": 4,
    "load b, a + b": 5, "disabled": 6, "enabled": 7, "a fused": 8, "unfused": 9, "a weight reallocated": 10,
    "another model built": 10,  # nothing in this transformer changed
    "unloaded": 11,
}


@pytest.mark.parametrize("name, backend", [("flux", None), ("flux", "eager"), ("qwen", None)],
                         ids=["flux-graphs", "flux-dynamo+graphs", "qwen-graphs"])
def test_cuda_graphs_are_recaptured_after_every_adapter_change(name, backend):
    # backend "eager": the blocks are compiled too (Dynamo, no Inductor: CI time), so their guards see each change;
    # past Dynamo's recompile_limit the blocks run eagerly inside the graphs, still matching
    expected, _ = _run_changes(name, None, graphs=False)
    assert _rel(expected[1][1], expected[0][1]) > 1e-2  # precondition: the LoRA changes the output
    for outputs, fell_back in run_distributed(_run_changes, 2, name, dict(ulysses=2), backend, timeout=240):
        for (name, out, captures), (_, ref, _) in zip(outputs, expected):
            assert _rel(out, ref) < TOL, name
            assert captures == EXPECTED_CAPTURES[name], name
        # the changes outnumber Dynamo's 8 versions per block kind; the report says why blocks ran eagerly
        assert fell_back == (["recompile limit"] if backend else [])

