"""Every configuration error is a clear ValueError (or NotImplementedError) raised before any collective."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import fastusp
from _dist import run_distributed
from fastusp import ParallelConfig
from fastusp.testing import HEADS, tiny_flux, tiny_qwen


@pytest.mark.parametrize("kwargs, message", [
    (dict(ulysses=0), "ulysses must be an integer >= 1"),
    (dict(ring=-2), "ring must be an integer >= 1"),
    (dict(ulysses=1.5), "ulysses must be an integer >= 1"),
    (dict(ring=True), "ring must be an integer >= 1"),
    (dict(fp8_comm="yes"), "fp8_comm must be False, True or 'all'"),
    (dict(ulysses_chunks=0), "ulysses_chunks must be an integer >= 1"),
    (dict(cfg=0), "cfg must be an integer >= 1"),
    (dict(cfg=3), "cfg must be 1 or 2"),
])
def test_bad_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize("ulysses, chunks, heads, expected", [
    (2, 2, 24, 2), (2, 5, 24, 4), (4, 4, 24, 3), (8, 2, 24, 1), (2, 64, 24, 12), (1, 3, 24, 3)])
def test_head_chunks_round_down_to_a_divisor_of_the_heads_per_rank(ulysses, chunks, heads, expected):
    for traced in (False, True):
        assert ParallelConfig(ulysses=ulysses, ulysses_chunks=chunks).head_chunks(heads, traced) == expected


def test_head_chunks_default_to_two_only_when_traced():
    assert ParallelConfig(ulysses=2).head_chunks(24, traced=True) == 2
    assert ParallelConfig(ulysses=2).head_chunks(24, traced=False) == 1


def test_world_size_mismatch_names_every_factor():
    with pytest.raises(ValueError, match=r"cfg \(2\) \* ulysses \(2\) \* ring \(3\) = 12 must equal the number of "
                                         r"processes \(4\)"):
        ParallelConfig(ulysses=2, ring=3, cfg=2).validate_world(4)


def test_cfg_parallelism_needs_a_pipeline():
    with pytest.raises(ValueError, match="cfg parallelism splits a pipeline's guidance passes"):
        fastusp.parallelize(tiny_flux(), cfg=2)


def test_heads_not_divisible_lists_valid_degrees():
    with pytest.raises(ValueError, match=r"ulysses \(5\) must divide the number of attention heads \(24\).*"
                                         r"\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        ParallelConfig(ulysses=5).validate_heads(24)


def test_unsupported_model():
    with pytest.raises(ValueError, match="fastusp supports FluxTransformer2DModel, Flux2Transformer2DModel, "
                                         "QwenImageTransformer2DModel"):
        fastusp.parallelize(torch.nn.Linear(2, 2), ulysses=2)


def test_unsupported_processor():
    model = tiny_flux()
    from diffusers.models.attention_processor import AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(NotImplementedError, match="AttnProcessor2_0"):
        fastusp.parallelize(model, ulysses=2)


def test_flux2_kv_cache_pipeline_is_refused():
    # Flux2KleinKVPipeline installs its own processors (reference keys / values cached across steps)
    from fastusp.testing import tiny_flux2_pipeline

    with pytest.raises(NotImplementedError, match="Flux2KVAttnProcessor"):
        fastusp.parallelize(tiny_flux2_pipeline(kv=True), ulysses=2)


def _flux2_kv_cache_forward():
    from fastusp.testing import flux2_inputs, tiny_flux2

    model = fastusp.parallelize(tiny_flux2(), ulysses=2)
    try:
        model(**flux2_inputs(reference_hw=(2, 2)), kv_cache_mode="extract", num_ref_tokens=4)
    except NotImplementedError as e:
        return str(e)
    return "no error"


def test_flux2_kv_cache_forward_is_refused_on_every_rank():
    # diffusers would run it with fastusp's processors (they ignore the cache arguments) and modulate the first
    # num_ref_tokens of each rank's shard as reference tokens
    for result in run_distributed(_flux2_kv_cache_forward, 2, timeout=60):
        assert "kv_cache_mode: FLUX.2's reference-image KV cache" in result


def test_graphs_only_compile_needs_cuda():
    with pytest.raises(ValueError, match="backend=None compiles nothing, so it needs CUDA graphs"):
        fastusp.compile_pipeline(tiny_flux(), backend=None)


def test_cuda_graphs_refuse_hooks_that_move_weights_inside_the_forward():
    from fastusp.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    # hooks on every module that holds weights; nothing runs, so no GPU is needed to attach them
    pipe.enable_sequential_cpu_offload(device="cuda:0")
    with pytest.raises(ValueError, match="hooks on its modules .*sequential CPU offload.*cuda_graphs=False"):
        fastusp.compile_pipeline(pipe)


def test_cuda_graphs_take_a_pipeline_that_has_run_and_first_block_cache_but_no_other_cache():
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
    from fastusp.compile import _check_weights_stay_put
    from fastusp.testing import tiny_call_kwargs, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # a pipeline call leaves an empty diffusers hook registry on the transformer (its cache_context): no hooks
    pipe(**tiny_call_kwargs(pipe, text_len=7), height=32, width=32, num_inference_steps=1, output_type="pt")
    assert hasattr(pipe.transformer, "_diffusers_hook")
    _check_weights_stay_put(pipe.transformer)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))  # decided between graphs
    _check_weights_stay_put(pipe.transformer)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(MagCacheConfig(num_inference_steps=4, mag_ratios=[1.0] * 4))
    with pytest.raises(ValueError, match="hooks on its modules .*a cache other than First Block Cache"):
        _check_weights_stay_put(pipe.transformer)


def _graphs_then_cache() -> str:
    from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs
    from diffusers.hooks import MagCacheConfig
    from fastusp.testing import flux_inputs

    fake_cuda_graphs({})
    model = tiny_flux()
    compile_as_on_cuda(model)
    with torch.no_grad():
        model(**flux_inputs(), return_dict=False)
        model.enable_cache(MagCacheConfig(num_inference_steps=4, mag_ratios=[1.0] * 4))
        try:
            with model.cache_context("cond"):
                model(**flux_inputs(), return_dict=False)
        except ValueError as e:
            return str(e)
    return "no error"


def test_a_cache_enabled_after_the_graphs_is_refused_not_ignored():
    # the graphs would replay the forward as captured, without the cache's decisions (First Block Cache excepted:
    # test_pipelines.py::test_first_block_cache_under_cuda_graphs_skips_the_same_steps enables it after the graphs)
    [message] = run_distributed(_graphs_then_cache, 1)
    assert "MagCacheConfig is enabled on FluxTransformer2DModel, whose forward is replayed from CUDA graphs" in \
        message, message


def test_a_rank_that_would_share_the_first_gpu_is_refused(monkeypatch):
    # enable_model_cpu_offload() without gpu_id: the weights stay on the CPU, the offload hook computes on cuda:0
    model = tiny_flux()
    model._hf_hook = SimpleNamespace(execution_device=torch.device("cuda", 0))  # what diffusers hands accelerate
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"local rank 1 computes on cuda:0.*enable_model_cpu_offload\(gpu_id="):
        fastusp.parallelize(model, ulysses=2)
    assert not dist.is_initialized()  # raised before any process group


def test_parallelize_after_compile_is_refused():
    model = fastusp.compile_pipeline(tiny_flux(), backend="aot_eager")  # wraps only; nothing compiles here
    with pytest.raises(ValueError, match="before fastusp.compile_pipeline"):
        fastusp.parallelize(model, ulysses=2)


def test_missing_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun --nproc-per-node"):
        fastusp.parallelize(tiny_flux(), ulysses=2)


def _parallelize_expecting_error(build, kwargs):
    try:
        fastusp.parallelize(build(), **kwargs)
    except (ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("kwargs, message", [
    (dict(ulysses=2, ring=2), "= 4 must equal the number of processes (2)"),
    (dict(ulysses=3, ring=1), f"must divide the number of attention heads ({HEADS})"),
])
def test_bad_config_fails_fast_on_every_rank(kwargs, message):
    # run_distributed fails on a hang (timeout), so returning at all proves no rank waits on a collective.
    for result in run_distributed(_parallelize_expecting_error, 2, tiny_qwen, kwargs, timeout=60):
        assert message in result


def _parallelize_twice():
    model = fastusp.parallelize(tiny_flux(), ulysses=2)
    try:
        fastusp.parallelize(model, ulysses=2)
    except ValueError as e:
        return str(e)
    return "no error"


def test_parallelize_twice_is_refused():
    assert all("already parallelized" in r for r in run_distributed(_parallelize_twice, 2))


def _too_few_image_tokens():
    from fastusp.testing import flux_inputs

    model = fastusp.parallelize(tiny_flux(), ulysses=2, ring=2)
    try:
        model(**flux_inputs(height=1, width=3))
    except ValueError as e:
        return str(e)
    return "no error"


def test_fewer_image_tokens_than_ranks_is_refused_on_every_rank():
    assert all("3 image tokens cannot be split over 4 ranks" in r for r in run_distributed(_too_few_image_tokens, 4))
