"""fastusp.unparallelize: parallelize -> run -> unparallelize -> run gives the never-parallelized result, and leaves
nothing of fastusp behind (processors, forwards, hooks, patched attributes), for pipelines (cfg=2 too) and a bare
transformer. Tiny random models on CPU ranks (gloo)."""
from __future__ import annotations

import pytest
import torch

import fastusp
from _dist import run_distributed
from test_pipelines import BUILDERS, _assert_close, _generate
from fastusp.testing import flux_inputs, qwen21_inputs, qwen_inputs, tiny_flux, tiny_qwen, tiny_qwen21


def _leftovers(pipe_or_model) -> list[str]:
    """Everything of fastusp still on the object, its modules and a pipeline's components."""
    objects = [pipe_or_model]
    for component in getattr(pipe_or_model, "components", {}).values():
        objects += list(component.modules()) if isinstance(component, torch.nn.Module) else [component]
    if isinstance(pipe_or_model, torch.nn.Module):
        objects += list(pipe_or_model.modules())
    found = []
    for obj in objects:
        if obj is None or not hasattr(obj, "__dict__"):
            continue
        name = type(obj).__name__
        found += [f"{name}.{key}" for key in vars(obj) if key.startswith("_fastusp")]
        registry = getattr(obj, "_diffusers_hook", None)
        # a forward on the instance is accelerate's or diffusers' own where their hooks are on it
        hooked = hasattr(obj, "_hf_hook") or bool(getattr(registry, "hooks", None))
        found += [f"{name}.{key} patched" for key in ("forward", "prepare_latents", "progress_bar", "step",
                                                      "set_attn_processor", "build_token_metadata")
                  if key in vars(obj) and not (key == "forward" and hooked)]
        found += [f"{name} hook {hook}" for hook in getattr(registry, "hooks", {}) if hook.startswith("fastusp")]
        found += [f"{name} torch pre-hook {hook.__name__}" for hook in getattr(obj, "_forward_pre_hooks", {}).values()
                  if getattr(hook, "__module__", "").startswith("fastusp")]
        if getattr(type(obj), "_fastusp_wraps_calls", False):
            found.append(f"{name} class wraps its calls")
        if isinstance(getattr(type(obj), "attn_processors", None), property):  # a transformer, a ControlNet
            found += [f"{name} processor {type(p).__name__}" for p in obj.attn_processors.values()
                      if type(p).__module__.startswith("fastusp")]
    return found


_REFERENCE = {}


def _reference(name: str, guidance: bool) -> dict:
    if (name, guidance) not in _REFERENCE:
        pipe = BUILDERS[name]()
        pipe.set_progress_bar_config(disable=True)
        _REFERENCE[name, guidance] = _generate(pipe, 0, _call_kwargs(pipe, guidance))
    return _REFERENCE[name, guidance]


def _call_kwargs(pipe, guidance: bool) -> dict:
    from fastusp.testing import prompt_kwargs

    kwargs = prompt_kwargs(pipe, text_len=7, seed=0)
    if guidance:
        kwargs.update(prompt_kwargs(pipe, text_len=7, seed=1, negative=True), true_cfg_scale=2.0)
    else:
        kwargs["true_cfg_scale"] = 1.0
    return kwargs


def _pipeline_worker(name: str, guidance: bool, degrees: dict, offload: str | None) -> dict:
    pipe = BUILDERS[name]()
    if offload == "before":  # accelerate's hook wraps each model's forward; fastusp's go beneath it
        pipe.enable_model_cpu_offload(device="cpu")
    fastusp.parallelize(pipe, **degrees)
    if offload == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    parallel = _generate(pipe, 0, _call_kwargs(pipe, guidance))
    assert fastusp.unparallelize(pipe) is pipe
    leftovers = _leftovers(pipe)
    pipe.set_progress_bar_config(disable=True)
    # twice: under model CPU offload the pipeline takes its hooks off and puts them back after each call
    restored = [_generate(pipe, 0, _call_kwargs(pipe, guidance)) for _ in range(2)]
    return dict(parallel=parallel, restored=restored[0], restored_again=restored[1], leftovers=leftovers)


@pytest.mark.parametrize("name, guidance, degrees, offload", [
    ("flux", False, dict(ulysses=2), None), ("qwen", True, dict(ring=2), None), ("flux", True, dict(cfg=2), None),
    ("qwen", True, dict(cfg=2), None), ("qwen", False, dict(ulysses=2), "before"),
    ("flux", False, dict(ulysses=2), "after")],
    ids=["flux-ulysses2", "qwen-ring2", "flux-cfg2", "qwen-cfg2", "qwen-offload-first", "flux-offload-after"])
