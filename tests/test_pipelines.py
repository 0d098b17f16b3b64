"""End to end through real diffusers pipelines: fastusp.parallelize(pipe) on 2 CPU ranks == one process.

Tiny random FluxPipeline / QwenImagePipeline (fastusp/testing.py), 32x48 images (96 image tokens), 2 steps.
Qwen-Image runs with true CFG: a padded positive prompt (mask with zeros -> attention bias) and a shorter negative
prompt (all-ones mask, dropped by the pipeline), so each step makes two transformer calls with different layouts.
"""
from __future__ import annotations

import pytest
import torch

from _dist import run_distributed
from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs
from fastusp.testing import (prompt_kwargs, tiny_call_kwargs, tiny_controlnet_pipeline, tiny_flux2_pipeline,
                            tiny_flux_pipeline, tiny_qwen_edit_pipeline, tiny_qwen_layered_pipeline, tiny_qwen_pipeline)

H, W, STEPS = 32, 48, 2
IMAGE_TOKENS = (H // 4) * (W // 4)
TOL = 1e-4

BUILDERS = {"flux": tiny_flux_pipeline, "flux2": tiny_flux2_pipeline, "qwen": tiny_qwen_pipeline}
# text tokens per transformer call in one step (Qwen-Image: cond, uncond)
TEXT_LENS = {"flux": [7], "flux2": [7], "qwen": [7, 4]}
# what each pipeline embeds first: image tokens, text tokens
EMBEDDERS = {"flux": ("x_embedder", "context_embedder"), "flux2": ("x_embedder", "context_embedder"),
             "qwen": ("img_in", "txt_in")}


def _generate(pipe, seed: int | None, call_kwargs: dict | None = None, steps: int = STEPS) -> dict:
    """Run the pipeline on call_kwargs (default: tiny_call_kwargs); seed=None: no generator (the global RNG draws the
    noise). Returns the image and the final latents."""
    final = {}

    def on_step_end(p, i, t, kw):
        final["latents"] = kw["latents"].clone()
        return {}

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    image = pipe(**(call_kwargs or tiny_call_kwargs(pipe, text_len=7)), height=H, width=W, num_inference_steps=steps,
                 generator=generator, output_type="pt", callback_on_step_end=on_step_end).images
    return dict(image=image, latents=final["latents"])


def _record_tokens(name: str, pipe) -> list:
    """Count the image / text tokens this process's transformer embeds per call (to prove it ran on a shard)."""
    seen = []
    img_mod, txt_mod = (getattr(pipe.transformer, m) for m in EMBEDDERS[name])
    img_mod.register_forward_pre_hook(lambda m, a: seen.append(["img", a[0].shape[1]]))
    txt_mod.register_forward_pre_hook(lambda m, a: seen.append(["txt", a[0].shape[1]]))
    return seen


_REFERENCE = {}


def _reference(name: str, seed: int, global_seed: bool = False) -> dict:
    """Single-process run (this process, no torch.distributed). global_seed: torch.manual_seed(seed), no generator."""
    key = (name, seed, global_seed)
    if key not in _REFERENCE:
        pipe = BUILDERS[name]()
        pipe.set_progress_bar_config(disable=True)
        if global_seed:
            torch.manual_seed(seed)
        _REFERENCE[key] = _generate(pipe, None if global_seed else seed)
    return _REFERENCE[key]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    rel = diff / expected.abs().max().item()
    assert diff <= TOL and rel <= TOL, f"{what}: max abs diff {diff:.3g}, rel err {rel:.3g} > {TOL}"


# --- workers: run on every rank ---------------------------------------------------------------------------------

def _parallel_worker(name: str, ulysses: int, ring: int, seed: int) -> dict:
    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, ulysses=ulysses, ring=ring)
    seen = _record_tokens(name, pipe)
    return dict(_generate(pipe, seed), seen=seen)


