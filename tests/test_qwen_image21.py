"""Qwen-Image 2.1 (one joint [text | images] sequence, block-causal attention, a prefix KV cache) under fastusp
equals the single-process model (float32, CPU, gloo)."""

import pytest
import torch

import fastusp
from _dist import run_distributed
from fastusp.testing import StubQwen3VLProcessor, qwen21_inputs, random_lora_state_dict, tiny_qwen21

LAYOUTS = [(2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]  # (ulysses, ring)
# 4 text tokens, a 2x2 condition image (one slot), 5 text tokens, then a 4x6 target image: 37 tokens, uneven over
# 2 and 4 ranks; over 4 ranks the first ring chunk ends inside the second text run, the next two in the target image.
# The second sample's last 2 text tokens are padding.
INPUTS = dict(text_lens=(4, 5), condition_hw=(2, 2), valid_lens=(9, 7))
LAYERS = 2


def _cache():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    return QwenImage21KVCache(LAYERS)


def _three_calls(model, inputs):
    """What the pipeline does, and the plain forward: (no cache, the cache's first step, a later cached step)."""
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
        cache = _cache()
        first = model(**inputs, kv_cache=cache, kv_cache_mode="extract", return_dict=False)[0]
        later = model(**dict(inputs, timestep=inputs["timestep"] * 0.4), kv_cache=cache, kv_cache_mode="cached",
                      return_dict=False)[0]
    return plain, first, later


def _parallel_three_calls(inputs, ulysses, ring, compiled=False, fp8_comm=False):
    model = fastusp.parallelize(tiny_qwen21(), ulysses=ulysses, ring=ring, fp8_comm=fp8_comm)
    if compiled:
        fastusp.compile_pipeline(model)
    outs = _three_calls(model, inputs)
    return outs, fastusp.compile_report(model).summary() if compiled else None


def _assert_close(outs, refs, tol=1e-5):
    for name, out, ref in zip(("no cache", "extract", "cached"), outs, refs):
        assert out.shape == ref.shape, name
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_reference_exercises_mask_and_block_causal_structure(monkeypatch):
    # preconditions of the parity tests below: the padded prompt tokens and the block-causal structure both change
    # the single-process output, so a parallel model that dropped either would not match it
    import diffusers.models.transformers.transformer_qwenimage21 as q21

    inputs = qwen21_inputs(**INPUTS)
    model = tiny_qwen21()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        unmasked = model(**dict(inputs, encoder_hidden_states_mask=None), return_dict=False)[0]
        monkeypatch.setattr(q21, "_qwenimage21_prefix_segments", lambda image_ids, prefix_len: [])  # all rows see all
        full = model(**inputs, return_dict=False)[0]
    assert ((ref - unmasked).norm() / ref.norm()).item() > 1e-3
    assert ((ref - full).norm() / ref.norm()).item() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}r{l[1]}")
def test_transformer_and_kv_cache_match_one_process(layout):
    inputs = qwen21_inputs(**INPUTS)
    refs = _three_calls(tiny_qwen21(), inputs)
    for outs, _ in run_distributed(_parallel_three_calls, layout[0] * layout[1], inputs, *layout):
        _assert_close(outs, refs)


def test_fp8_communication_stays_close():
    # q/k/v and the output cross the Ulysses all-to-alls as float8 with their scales: lossy, but close
    inputs = qwen21_inputs(**INPUTS)
    refs = _three_calls(tiny_qwen21(), inputs)
    for outs, _ in run_distributed(_parallel_three_calls, 4, inputs, 2, 2, False, "all"):
        _assert_close(outs, refs, tol=3e-2)
        assert ((outs[0] - refs[0]).norm() / refs[0].norm()).item() > 1e-6  # it did go through float8


def test_compiled_matches_one_process():
    inputs = qwen21_inputs(**INPUTS)
    refs = _three_calls(tiny_qwen21(), inputs)
    for outs, summary in run_distributed(_parallel_three_calls, 2, inputs, 2, 1, True, timeout=400):
        _assert_close(outs, refs, tol=1e-4)
        assert "compiled QwenImage21TransformerBlock" in summary and "fell back" not in summary, summary