def test_unparallelized_pipeline_runs_as_never_parallelized(name, guidance, degrees, offload):
    expected = _reference(name, guidance)
    for rank, out in enumerate(run_distributed(_pipeline_worker, 2, name, guidance, degrees, offload)):
        assert out["leftovers"] == [], f"rank {rank}"
        for run in ("parallel", "restored", "restored_again"):
            _assert_close(out[run]["image"], expected["image"], f"rank {rank} {run} image")


MODELS = {"flux": (tiny_flux, flux_inputs), "qwen": (tiny_qwen, lambda: qwen_inputs(valid_lens=[5])),
          # Edit-2511: per-token block inputs; 2.1: its joint sequence, sharded at the first block
          "qwen-edit-2511": (lambda: tiny_qwen(zero_cond_t=True), lambda: qwen_inputs(reference_hw=(2, 4))),
          "qwen21": (tiny_qwen21, qwen21_inputs)}


def _transformer_worker(name: str) -> dict:
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    outputs = {}
    with torch.no_grad():
        for run in ("parallel", "restored", "parallel again"):
            if run != "restored":
                fastusp.parallelize(model, ulysses=2)
            outputs[run] = model(**inputs, return_dict=False)[0]
            if run == "parallel":
                fastusp.unparallelize(model)
                outputs["leftovers"] = _leftovers(model)
    return outputs


@pytest.mark.parametrize("name", list(MODELS))
def test_unparallelized_transformer_runs_as_never_parallelized_and_can_be_parallelized_again(name):
    build, make_inputs = MODELS[name]
    with torch.no_grad():
        expected = build()(**make_inputs(), return_dict=False)[0]
    for rank, out in enumerate(run_distributed(_transformer_worker, 2, name)):
        assert out["leftovers"] == [], f"rank {rank}"
        for run in ("parallel", "restored", "parallel again"):
            _assert_close(out[run], expected, f"rank {rank} {run}")


def test_unparallelize_refuses_what_it_cannot_restore():
    model = tiny_flux()
    with pytest.raises(ValueError, match="not parallelized by fastusp"):
        fastusp.unparallelize(model)
    fastusp.compile_pipeline(model, backend="eager")
    with pytest.raises(ValueError, match="compiled with fastusp.compile_pipeline"):
        fastusp.unparallelize(model)


def _controlnet_worker(name: str) -> dict:
    from test_pipelines import _controlnet_kwargs
    from fastusp.testing import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline(name)
    fastusp.parallelize(pipe, ulysses=2)
    parallel = _generate(pipe, 0, _controlnet_kwargs(pipe))
    fastusp.unparallelize(pipe)
    return dict(parallel=parallel, restored=_generate(pipe, 0, _controlnet_kwargs(pipe)), leftovers=_leftovers(pipe))


@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_unparallelized_controlnet_pipeline_runs_as_never_parallelized(name):
    from test_pipelines import _controlnet_kwargs
    from fastusp.testing import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    expected = _generate(pipe, 0, _controlnet_kwargs(pipe))
    for rank, out in enumerate(run_distributed(_controlnet_worker, 2, name)):
        assert out["leftovers"] == [], f"rank {rank}"
        for run in ("parallel", "restored"):
            _assert_close(out[run]["image"], expected["image"], f"rank {rank} {run} image")


def _first_block_cache_worker(parallel: bool) -> dict:
    """FLUX with First Block Cache enabled after parallelize: its hooks sit above fastusp's on the same blocks (shared
    modulation's), and fastusp patched its head hook to decide over the whole sequence."""
    from diffusers.hooks import FirstBlockCacheConfig

    from test_pipelines import CACHE_STEPS

    pipe = BUILDERS["flux"]()
    pipe.set_progress_bar_config(disable=True)
    out = {}
    if parallel:
        fastusp.parallelize(pipe, ulysses=2)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    out["first"] = _generate(pipe, 0, steps=CACHE_STEPS)["image"]
    if parallel:
        fastusp.unparallelize(pipe)
        hooks = [hook for module in pipe.transformer.modules()
                 for hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).values()]
        out["leftovers"] = _leftovers(pipe) + [f"{type(hook).__name__}.{key}" for hook in hooks for key in vars(hook)
                                               if key.startswith("_fastusp") or key == "_should_compute_remaining_blocks"]
        out["cache hooks"] = sorted({type(hook).__name__ for hook in hooks})
        out["restored"] = _generate(pipe, 0, steps=CACHE_STEPS)["image"]
    return out


def test_unparallelize_keeps_a_cache_enabled_after_parallelize():
    expected = _first_block_cache_worker(parallel=False)["first"]
    for rank, out in enumerate(run_distributed(_first_block_cache_worker, 2, True)):
        assert out["leftovers"] == [], f"rank {rank}"
        assert out["cache hooks"] == ["FBCBlockHook", "FBCHeadBlockHook"], f"rank {rank}"
        for run in ("first", "restored"):
            _assert_close(out[run], expected, f"rank {rank} {run} image")