def _rank_consistency_worker(name: str, ulysses: int, ring: int) -> dict:
    import torch.distributed as dist

    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, ulysses=ulysses, ring=ring)
    torch.manual_seed(100 + dist.get_rank())  # every rank would draw different noise
    out = _generate(pipe, None)
    out["progress_bar_config"] = dict(getattr(pipe, "_progress_bar_config", {}))
    return out


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_parallel_pipeline_matches_single_process(name, ulysses, ring):
    expected = _reference(name, seed=0)
    results = run_distributed(_parallel_worker, 2, name, ulysses, ring, 0)
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
        _assert_close(out["latents"], expected["latents"], f"rank {rank} final latents")

    # The transformer really ran on shards: per call, the ranks' image / text tokens add up to the full sequence
    # and no rank saw all image tokens (a no-op parallelize() would pass the checks above on its own).
    calls = STEPS * len(TEXT_LENS[name])
    for kind, full in [("img", [IMAGE_TOKENS] * len(TEXT_LENS[name])), ("txt", TEXT_LENS[name])]:
        per_rank = [[n for k, n in out["seen"] if k == kind] for out in results]
        assert all(len(p) == calls for p in per_rank), f"{kind} embedder calls per rank: {per_rank}"
        totals = [sum(p[c] for p in per_rank) for c in range(calls)]
        assert totals == full * STEPS, f"{kind} tokens per rank {per_rank} do not add up to {full}"
    assert all(n < IMAGE_TOKENS for out in results for k, n in out["seen"] if k == "img")


@pytest.mark.parametrize("name,ulysses,ring", [("flux", 2, 1), ("qwen", 1, 2), ("flux2", 2, 1)],
                         ids=["flux-ulysses2", "qwen-ring2", "flux2-ulysses2"])
def test_rank_consistency_without_generator(name, ulysses, ring):
    expected = _reference(name, seed=100, global_seed=True)
    # precondition: the other rank's seed gives a clearly different image, so equality below means rank 0's noise
    other = _reference(name, seed=101, global_seed=True)
    assert (other["image"] - expected["image"]).abs().max() > 0.05

    results = run_distributed(_rank_consistency_worker, 2, name, ulysses, ring)
    for rank, out in enumerate(results):
        _assert_close(out["image"], results[0]["image"], f"rank {rank} vs rank 0 image")
        _assert_close(out["image"], expected["image"], f"rank {rank} image vs single process seeded 100")
        _assert_close(out["latents"], expected["latents"], f"rank {rank} latents vs single process seeded 100")

    assert results[0]["progress_bar_config"].get("disable", False) is False, results[0]["progress_bar_config"]
    assert results[1]["progress_bar_config"].get("disable") is True, results[1]["progress_bar_config"]


def _controlnet_kwargs(pipe, scale: float = 1.0, guidance: bool = False) -> dict:
    """tiny_call_kwargs (Qwen-Image: true CFG) and a control image; guidance: FLUX with true CFG as well."""
    kwargs = dict(tiny_call_kwargs(pipe), controlnet_conditioning_scale=scale,
                  control_image=torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(5)))
    if guidance and type(pipe).__name__.startswith("Flux"):
        kwargs.update(prompt_kwargs(pipe, text_len=7, seed=1, negative=True), true_cfg_scale=2.0)
    return kwargs


def _controlnet_worker(name: str, degrees: dict, offload: bool = False) -> dict:
    import fastusp

    pipe = tiny_controlnet_pipeline(name)
    kwargs = lambda: _controlnet_kwargs(pipe, guidance="cfg" in degrees)
    if offload:  # model CPU offload (hooks on the CPU): the ControlNet gets a hook of its own, outside the chain
        pipe.enable_model_cpu_offload(device="cpu")
    fastusp.parallelize(pipe, **degrees)
    if offload:
        _generate(pipe, 0, kwargs())  # after it the pipeline removes and re-adds its hooks
    calls, controlnet_calls = [], []
    getattr(pipe.transformer, EMBEDDERS[name][0]).register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    getattr(pipe.controlnet, EMBEDDERS[name][0]).register_forward_pre_hook(
        lambda m, a: controlnet_calls.append(a[0].shape[1]))
    return dict(_generate(pipe, 0, kwargs()), calls=calls, controlnet_calls=controlnet_calls)


