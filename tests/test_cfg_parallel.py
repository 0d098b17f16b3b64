"""CFG parallelism: parallelize(pipe, cfg=2) runs a step's two guidance passes on two halves of the ranks.

Tiny random pipelines on CPU ranks (gloo), true CFG with different positive and negative prompts (Qwen-Image: 7
and 4 tokens; FLUX needs equal lengths), so which pass a rank ran is visible in the text its transformer embedded.
Every result must equal one process.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from test_pipelines import BUILDERS, EMBEDDERS, IMAGE_TOKENS, STEPS, H, W, _assert_close
from test_pipelines import _generate as generate_tiny
from fastusp.testing import prompt_kwargs

POSITIVE, NEGATIVE = 7, {"flux": 7, "qwen": 4}  # text tokens of the two guidance passes
RAW_TEXT_INPUT = {"flux": "context_embedder", "qwen": "txt_norm"}  # the first module to see the prompt embeds


def _call_kwargs(pipe, guidance: bool) -> dict:
    kwargs = prompt_kwargs(pipe, text_len=POSITIVE, seed=0)
    if guidance:
        negative = NEGATIVE["flux" if type(pipe).__name__.startswith("Flux") else "qwen"]
        kwargs.update(prompt_kwargs(pipe, text_len=negative, seed=1, negative=True), true_cfg_scale=2.0)
    else:
        kwargs["true_cfg_scale"] = 1.0  # Qwen-Image's default (4.0) would warn that no negative prompt was given
    return kwargs


def _generate(pipe, guidance: bool) -> dict:
    return generate_tiny(pipe, 0, _call_kwargs(pipe, guidance))


_REFERENCE = {}


def _reference(name: str, guidance: bool) -> dict:
    if (name, guidance) not in _REFERENCE:
        pipe = BUILDERS[name]()
        pipe.set_progress_bar_config(disable=True)
        _REFERENCE[name, guidance] = _generate(pipe, guidance)
    return _REFERENCE[name, guidance]


def _record_embedded(name: str, pipe) -> list:
    """What this process's transformer embeds per call: ("img" | "txt", tokens, sum of the values)."""
    seen = []
    for kind, module in zip(("img", "txt"), (EMBEDDERS[name][0], RAW_TEXT_INPUT[name])):
        getattr(pipe.transformer, module).register_forward_pre_hook(
            lambda m, a, kind=kind: seen.append((kind, a[0].shape[1], a[0].sum().item())))
    return seen


def _worker(name: str, guidance: bool, degrees: dict, compiled: bool = False) -> dict:
    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, **degrees)
    if compiled:  # regional compile of the blocks; cfg's wrapper and the sharded forward stay around them
        fastusp.compile_pipeline(pipe, backend="aot_eager")
    seen = _record_embedded(name, pipe)
    return dict(_generate(pipe, guidance), seen=seen)


@pytest.mark.parametrize("name, degrees", [
    ("qwen", dict(cfg=2)), ("flux", dict(cfg=2)), ("qwen", dict(cfg=2, ulysses=2)), ("flux", dict(cfg=2, ring=2))],
    ids=["qwen-cfg2", "flux-cfg2", "qwen-cfg2-ulysses2", "flux-cfg2-ring2"])
def test_guidance_passes_split_over_cfg_groups(name, degrees):
    expected = _reference(name, guidance=True)
    world = 2 * degrees.get("ulysses", 1) * degrees.get("ring", 1)
    results = run_distributed(_worker, world, name, True, degrees)
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
        _assert_close(out["latents"], expected["latents"], f"rank {rank} final latents")
    _assert_one_pass_per_group(results, _call_kwargs(BUILDERS[name](), guidance=True))


def _assert_one_pass_per_group(results: list, prompts: dict) -> None:
    """Each cfg group ran one pass per step: the first half of the ranks only the positive prompt, the second half
    only the negative one, each split over its own ranks."""
    group_size = len(results) // 2
    for group, key in enumerate(["prompt_embeds", "negative_prompt_embeds"]):
        members = results[group * group_size:(group + 1) * group_size]
        text = [[(n, total) for kind, n, total in out["seen"] if kind == "txt"] for out in members]
        assert all(len(t) == STEPS for t in text), f"group {group}: text embedder calls per rank {text}"
        for step in range(STEPS):
            assert sum(t[step][0] for t in text) == prompts[key].shape[1], text
            assert sum(t[step][1] for t in text) == pytest.approx(prompts[key].sum().item(), rel=1e-5), key
        image = [[n for kind, n, _ in out["seen"] if kind == "img"] for out in members]
        assert [sum(i[step] for i in image) for step in range(STEPS)] == [IMAGE_TOKENS] * STEPS, image


