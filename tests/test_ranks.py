"""Every rank runs the same call (docs/ranks.md): ranks that disagree get the same clear error, a rank that fails
leaves the others with an error within the timeout, rank 0 can drive the others, degrees fit the world.

Each distributed test runs several cases in one pair of processes: a disagreement raises on every rank before any
collective of the call, so the ranks are in step for the next case (the last call of each run succeeds to show it).
"""
from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastusp
from _dist import run_distributed
from fastusp._forward import undo_changes, wrap_call
from fastusp.config import fill_degrees
from fastusp.testing import HEADS, flux_inputs, prompt_kwargs, tiny_flux, tiny_flux_pipeline, tiny_qwen_pipeline

H = W = 32
PIPELINE_CASES = {  # what differs -> (rank 0's call, rank 1's call), as kwargs on top of _base_call
    "prompt_embeds": (dict(seed=0), dict(seed=1)),
    "prompt_embeds: rank 0: tensor of shape (1, 7, 32)": (dict(text_len=7), dict(text_len=9)),  # text length
    "guidance_scale": (dict(guidance_scale=3.5), dict(guidance_scale=4.0)),
    "num_inference_steps": (dict(num_inference_steps=2), dict(num_inference_steps=3)),
    "height": (dict(height=H), dict(height=H + 16)),
    "num_images_per_prompt": (dict(num_images_per_prompt=1), dict(num_images_per_prompt=2)),
    "generator": (dict(generator=0), dict(generator=1)),
}


def _base_call(pipe, seed=0, generator=0, text_len=7, **kwargs) -> dict:
    call = dict(prompt_kwargs(pipe, text_len=text_len, seed=seed), guidance_scale=3.5, height=H, width=W,
                num_inference_steps=2, generator=torch.Generator().manual_seed(generator), output_type="pt")
    return dict(call, **kwargs)


def _raises_on_every_rank(call) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value), time.monotonic() - start


def _disagreeing_pipeline_calls():
    rank = dist.get_rank()
    pipe = fastusp.parallelize(tiny_flux_pipeline())
    errors = {name: _raises_on_every_rank(lambda: pipe(**_base_call(pipe, **calls[rank])))
              for name, calls in PIPELINE_CASES.items()}
    image = pipe(**_base_call(pipe)).images  # in step after all of them
    return errors, image


def test_ranks_called_differently_raise_the_same_error_naming_the_argument():
    reference = tiny_flux_pipeline()
    expected = reference(**_base_call(reference)).images
    (errors0, image0), (errors1, image1) = run_distributed(_disagreeing_pipeline_calls, 2)
    for name, calls in PIPELINE_CASES.items():
        message, seconds = errors0[name]
        assert message == errors1[name][0], name  # the same error on every rank
        assert message.startswith("the ranks disagree on the arguments of this FluxPipeline call"), message
        assert f"  {name}" in message and "rank 0: " in message and "rank 1: " in message, message
        assert seconds < 5, (name, seconds)
    assert "guidance_scale: rank 0: 3.5; rank 1: 4.0" in errors0["guidance_scale"][0]
    assert "generator seeded 0" in errors0["generator"][0] and "generator seeded 1" in errors0["generator"][0]
    torch.testing.assert_close(image0, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image1, expected, rtol=1e-5, atol=1e-5)


def _disagreeing_settings_and_transformer_inputs():
    rank = dist.get_rank()
    settings = [dict(ulysses=2), dict(ring=2)][rank]  # both valid alone: without the check the first step hangs
    degrees, _ = _raises_on_every_rank(lambda: fastusp.parallelize(tiny_flux(), **settings))
    fp8, _ = _raises_on_every_rank(lambda: fastusp.parallelize(tiny_flux(), fp8_comm=[False, "all"][rank]))
    model = fastusp.parallelize(tiny_flux())  # bare transformer: every forward compares its inputs
    seeds, seconds = _raises_on_every_rank(lambda: model(**flux_inputs(seed=rank), return_dict=False))
    sample = model(**flux_inputs(seed=0), return_dict=False)[0]
    return degrees, fp8, seeds, seconds, sample