@pytest.mark.parametrize("name, degrees, offload", [
    ("flux", dict(ulysses=2), False), ("flux", dict(ring=2), False), ("flux", dict(cfg=2), False),
    ("qwen", dict(ulysses=2), False), ("qwen", dict(cfg=2), False), ("flux", dict(ulysses=2), True),
], ids=["flux-ulysses2", "flux-ring2", "flux-cfg2", "qwen-ulysses2", "qwen-cfg2", "flux-ulysses2-offload"])
def test_controlnet_pipeline_matches_single_process(name, degrees, offload):
    guidance = "cfg" in degrees or name == "qwen"  # two transformer calls per step
    pipe = tiny_controlnet_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    expected = _generate(pipe, 0, _controlnet_kwargs(pipe, guidance=guidance))
    # precondition: the residuals change the image, so residuals added to the wrong image tokens would show
    without = _generate(pipe, 0, _controlnet_kwargs(pipe, scale=0.0, guidance=guidance))
    assert (without["image"] - expected["image"]).abs().max() > 0.05

    results = run_distributed(_controlnet_worker, 2, name, degrees, offload)
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
        _assert_close(out["latents"], expected["latents"], f"rank {rank} final latents")
    # sequence parallel: every call on half the image tokens; cfg: each rank one of a step's two passes, whole
    passes = 2 if guidance else 1
    expected_calls = [IMAGE_TOKENS] * STEPS if "cfg" in degrees else [IMAGE_TOKENS // 2] * (STEPS * passes)
    assert [out["calls"] for out in results] == [expected_calls] * 2
    # the ControlNet is sharded like the transformer (cfg=2 with one rank per group: nothing to shard)
    tokens = IMAGE_TOKENS if "cfg" in degrees else IMAGE_TOKENS // 2
    assert all(out["controlnet_calls"] and set(out["controlnet_calls"]) == {tokens} for out in results)


def _bucketed_controlnet_worker() -> dict:
    import fastusp

    pipe = tiny_controlnet_pipeline("qwen")
    fastusp.parallelize(pipe, ulysses=2)
    fastusp.compile_pipeline(pipe, backend="eager", text_bucket=8)  # Dynamo without Inductor: CI time
    text = []  # this rank's prompt tokens per ControlNet call
    pipe.controlnet.txt_in.register_forward_pre_hook(lambda m, a: text.append(a[0].shape[1]))
    return dict(_generate(pipe, 0, _controlnet_kwargs(pipe)), controlnet_text=text)


def test_text_bucket_pads_the_controlnets_prompt_too():
    # QwenImageControlNetPipeline runs its ControlNet once a step, on the 7-token prompt (padded, masked): with
    # text_bucket=8 the ControlNet, like the transformer, gets 8 tokens behind the mask (so its blocks compile for
    # one text length whatever the prompt), and the image stays the unpadded one
    pipe = tiny_controlnet_pipeline("qwen")
    pipe.set_progress_bar_config(disable=True)
    expected = _generate(pipe, 0, _controlnet_kwargs(pipe))
    results = run_distributed(_bucketed_controlnet_worker, 2)
    for rank, out in enumerate(results):
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
    per_call = [sum(lens) for lens in zip(*(out["controlnet_text"] for out in results))]  # both ranks' shares
    assert per_call == [8] * STEPS, per_call


def _from_pipe_worker(name: str) -> dict:
    import torch.distributed as dist

    import fastusp

    base = fastusp.parallelize(BUILDERS[name](), ulysses=2)
    pipe = fastusp.parallelize(type(base).from_pipe(base), ulysses=2)  # shares base's (parallelized) transformer
    torch.manual_seed(100 + dist.get_rank())  # every rank would draw different noise
    return _generate(pipe, None)


def test_a_pipeline_made_with_from_pipe_is_parallelized_too():
    expected = _reference("flux", seed=100, global_seed=True)
    for rank, out in enumerate(run_distributed(_from_pipe_worker, 2, "flux")):
        _assert_close(out["image"], expected["image"], f"rank {rank} image vs single process seeded 100")


def _latents_given_by_caller(name: str) -> tuple:
    import torch.distributed as dist

    import fastusp

    pipe = BUILDERS[name]()
    fastusp.parallelize(pipe, ulysses=2)
    torch.manual_seed(dist.get_rank())
    mine = torch.randn(1, IMAGE_TOKENS, pipe.transformer.config.in_channels)
    before = mine.clone()
    pipe(**tiny_call_kwargs(pipe, text_len=7), latents=mine, height=H, width=W, num_inference_steps=1,
         output_type="latent")
    return torch.equal(mine, before), dist.get_rank()


def test_callers_latents_are_not_overwritten():
    # Rank 0's latents are broadcast into a copy: rank 1's own tensor must stay what the caller made.
    assert [same for same, _ in run_distributed(_latents_given_by_caller, 2, "flux")] == [True, True]


def _random_image(seed: int, height: int, width: int, mode: str = "RGB"):
    """A PIL image of random pixels (the pipelines' reference / input images)."""
    import numpy as np
    import PIL.Image

    pixels = np.random.default_rng(seed).random((height, width, len(mode)))
    return PIL.Image.fromarray((pixels * 255).astype("uint8"), mode=mode)


def _edit(pipe, reference_seed: int = 7, degrees: dict | None = None) -> torch.Tensor:
    """Qwen-Image-Edit (Plus or not) with true CFG (a 7-token prompt, a 4-token negative one) on one 24x40 reference
    image."""
    import fastusp

    if degrees:
        fastusp.parallelize(pipe, **degrees)
    prompt, negative = prompt_kwargs(pipe, text_len=7), prompt_kwargs(pipe, text_len=4, seed=1)
    return pipe(image=_random_image(reference_seed, 24, 40), **prompt,
                negative_prompt_embeds=negative["prompt_embeds"],
                negative_prompt_embeds_mask=negative["prompt_embeds_mask"], true_cfg_scale=3.0, height=H, width=W,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("plus", [True, False], ids=["edit-plus-2511", "edit"])
@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(cfg=2)], ids=["ulysses2", "ring2", "cfg2"])
def test_qwen_image_edit_pipeline_matches_single_process(monkeypatch, degrees, plus):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    # a small reference image (forked ranks inherit the patches): Edit-Plus resizes it to VAE_IMAGE_SIZE pixels,
    # Edit to calculate_dimensions(1024², its aspect ratio)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 24 * 40)
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: (40, 24, None))
    expected = _edit(tiny_qwen_edit_pipeline(plus))
    # precondition: another reference image moves the output by several times the tolerance (8e-4 with these tiny
    # random weights), so mishandled reference tokens would show
    assert ((_edit(tiny_qwen_edit_pipeline(plus), reference_seed=8) - expected).norm() / expected.norm()).item() \
        > 3 * TOL
    for rank, out in enumerate(run_distributed(_edit, 2, tiny_qwen_edit_pipeline(plus), 7, degrees)):
        _assert_close(out, expected, f"rank {rank} latents vs single process")