def _img2img(base=None) -> tuple:
    """FluxImg2ImgPipeline made from a FluxPipeline (the tiny one, or `base`), and its call kwargs: true CFG, an input
    image, strength 0.9 (both steps run). diffusers 0.42's img2img loop sets no `_current_timestep`: the progress bar
    marks the loop."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline.from_pipe(base if base is not None else BUILDERS["flux"]())
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    return pipe, dict(_call_kwargs(pipe, guidance=True), image=image, strength=0.9)


def _img2img_worker(from_parallelized: bool) -> dict:
    import fastusp

    if from_parallelized:  # from_pipe of a parallelized pipeline: the transformer is shared, already parallelized
        text2image = fastusp.parallelize(BUILDERS["flux"](), cfg=2)
        pipe, kwargs = _img2img(text2image)
        errors = []  # a pipeline parallelized twice; a shared transformer asked for other settings
        for again, degrees in ((text2image, dict(cfg=2)), (_img2img(text2image)[0], dict(ulysses=2))):
            try:
                fastusp.parallelize(again, **degrees)
            except ValueError as e:
                errors.append(str(e))
    else:
        pipe, kwargs = _img2img()
        errors = None
    fastusp.parallelize(pipe, cfg=2)
    seen = _record_embedded("flux", pipe)
    out = dict(generate_tiny(pipe, 0, kwargs), seen=list(seen), errors=errors)
    if from_parallelized:  # and the first pipeline still runs its passes split
        out["text2image"] = _generate(text2image, guidance=True)["image"]
    return out


@pytest.mark.parametrize("from_parallelized", [False, True], ids=["new", "from-parallelized-pipe"])
def test_img2img_pipeline_splits_its_guidance_passes(from_parallelized):
    pipe, kwargs = _img2img()
    pipe.set_progress_bar_config(disable=True)
    expected = generate_tiny(pipe, 0, kwargs)
    results = run_distributed(_img2img_worker, 2, from_parallelized)
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
    _assert_one_pass_per_group(results, kwargs)
    if from_parallelized:
        for rank, out in enumerate(results):
            _assert_close(out["text2image"], _reference("flux", guidance=True)["image"], f"rank {rank} text2image")
            assert "already parallelized by fastusp" in out["errors"][0], out["errors"]
            assert "must use the same settings" in out["errors"][1], out["errors"]


def test_the_progress_bar_marks_the_denoising_loop_in_both_forms():
    from fastusp.cfg_parallel import DenoisingLoop

    pipe = BUILDERS["flux"]()
    pipe.set_progress_bar_config(disable=True)
    starts = []
    loop = DenoisingLoop(on_start=lambda: starts.append(len(starts)))
    loop.track(pipe)
    inside = []
    with pipe.progress_bar(total=2) as bar:  # the form every FLUX / Qwen-Image pipeline uses
        inside.append(loop.pipe)
        bar.update()
    assert loop.pipe is None
    for _ in pipe.progress_bar([1, 2]):
        inside.append(loop.pipe)
    assert inside == [pipe, pipe, pipe] and loop.pipe is None
    assert starts == [0, 1]  # once per loop: where a call that raised mid-step has its leftover passes dropped


def test_compiled_pipeline_with_cfg_parallelism():
    expected = _reference("qwen", guidance=True)
    for rank, out in enumerate(run_distributed(_worker, 2, "qwen", True, dict(cfg=2), True)):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")


def _raise_mid_step_then_generate(name: str) -> dict:
    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, cfg=2)
    calls = []

    def fail_second_call(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted between the guidance passes")

    handle = pipe.transformer.register_forward_pre_hook(fail_second_call, with_kwargs=True)
    with pytest.raises(RuntimeError, match="interrupted"):  # another size: a stale pass would not even pair up
        pipe(**_call_kwargs(pipe, True), height=H, width=H, num_inference_steps=STEPS, output_type="pt")
    handle.remove()
    return _generate(pipe, guidance=True)


def test_a_call_that_raised_mid_step_leaves_nothing_behind():
    expected = _reference("qwen", guidance=True)
    for rank, out in enumerate(run_distributed(_raise_mid_step_then_generate, 2, "qwen", timeout=60)):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")


def test_without_guidance_the_first_group_runs_every_pass():
    # One pass per step: cfg group 0 runs it, group 1 receives it at scheduler.step.
    expected = _reference("flux", guidance=False)
    results = run_distributed(_worker, 2, "flux", False, dict(cfg=2))
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
    calls = [len([n for kind, n, _ in out["seen"] if kind == "img"]) for out in results]
    assert calls == [STEPS, 0], f"transformer calls per rank: {calls}"


def _direct_call_worker(name: str, after_pipeline: bool) -> torch.Tensor:
    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, cfg=2)
    if after_pipeline:  # the loop it ran has ended: the direct call must not be paired as a guidance pass
        _generate(pipe, guidance=True)
    with torch.no_grad():
        return pipe.transformer(**_transformer_inputs(pipe), return_dict=False)[0]


def _transformer_inputs(pipe) -> dict:
    g = torch.Generator().manual_seed(3)
    cfg = pipe.transformer.config
    return dict(hidden_states=torch.randn(1, IMAGE_TOKENS, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, POSITIVE, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(IMAGE_TOKENS, 3), txt_ids=torch.zeros(POSITIVE, 3))


@pytest.mark.parametrize("after_pipeline", [False, True], ids=["fresh", "after-pipeline"])
def test_a_call_outside_the_denoising_loop_runs_on_every_group(after_pipeline):
    pipe = BUILDERS["flux"]()
    with torch.no_grad():
        expected = pipe.transformer(**_transformer_inputs(pipe), return_dict=False)[0]
    for rank, out in enumerate(run_distributed(_direct_call_worker, 2, "flux", after_pipeline)):
        _assert_close(out, expected, f"rank {rank} transformer output")


def _mesh_worker() -> dict:
    import torch.distributed as dist

    from fastusp import ParallelConfig

    config = ParallelConfig(cfg=2, ulysses=2)
    config.build_mesh("cpu")
    members = lambda group: dist.get_process_group_ranks(group)
    return dict(cfg_rank=config.cfg_rank, sequence_rank=config.sequence_rank, ulysses_rank=config.ulysses_rank,
                ring_rank=config.ring_rank, sequence=members(config.sequence_group), cfg=members(config.cfg_group),
                ulysses=members(config.ulysses_group))


def test_mesh_puts_cfg_outermost():
    results = run_distributed(_mesh_worker, 4)
    assert [r["cfg_rank"] for r in results] == [0, 0, 1, 1]
    assert [r["sequence_rank"] for r in results] == [0, 1, 0, 1]
    assert [r["ulysses_rank"] for r in results] == [0, 1, 0, 1]
    assert [r["ring_rank"] for r in results] == [0, 0, 0, 0]
    assert [r["sequence"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["ulysses"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["cfg"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def _batch_cases() -> list[tuple[int, bool]]:
    return [(batch, guidance) for batch in (1, 3) for guidance in (False, True)]


def _batch_call_kwargs(pipe, batch: int, guidance: bool) -> dict:
    kwargs = prompt_kwargs(pipe, text_len=POSITIVE, batch=batch, seed=0)
    if guidance:
        negative = NEGATIVE["flux" if type(pipe).__name__.startswith("Flux") else "qwen"]
        kwargs.update(prompt_kwargs(pipe, text_len=negative, batch=batch, seed=1, negative=True), true_cfg_scale=2.0)
    else:
        kwargs["true_cfg_scale"] = 1.0
    return kwargs


def _batch_worker(name: str, degrees: dict, parallel: bool = True) -> list:
    import fastusp

    pipe = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    if parallel:
        fastusp.parallelize(pipe, **degrees)
    return [generate_tiny(pipe, 0, _batch_call_kwargs(pipe, batch, guidance)) for batch, guidance in _batch_cases()]


@pytest.mark.parametrize("name", ["flux", "qwen"])
@pytest.mark.parametrize("degrees", [dict(cfg=2, ulysses=2), dict(cfg=2, ring=2)], ids=["cfg2-ulysses2", "cfg2-ring2"])
def test_batches_with_and_without_guidance_match_one_process_on_every_rank(name, degrees):
    # A batch > 1 made the gathered output a non-contiguous view; the group that skipped a pass then received it
    # in the wrong element order (broadcast sends a tensor's storage).
    expected = _batch_worker(name, degrees, parallel=False)
    for rank, outputs in enumerate(run_distributed(_batch_worker, 4, name, degrees)):
        for (batch, guidance), out, ref in zip(_batch_cases(), outputs, expected):
            case = f"rank {rank}, batch {batch}, guidance {guidance}"
            _assert_close(out["image"], ref["image"], f"{case} image")
            _assert_close(out["latents"], ref["latents"], f"{case} final latents")