def test_disagreeing_settings_and_bare_transformer_inputs_raise_on_every_rank():
    expected = tiny_flux()(**flux_inputs(seed=0), return_dict=False)[0]
    results = run_distributed(_disagreeing_settings_and_transformer_inputs, 2)
    for i in range(3):
        assert results[0][i] == results[1][i]
    degrees, fp8, seeds, seconds, _ = results[0]
    assert degrees.startswith("the ranks disagree on the settings of fastusp.parallelize")
    assert "ulysses: rank 0: 2; rank 1: 1" in degrees and "ring: rank 0: 1; rank 1: 2" in degrees, degrees
    assert "fp8_comm: rank 0: False; rank 1: 'all'" in fp8, fp8
    assert seeds.startswith("the ranks disagree on the inputs of this FluxTransformer2DModel call"), seeds
    assert "  hidden_states: rank 0: tensor of shape (1, 20, 16)" in seeds, seeds
    assert seconds < 5
    for _, _, _, _, sample in results:
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-5)


def _fail_second_transformer_call(pipe) -> None:
    calls = []

    def fail_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure on rank 1")
    pipe.transformer.register_forward_pre_hook(fail_second_call)


def _one_rank_fails(timeout: float):
    pipe = fastusp.parallelize(tiny_flux_pipeline(), timeout=timeout)
    if dist.get_rank() == 1:  # fails at its second transformer call and goes on living (a server would)
        _fail_second_transformer_call(pipe)
    start = time.monotonic()
    try:
        pipe(**_base_call(pipe, num_inference_steps=3))
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    if dist.get_rank() == 1:
        time.sleep(timeout + 2)  # alive while rank 0 waits: rank 0 must not need rank 1 to exit
    return error, seconds


def test_a_rank_that_fails_leaves_every_rank_with_an_error_within_the_timeout():
    (error0, seconds0), (error1, _) = run_distributed(_one_rank_fails, 2, 2.0, timeout=60)
    assert error1 == "RuntimeError: injected failure on rank 1"
    assert error0.startswith("CollectiveTimeout: rank 0 waited past the process group's timeout"), error0
    assert seconds0 < 2.0 + 3, seconds0


def _one_rank_fails_while_following(timeout: float):
    pipe = fastusp.parallelize(tiny_flux_pipeline(), timeout=timeout)
    if dist.get_rank() == 1:
        _fail_second_transformer_call(pipe)
        return fastusp.follow(pipe)
    outcomes = []
    with fastusp.lead(pipe):
        for _ in range(2):
            start = time.monotonic()
            try:
                pipe(**_base_call(pipe, num_inference_steps=3))
            except RuntimeError as e:
                outcomes.append((str(e), time.monotonic() - start))
    return outcomes


def test_a_follower_that_fails_is_named_on_rank_0_within_the_timeout():
    (failed, out_of_step), followed = run_distributed(_one_rank_fails_while_following, 2, 2.0, timeout=60)
    assert failed[0] == "rank 1 failed this call: RuntimeError: injected failure on rank 1"
    assert failed[1] < 2.0 + 3
    assert out_of_step[0].startswith("an earlier call failed inside a collective on some rank") and out_of_step[1] < 1
    assert followed == 1  # the second call was refused on rank 0 before it was sent


def _rank_0_drives():
    # the VAE whole on every rank: its decode then follows the call's last collective (a parallel decode would be one)
    pipe = fastusp.parallelize(tiny_flux_pipeline(), parallel_vae=False)
    if dist.get_rank() != 0:
        calls = []
        original = pipe.vae.decode

        def decode_fails_once(*args, **kwargs):  # after the call's last collective: only rank 1 knows
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected decode failure")
            return original(*args, **kwargs)
        pipe.vae.decode = decode_fails_once
        return fastusp.follow(pipe)
    outcomes, steps = [], []
    on_step = lambda pipe, step, timestep, kwargs: steps.append(step) or {}  # stays on rank 0
    with fastusp.lead(pipe):
        for size in (H, H, 4, H):  # a fresh generator each time: its state travels with the call
            try:
                outcomes.append(pipe(**_base_call(pipe, height=size, width=size, callback_on_step_end=on_step)).images)
            except Exception as e:  # noqa: BLE001
                outcomes.append(f"{type(e).__name__}: {e}")
    return outcomes, steps