def _kontext(reference_seed: int = 7, degrees: dict | None = None) -> torch.Tensor:
    """FLUX.1 Kontext (FluxKontextPipeline) with true CFG on one 24x40 reference image: its 60 tokens follow the
    edited image's 96 in the joint sequence, with RoPE ids of their own (first axis 1)."""
    from diffusers import FluxKontextPipeline

    import fastusp

    pipe = FluxKontextPipeline.from_pipe(tiny_flux_pipeline())
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    prompt, negative = prompt_kwargs(pipe, text_len=7), prompt_kwargs(pipe, text_len=7, seed=1, negative=True)
    # Kontext scales the output to max_area pixels (default 1024²) and the reference to one of its ~1 MP
    # resolutions; max_area and _auto_resize=False keep both at the test's sizes
    return pipe(image=_random_image(reference_seed, 24, 40), **prompt, **negative, true_cfg_scale=2.0,
                height=H, width=W, max_area=H * W, _auto_resize=False, num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(cfg=2)], ids=["ulysses2", "ring2", "cfg2"])
def test_flux_kontext_pipeline_matches_single_process(degrees):
    expected = _kontext()
    # precondition: the reference image matters, so mishandled reference tokens would show
    assert ((_kontext(reference_seed=8) - expected).norm() / expected.norm()).item() > 3 * TOL
    for rank, out in enumerate(run_distributed(_kontext, 2, 7, degrees)):
        _assert_close(out, expected, f"rank {rank} latents vs single process")


def _layered(pipe, image_seed: int = 7, degrees: dict | None = None) -> torch.Tensor:
    """Qwen-Image-Layered with true CFG: 2 layers (4 images: composite, layers, the RGBA input) from a 24x16 input.
    Returns the decoded composite and layers of the one sample."""
    import fastusp

    if degrees:
        fastusp.parallelize(pipe, **degrees)
    # prompt given: with none, the pipeline would caption the image with its (absent) vision-language model
    prompt, negative = prompt_kwargs(pipe, text_len=7), prompt_kwargs(pipe, text_len=4, seed=1)
    return pipe(image=_random_image(image_seed, 16, 24, mode="RGBA"), prompt="layers",
                **prompt, negative_prompt_embeds=negative["prompt_embeds"],
                negative_prompt_embeds_mask=negative["prompt_embeds_mask"], true_cfg_scale=3.0, layers=2,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="pt").images[0]  # diffusers 0.42's Layered pipeline fails on output_type="latent"


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(cfg=2)], ids=["ulysses2", "ring2", "cfg2"])
def test_qwen_image_layered_pipeline_matches_single_process(monkeypatch, degrees):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as layered

    # 24x16 pixels instead of 640² (forked ranks inherit it): 4 images of 6x4 latent tokens
    monkeypatch.setattr(layered, "calculate_dimensions", lambda area, ratio: (24, 16))
    expected = _layered(tiny_qwen_layered_pipeline())
    # precondition: another input image moves the output by several times the tolerance
    assert ((_layered(tiny_qwen_layered_pipeline(), image_seed=8) - expected).norm() / expected.norm()).item() > 3 * TOL
    for rank, out in enumerate(run_distributed(_layered, 2, tiny_qwen_layered_pipeline(), 7, degrees)):
        _assert_close(out, expected, f"rank {rank} latents vs single process")