def _layout_calls(model):
    """model(**inputs) for five inputs: a mask, the same again, an equal mask in another tensor, another mask of the
    same shape (the condition image one text token later), and that tensor changed in place to the other mask."""
    first, other = qwen21_inputs(**INPUTS), qwen21_inputs(**dict(INPUTS, text_lens=(5, 4)), seed=2)
    assert first["img_mask"].shape == other["img_mask"].shape and not first["img_mask"].equal(other["img_mask"])
    mask = first["img_mask"].clone()
    outs = []
    with torch.no_grad():
        for inputs in (first, first, dict(first, img_mask=mask), other):
            outs.append(model(**inputs, return_dict=False)[0])
        mask.copy_(other["img_mask"])
        outs.append(model(**dict(other, img_mask=mask), return_dict=False)[0])
    return outs


def _layout_calls_counting_builds():
    """_layout_calls under Ulysses-2, and how often the model built its RoPE table and its token labels."""
    model, builds = tiny_qwen21(), {"rope": 0, "labels": 0}

    def counted(name, build):
        def call(*args, **kwargs):
            builds[name] += 1
            return build(*args, **kwargs)
        return call

    model.pos_embed.forward = counted("rope", model.pos_embed.forward)
    model.build_token_metadata = counted("labels", model.build_token_metadata)
    return _layout_calls(fastusp.parallelize(model, ulysses=2)), builds


def test_joint_layout_is_built_once_per_mask():
    # the RoPE table and the token labels are host work at every step, and the pipeline passes the same img_mask at
    # every step: fastusp builds them once per mask value, so an equal mask reuses them and a changed one does not
    refs = _layout_calls(tiny_qwen21())
    for outs, builds in run_distributed(_layout_calls_counting_builds, 2):
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5, f"call {i}"
        assert builds == {"rope": 2, "labels": 2}, builds