def test_rank_0_drives_and_every_rank_stays_in_step_after_errors():
    reference = tiny_flux_pipeline()
    expected = reference(**_base_call(reference)).images
    (outcomes, steps), followed = run_distributed(_rank_0_drives, 2)
    assert followed == 4 and steps == [0, 1] * 3  # the call refused before its loop made no steps
    first, failed_on_rank_1, refused, last = outcomes
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert failed_on_rank_1 == "RuntimeError: rank 1 failed this call: RuntimeError: injected decode failure"
    assert refused == "ValueError: 1 image tokens cannot be split over 2 ranks; use a larger image"
    torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world, cfg, heads, expected", [
    (2, 1, 4, (2, 1)), (3, 1, 4, (1, 3)), (4, 1, 4, (4, 1)), (6, 1, 4, (2, 3)), (8, 1, 24, (8, 1)),
    (4, 2, 4, (2, 1)), (8, 2, 3, (1, 4)),
])
def test_degrees_default_to_the_world_and_the_heads(monkeypatch, world, cfg, heads, expected):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert fill_degrees(None, None, cfg, heads) == expected
    assert fill_degrees(None, expected[1], cfg, heads) == expected
    assert fill_degrees(expected[0], None, cfg, heads) == expected


def test_degrees_accept_any_integer_type_and_fp8_the_cli_spelling():
    config = fastusp.ParallelConfig(ulysses=np.int64(2), ring=torch.tensor(2), fp8_comm="qkv")
    assert (type(config.ulysses), type(config.ring), config.fp8_comm) == (int, int, True)
    with pytest.raises(ValueError, match="ulysses must be an integer >= 1, got True"):
        fastusp.ParallelConfig(ulysses=True)
    with pytest.raises(ValueError, match="ring must be an integer >= 1"):
        fill_degrees(None, 2.0, 1, HEADS)


def _default_degrees():
    pipe = fastusp.parallelize(tiny_flux_pipeline())
    config = pipe.transformer._fastusp_config
    return config.ulysses, config.ring


def test_parallelize_without_degrees_uses_every_process():
    assert run_distributed(_default_degrees, 2) == [(2, 1), (2, 1)]


def test_call_wrappers_are_recorded_and_undone():
    pipe = tiny_flux_pipeline()
    cls, seen = type(pipe), []

    def count_steps(call, *args, **kwargs):
        seen.append(kwargs["num_inference_steps"])
        return call(*args, **kwargs)

    wrap_call(pipe, count_steps)
    assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    assert "guidance_scale" in inspect.signature(pipe.__call__).parameters  # what servers and checks bind to
    pipe(**_base_call(pipe, num_inference_steps=1))
    undo_changes([pipe])
    pipe(**_base_call(pipe, num_inference_steps=1))
    assert type(pipe) is cls and seen == [1] and "_fastusp_call_wrappers" not in pipe.__dict__


def _qwen_text_call(pipe) -> torch.Tensor:
    return pipe(prompt="a red cat on a mat", negative_prompt="blurry", true_cfg_scale=2.0, height=H, width=W,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images


def _parallel_qwen_text_call():
    return _qwen_text_call(fastusp.parallelize(tiny_qwen_pipeline(text_encoders=True)))


def test_tiny_qwen_pipeline_takes_text_prompts_and_matches_one_process():
    expected = _qwen_text_call(tiny_qwen_pipeline(text_encoders=True))
    assert expected.std() > 0.01
    for image in run_distributed(_parallel_qwen_text_call, 2):
        torch.testing.assert_close(image, expected, rtol=1e-5, atol=1e-5)