def _flux2(reference_seed: int = 7, klein: bool = False, degrees: dict | None = None) -> torch.Tensor:
    """FLUX.2 with one 64x64 reference image: its 256 tokens follow the image's 96, with RoPE ids of their own (first
    axis 10). klein: Flux2KleinPipeline with true CFG (two passes a step, the negative prompt shorter); else
    Flux2Pipeline (embedded guidance, one pass)."""
    import fastusp

    pipe = tiny_flux2_pipeline(klein=klein)
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    prompt = prompt_kwargs(pipe, text_len=7)
    if klein:
        prompt.update(prompt_kwargs(pipe, text_len=5, seed=1, negative=True))
    return pipe(image=_random_image(reference_seed, 64, 64), **prompt, guidance_scale=4.0, height=H, width=W,
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("klein, degrees", [(False, dict(ulysses=2)), (False, dict(ring=2)),
                                            (True, dict(ulysses=2)), (True, dict(cfg=2))],
                         ids=["flux2-ulysses2", "flux2-ring2", "klein-ulysses2", "klein-cfg2"])
def test_flux2_pipeline_matches_single_process(klein, degrees):
    expected = _flux2(klein=klein)
    # precondition: the reference image matters, so mishandled reference tokens would show
    assert ((_flux2(reference_seed=8, klein=klein) - expected).norm() / expected.norm()).item() > 3 * TOL
    for rank, out in enumerate(run_distributed(_flux2, 2, 7, klein, degrees)):
        _assert_close(out, expected, f"rank {rank} latents vs single process")


def _flux2_inpaint(reference: bool = True, degrees: dict | None = None) -> torch.Tensor:
    """Flux2KleinInpaintPipeline with true CFG: a masked 32x48 image (its 96 tokens and 96 condition tokens of the
    masked image in every transformer call) and a 64x64 reference image (256 more tokens after them)."""
    import numpy as np
    import PIL.Image
    from diffusers import Flux2KleinInpaintPipeline

    import fastusp

    pipe = Flux2KleinInpaintPipeline.from_pipe(tiny_flux2_pipeline(klein=True))
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    mask = np.zeros((H, W), dtype="uint8")
    mask[4:28, 8:40] = 255
    prompt = dict(prompt_kwargs(pipe, text_len=7), **prompt_kwargs(pipe, text_len=5, seed=1, negative=True))
    return pipe(image=_random_image(7, H, W), mask_image=PIL.Image.fromarray(mask),
                image_reference=_random_image(8, 64, 64) if reference else None, **prompt, guidance_scale=4.0,
                strength=1.0, height=H, width=W, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(cfg=2)], ids=["ulysses2", "cfg2"])
def test_flux2_klein_inpaint_pipeline_matches_single_process(degrees):
    expected = _flux2_inpaint()
    # precondition: the reference image's tokens matter (1.4e-3 against none; another random reference image moves
    # this tiny model's latents by only 2e-4), so mishandled reference tokens would show
    assert ((_flux2_inpaint(reference=False) - expected).norm() / expected.norm()).item() > 3 * TOL
    for rank, out in enumerate(run_distributed(_flux2_inpaint, 2, True, degrees)):
        _assert_close(out, expected, f"rank {rank} latents vs single process")


# --- model CPU offload --------------------------------------------------------------------------------------------
# diffusers' enable_model_cpu_offload (device="cpu" here: the hooks are the same on a GPU) wraps each model's forward
# in an accelerate hook, and the pipeline removes and adds its hooks again after every call.