def _pipeline(degrees, offload: bool = False, graph_counts: dict | None = None):
    """QwenImage21Pipeline around the tiny transformer; degrees: parallelize(pipe, **degrees), None: one process.
    offload: diffusers' model CPU offload (device="cpu": the hooks are the same on a GPU), after parallelize.
    graph_counts: compile_pipeline's CUDA graphs of all blocks (capture faked on the CPU, counted in it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                               processor=StubQwen3VLProcessor(), transformer=tiny_qwen21())
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    if graph_counts is not None:
        from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs

        fake_cuda_graphs(graph_counts)
        compile_as_on_cuda(pipe.transformer)
    if offload:
        pipe.enable_model_cpu_offload(device="cpu")
    return pipe


def _load_lora(pipe):
    """A random LoRA (the same on every rank and in every process) on every linear layer of the blocks."""
    targets = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out")
    pipe.load_lora_weights(random_lora_state_dict(pipe.transformer, seed=1, targets=targets), adapter_name="a")


def _latents(pipe):
    """Latents of one call: three steps with true CFG and the KV cache (a new cache each call)."""
    g = torch.Generator().manual_seed(3)
    prompt, negative = torch.randn(2, 6, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # the second prompt is padded
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                    negative_prompt_embeds_mask=torch.ones(2, 4, dtype=torch.bool), true_cfg_scale=4.0, height=64,
                    width=96, num_inference_steps=3, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def _pipeline_latents(degrees, lora: bool = False, offload: bool = False, graphs: bool = False):
    """_latents of _pipeline(degrees, offload); lora: _load_lora after parallelize. graphs: under the CUDA graphs of
    all blocks, the latents of two calls, stacked."""
    pipe = _pipeline(degrees, offload, {} if graphs else None)
    if lora:
        _load_lora(pipe)
    return torch.stack([_latents(pipe), _latents(pipe)]) if graphs else _latents(pipe)


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(cfg=2), dict(cfg=2, ulysses=2)],
                         ids=["u2", "r2", "cfg2", "cfg2-u2"])
def test_pipeline_true_cfg_with_kv_cache_matches_one_process(degrees):
    # three steps of QwenImage21Pipeline with a negative prompt: each pass fills its own KV cache on the first step
    # and decodes from it on the next two. With cfg=2 each half of the ranks runs one pass; the prompt (6 tokens)
    # and the negative prompt (4) make first-step outputs of different lengths for the two halves to exchange
    ref = _pipeline_latents(None)
    world = degrees.get("cfg", 1) * degrees.get("ulysses", 1) * degrees.get("ring", 1)
    for out in run_distributed(_pipeline_latents, world, degrees):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(cfg=2)], ids=["u2", "cfg2"])
def test_pipeline_under_cuda_graphs_of_all_blocks_matches_one_process(degrees):
    # two pipeline calls, each with its own caches: the graphs captured in the first must read the second's
    ref = _pipeline_latents(None)
    for outs in run_distributed(_pipeline_latents, 2, degrees, False, False, True):
        for out in outs:
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_model_cpu_offload_matches_one_process():
    # the offload hook wraps the forward that parallelize replaced; the blocks' own hooks stay beneath it
    ref = _pipeline_latents(None)
    for out in run_distributed(_pipeline_latents, 2, dict(ulysses=2), False, True):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_lora_loaded_after_parallelize_matches_one_process():
    pytest.importorskip("peft")  # diffusers' LoRA loading needs it; the test extra installs it
    ref, plain = _pipeline_latents(None, lora=True), _pipeline_latents(None)
    assert ((ref - plain).norm() / ref.norm()).item() > 1e-2  # precondition: the LoRA changes the latents
    for out in run_distributed(_pipeline_latents, 2, dict(ulysses=2), True):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _lora_loaded_between_graphed_calls():
    counts = {}
    pipe = _pipeline(dict(ulysses=2), graph_counts=counts)
    before = _latents(pipe)
    captures = counts["captures"]
    _load_lora(pipe)
    return before, _latents(pipe), captures, counts["captures"]


def test_lora_loaded_after_capture_is_captured_anew():
    # the graphs were captured without the LoRA: replaying them would drop it
    pytest.importorskip("peft")
    plain, ref = _pipeline_latents(None), _pipeline_latents(None, lora=True)
    for before, after, captures_before, captures_after in run_distributed(_lora_loaded_between_graphed_calls, 2):
        assert ((before - plain).norm() / plain.norm()).item() < 1e-5
        assert ((after - ref).norm() / ref.norm()).item() < 1e-5
        assert captures_after > captures_before > 0, (captures_before, captures_after)


def test_text_bucket_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="QwenImage21Transformer2DModel builds inside its forward"):
        fastusp.compile_pipeline(tiny_qwen21(), text_bucket=64)


def _graphed_calls(rounds, ulysses, ring, backend):
    """The three calls for each inputs of `rounds` (each round with a new cache) under compile_pipeline's CUDA graphs
    of all blocks (capture faked on the CPU: a replay reruns the blocks on the static inputs, which each call copies
    in; a replay under another sequence layout than its capture's fails)."""
    from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs

    model = fastusp.parallelize(tiny_qwen21(), ulysses=ulysses, ring=ring)
    counts = {}
    fake_cuda_graphs(counts, fingerprint=lambda: model._fastusp_context.current_layout().tokens)
    report = compile_as_on_cuda(model, backend)
    outs = [_three_calls(model, inputs) for inputs in rounds]
    return outs, counts, report.summary()


@pytest.mark.parametrize("layout", [(2, 1), (1, 2)], ids=lambda l: f"u{l[0]}r{l[1]}")
def test_cuda_graphs_of_all_blocks_match_one_process(layout):
    # the forward reads tensors on the host (.tolist()) before its blocks, so the blocks are captured together. The
    # cache's first step runs eagerly (it stores new tensors); a cached step's keys and values are graph inputs: the
    # second round's new cache must be read, not the first round's. The third round's prompt is one token longer:
    # rank 0 holds 19 rows of 37 and of 38 tokens, but every rank must capture anew, under the new layout
    inputs = qwen21_inputs(**INPUTS)
    longer = qwen21_inputs(**dict(INPUTS, text_lens=(4, 6), valid_lens=(10, 8)), seed=2)
    rounds = [inputs, dict(inputs, hidden_states=inputs["hidden_states"] * 0.5), longer]
    refs = [_three_calls(tiny_qwen21(), x) for x in rounds]
    for outs, counts, summary in run_distributed(_graphed_calls, 2, rounds, *layout, None):
        for out, ref in zip(outs, refs):
            _assert_close(out, ref)
        # per sequence layout: one graph of the uncached forward, one of the cached step; no more
        assert counts["captures"] == 4, counts
        assert counts["replays"] > counts["captures"], counts
        assert "all-blocks CUDA graphs=on" in summary and "fell back" not in summary, summary