def _offload_worker(name: str, degrees: dict, offload_first: bool, graphs: bool = False,
                    group_offload: str | None = None) -> dict:
    """Two pipeline calls under model CPU offload, or under group offloading of the transformer at the given level
    ("block_level", "leaf_level"), set up before or after parallelize."""
    import fastusp

    pipe = BUILDERS[name]()
    counts = {}

    def offload():
        if group_offload is None:
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            pipe.transformer.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type=group_offload,
                                                  num_blocks_per_group=1)

    if offload_first:
        offload()
    fastusp.parallelize(pipe, **degrees)
    if not offload_first:
        offload()
    if graphs:
        _offload_moves_weights()
        fake_cuda_graphs(counts, lambda: [p.data_ptr() for p in pipe.transformer.parameters()])
        compile_as_on_cuda(pipe.transformer)
    seen = _record_tokens(name, pipe)
    calls = [_generate(pipe, 0), _generate(pipe, 0)]  # the second after the pipeline re-added its hooks
    return dict(calls=calls, seen=seen, counts=counts)


def _offload_moves_weights() -> None:
    """Make accelerate's offload hook move weights as it does on a GPU: to new memory when it brings the model back,
    nowhere while the model is there. (diffusers names the device "cpu:0", and on the CPU .to("cpu:0") copies every
    time.)"""
    from accelerate.hooks import CpuOffload

    init_hook, pre_forward = CpuOffload.init_hook, CpuOffload.pre_forward

    def offloaded(self, module):
        module._fastusp_test_offloaded = True
        return init_hook(self, module)

    def brought_back(self, module, *args, **kwargs):
        if getattr(module, "_fastusp_test_offloaded", False):
            for p in module.parameters():
                p.data = p.data.clone()
            module._fastusp_test_offloaded = False
        self.execution_device = torch.device("cpu")
        return pre_forward(self, module, *args, **kwargs)

    CpuOffload.init_hook, CpuOffload.pre_forward = offloaded, brought_back


@pytest.mark.parametrize("name,degrees,offload_first", [
    ("flux", dict(ulysses=2), True), ("flux", dict(ulysses=2), False),
    ("qwen", dict(cfg=2), True), ("qwen", dict(cfg=2), False), ("qwen", dict(ring=2), True),
], ids=["flux-ulysses2-offload-first", "flux-ulysses2-parallelize-first", "qwen-cfg2-offload-first",
        "qwen-cfg2-parallelize-first", "qwen-ring2-offload-first"])
def test_model_cpu_offload(name, degrees, offload_first):
    expected = _reference(name, seed=0)
    results = run_distributed(_offload_worker, 2, name, degrees, offload_first)
    for rank, out in enumerate(results):
        for call, got in enumerate(out["calls"]):
            _assert_close(got["image"], expected["image"], f"rank {rank} call {call} image")
    # both calls ran sharded: the pipeline's removing and re-adding its hooks kept fastusp's forward
    if "cfg" not in degrees:
        assert all(n < IMAGE_TOKENS for out in results for k, n in out["seen"] if k == "img")
        assert all(len(out["seen"]) == 2 * 2 * STEPS * len(TEXT_LENS[name]) for out in results)


def test_cuda_graphs_under_model_cpu_offload_are_captured_once_per_call():
    # The graphs sit beneath the offload hook: each pipeline call's first step sees the weights the hook brought
    # back (new memory) and captures again; every other step replays. Captured above the hook, the state check
    # would run before the move and capture twice per call. The fake replay asserts the weights are the captured.
    expected = _reference("flux", seed=0)
    for out in run_distributed(_offload_worker, 2, "flux", dict(ulysses=2), True, True):
        for got in out["calls"]:
            _assert_close(got["image"], expected["image"], "image")
        assert out["counts"] == {"captures": 2, "replays": 2 * STEPS}, out["counts"]


@pytest.mark.parametrize("kind,offload_first", [("block_level", True), ("leaf_level", False)])
def test_group_offloading(kind, offload_first):
    # diffusers' hooks on the blocks (here onload = offload = CPU, so they move nothing): the sharded forward and
    # the device fastusp takes from the model coexist with them
    expected = _reference("flux", seed=0)
    for rank, out in enumerate(run_distributed(_offload_worker, 2, "flux", dict(ulysses=2), offload_first, False,
                                               kind)):
        for call, got in enumerate(out["calls"]):
            _assert_close(got["image"], expected["image"], f"rank {rank} call {call} image")
        assert all(n < IMAGE_TOKENS for k, n in out["seen"] if k == "img")  # it ran sharded


# --- diffusers' caches --------------------------------------------------------------------------------------------
# transformer.enable_cache(...) after parallelize, 8 steps. First Block Cache decides from the first block's output
# residual, which each rank holds only a shard of: left to decide alone, the ranks disagreed (one ran the remaining
# blocks' collectives, the other skipped them) and hung. The others decide from the step (MagCache from given ratios).

CACHE_STEPS = 8


def _cached_run(name: str, cache: str | None, degrees: dict | None = None, graphs: bool = False,
                failing_capture: int | None = None) -> dict:
    """graphs: the transformer's forward replayed from (fake) CUDA graphs; full runs are then the calls that went to
    the compute graph (a replay runs no Python hooks on a GPU). failing_capture: that capture (1, 2, ...) fails as
    a capture can on a GPU."""
    from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)

    pipe = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        import fastusp
        fastusp.parallelize(pipe, **degrees)
    counts = {}
    if graphs:
        fake_cuda_graphs(counts)
        if failing_capture is not None:
            _fail_capture(failing_capture, counts)
        report = compile_as_on_cuda(pipe.transformer)
    configs = {"first-block": lambda: FirstBlockCacheConfig(threshold=0.5 if name == "flux" else 0.6),
               "mag": lambda: MagCacheConfig(threshold=0.5, max_skip_steps=2, num_inference_steps=CACHE_STEPS,
                                             mag_ratios=[1.0 - 0.01 * i for i in range(CACHE_STEPS)]),
               "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2),
               "pyramid": lambda: PyramidAttentionBroadcastConfig(
                   spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                   current_timestep_callback=lambda: pipe.current_timestep)}
    if cache is not None:
        pipe.transformer.enable_cache(configs[cache]())
    last = (pipe.transformer.single_transformer_blocks if name == "flux" else pipe.transformer.transformer_blocks)[-1]
    full_runs = []  # with a block-skipping cache, the last block's attention runs only in steps not skipped
    last.attn.register_forward_pre_hook(lambda module, args: full_runs.append(1))
    image = _generate(pipe, 0, steps=CACHE_STEPS)["image"]
    if graphs:  # and a second pipeline call, which must start afresh as the cache does (it resets after each)
        computed = pipe.transformer._fastusp_cache_graphs.steps
        return dict(image=image, full_runs=computed["computed"], counts=dict(counts),
                    again=_generate(pipe, 0, steps=CACHE_STEPS)["image"], full_runs_again=computed["computed"],
                    counts_again=counts, fell_back=report.fell_back)
    return dict(image=image, full_runs=len(full_runs))


@pytest.mark.parametrize("name,cache,degrees", [
    ("flux", "first-block", dict(ulysses=2)), ("flux", "first-block", dict(ring=2)),
    ("qwen", "first-block", dict(ulysses=2)), ("flux", "mag", dict(ulysses=2)),
    ("flux", "taylorseer", dict(ulysses=2)), ("flux", "pyramid", dict(ulysses=2)),
], ids=["flux-first-block-ulysses2", "flux-first-block-ring2", "qwen-first-block-ulysses2", "flux-mag-ulysses2",
        "flux-taylorseer-ulysses2", "flux-pyramid-ulysses2"])
def test_diffusers_caches_skip_the_same_steps_as_one_process(name, cache, degrees):
    expected = _cached_run(name, cache)
    uncached = _cached_run(name, None)["image"]
    # precondition: the cache changed the image (it reused something), and block skippers skipped some steps only
    assert (expected["image"] - uncached).abs().max().item() > 2 * TOL
    if cache in ("first-block", "mag"):
        assert 1 < expected["full_runs"] < CACHE_STEPS * len(TEXT_LENS[name]), expected["full_runs"]
    for rank, out in enumerate(run_distributed(_cached_run, 2, name, cache, degrees, timeout=60)):
        assert out["full_runs"] == expected["full_runs"], (rank, out["full_runs"], expected["full_runs"])
        _assert_close(out["image"], expected["image"], f"rank {rank} image")


def _fail_capture(which: int, counts: dict) -> None:
    from fastusp import cuda_graphs

    capture = cuda_graphs.capture_graph

    def capture_graph(fn, warmup, pool):
        if counts["captures"] + 1 == which:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return capture(fn, warmup, pool)

    cuda_graphs.capture_graph = capture_graph


@pytest.mark.parametrize("name,degrees,world", [
    ("flux", None, 1), ("flux", dict(ulysses=2), 2), ("qwen", dict(ulysses=2), 2), ("qwen", dict(cfg=2), 2),
], ids=["flux-one-process", "flux-ulysses2", "qwen-ulysses2", "qwen-cfg2"])
def test_first_block_cache_under_cuda_graphs_skips_the_same_steps(name, degrees, world):
    # two graphs per cache context and shape (skip, compute), the decision taken between them on the host
    expected = _cached_run(name, "first-block")
    assert 1 < expected["full_runs"] < CACHE_STEPS * len(TEXT_LENS[name]), expected["full_runs"]
    outs = run_distributed(_cached_run, world, name, "first-block", degrees, True, timeout=60)
    full_runs = [out["full_runs"] for out in outs]
    contexts = len(TEXT_LENS[name])  # true CFG: "cond" and "uncond"
    if (degrees or {}).get("cfg") == 2:  # each rank runs one of them: together, what one process runs
        contexts = 1
        assert sum(full_runs) == expected["full_runs"], (full_runs, expected["full_runs"])
    else:
        assert full_runs == [expected["full_runs"]] * world, (full_runs, expected["full_runs"])
    for rank, out in enumerate(outs):
        assert out["counts"]["captures"] == 2 * contexts, (rank, out["counts"])
        # a context's first call in a pipeline call replays compute; every later one skip, then compute where the
        # change is too large. The second pipeline call captures nothing new.
        replays = CACHE_STEPS * contexts + out["full_runs"] - contexts
        assert out["counts"]["replays"] == replays, (rank, out["counts"])
        assert out["counts_again"] == dict(captures=2 * contexts, replays=2 * replays), (rank, out["counts_again"])
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
        assert out["full_runs_again"] == 2 * out["full_runs"], (rank, out["full_runs_again"])
        _assert_close(out["again"], expected["image"], f"rank {rank} second call's image")


def test_first_block_cache_keeps_deciding_when_a_graph_cannot_be_captured():
    # the second capture (the skip graph) fails: from then on the forward runs eagerly, the decision still forced
    # between the two branches and read from fastusp's stored residuals, which the compute graph filled
    expected = _cached_run("flux", "first-block")
    for rank, out in enumerate(run_distributed(_cached_run, 2, "flux", "first-block", dict(ulysses=2), True, 2,
                                               timeout=60)):
        assert "cuda graphs" in out["fell_back"], (rank, out["fell_back"])
        assert out["full_runs"] == expected["full_runs"], (rank, out["full_runs"], expected["full_runs"])
        assert out["counts"]["replays"] == 1, (rank, out["counts"])  # the first call's compute graph only
        _assert_close(out["image"], expected["image"], f"rank {rank} image")
        _assert_close(out["again"], expected["image"], f"rank {rank} second call's image")


def _mag_cache_calibration(name: str, degrees: dict | None = None) -> list:
    """The ratios MagCache's calibration mode prints at the end of a pipeline call, per cache context."""
    import ast
    import contextlib
    import io

    from diffusers.hooks import MagCacheConfig

    pipe = BUILDERS[name]()
    pipe.set_progress_bar_config(disable=True)
    if degrees:
        import fastusp
        fastusp.parallelize(pipe, **degrees)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=CACHE_STEPS))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _generate(pipe, 0, steps=CACHE_STEPS)
    lines = printed.getvalue().splitlines()
    return [ast.literal_eval(after) for line, after in zip(lines, lines[1:]) if "Calibration Complete" in line]


@pytest.mark.parametrize("name,degrees", [("flux", dict(ulysses=2)), ("qwen", dict(ring=2))],
                         ids=["flux-ulysses2", "qwen-ring2"])
def test_mag_cache_calibrates_on_the_whole_sequence(name, degrees):
    # its ratios are means over the tokens: each rank's own tokens would give each rank other ratios
    expected = _mag_cache_calibration(name)
    assert len(expected) == len(TEXT_LENS[name]) and all(len(r) == CACHE_STEPS for r in expected), expected
    assert len({round(x, 3) for r in expected for x in r}) > 2, expected  # ratios that differ between steps
    for rank, ratios in enumerate(run_distributed(_mag_cache_calibration, 2, name, degrees, timeout=60)):
        assert torch.allclose(torch.tensor(ratios), torch.tensor(expected), rtol=1e-5), (rank, ratios, expected)
