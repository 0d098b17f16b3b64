"""compile_pipeline on CPU: compiled output equals eager, ring is reported opaque, compile failures fall back.

Every model under Ulysses (2, 1) and Ring (1, 2) goes through Inductor: Ulysses-compiled forwards send the heads
in two chunks, which eager runs never do by default, so this is also where the chunked exchange meets Inductor.
"""
import inspect

import pytest
import torch

import fastusp
from _dist import run_distributed
from fastusp.testing import flux2_inputs, flux_inputs, qwen_inputs, tiny_flux, tiny_flux2, tiny_qwen

MODELS = {"flux": (tiny_flux, flux_inputs), "flux2": (tiny_flux2, flux2_inputs), "qwen": (tiny_qwen, qwen_inputs)}


def _eager_then_compiled(name, layout, new_shape):
    build, make_inputs = MODELS[name]
    # Qwen-Image with a padded text mask: compiled Ulysses attends to the text keys apart from the image keys, and
    # the ring op takes the text keys' bias
    masked = dict(valid_lens=[2, 5]) if name == "qwen" else {}
    inputs = make_inputs(batch=2, height=3, width=5, text_len=5, **masked)
    model = fastusp.parallelize(build(), ulysses=layout[0], ring=layout[1])
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        fastusp.compile_pipeline(model)  # Inductor
        compiled = model(**inputs, return_dict=False)[0]
        # A new text length must recompile, not reuse the graph of the old shape.
        compiled_other = model(**make_inputs(batch=2, height=3, width=5, text_len=6), return_dict=False)[0] \
            if new_shape else None
    return eager, compiled, compiled_other, fastusp.compile_report(model)


# Recompiling for a new shape doubles a case's compile time on CI's 2 cores: each model checks it once.
@pytest.mark.parametrize("name, layout, new_shape", [
    ("flux", (2, 1), True), ("flux", (1, 2), False), ("flux2", (2, 1), False), ("qwen", (2, 1), False),
    ("qwen", (1, 2), True)], ids=["flux-u2r1", "flux-u1r2", "flux2-u2r1", "qwen-u2r1", "qwen-u1r2"])
def test_compiled_matches_eager(name, layout, new_shape):
    build, make_inputs = MODELS[name]
    if new_shape:
        with torch.no_grad():
            ref_other = build()(**make_inputs(batch=2, height=3, width=5, text_len=6), return_dict=False)[0]
    for eager, compiled, compiled_other, report in run_distributed(_eager_then_compiled, 2, name, layout, new_shape,
                                                                   timeout=600):
        assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5
        if new_shape:
            assert ((compiled_other - ref_other).norm() / ref_other.norm()).item() < 1e-4
        assert report.compiled and not report.fell_back
        assert ("ring attention" in " ".join(report.opaque)) == (layout[1] > 1)


def _counting_backend():
    """(the graphs Dynamo has handed it so far, a torch.compile backend that runs each graph as it is)."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    return compiles, counting_backend


# Qwen-Image prompts come in any length; each length would compile its own block code and capture its own graph.
TEXT_BUCKET_CALLS = [dict(text_len=5), dict(text_len=7, valid_lens=[4, 6]), dict(text_len=3), dict(text_len=8)]


def _text_bucket_worker(bucket, parallel=True):
    """Outputs for TEXT_BUCKET_CALLS under Ulysses-2 (parallel) or in one process, compiled (a backend that counts
    the graphs Dynamo hands it) and graphed (capture replaced as in tests/_fake_graphs.py); returns them with the
    counts."""
    from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs

    counts = {}
    compiles, counting_backend = _counting_backend()

    fake_cuda_graphs(counts)
    model = fastusp.parallelize(tiny_qwen(), ulysses=2) if parallel else tiny_qwen()
    compile_as_on_cuda(model, counting_backend, text_bucket=bucket)
    with torch.no_grad():
        outs = [model(**qwen_inputs(batch=2, height=3, width=5, **call), return_dict=False)[0]
                for call in TEXT_BUCKET_CALLS]
    return outs, len(compiles), counts["captures"]


def test_text_bucket_lets_prompts_of_any_length_share_compiled_code_and_graphs():
    model = tiny_qwen()
    with torch.no_grad():
        expected = [model(**qwen_inputs(batch=2, height=3, width=5, **call), return_dict=False)[0]
                    for call in TEXT_BUCKET_CALLS]
    # without buckets: one of each per length; in one process, diffusers' own attention applies the padded mask
    for bucket, code, graphs, world in [(8, 1, 1, 2), (None, 4, 4, 2), (8, 1, 1, 1)]:
        for outs, compiled, captured in run_distributed(_text_bucket_worker, world, bucket, world > 1, timeout=300):
            for out, ref in zip(outs, expected):  # padded and masked, the output is the unpadded one
                assert ((out - ref).norm() / ref.norm()).item() < 1e-5
            assert (compiled, captured) == (code, graphs), bucket


def test_text_bucket_needs_a_model_with_a_text_mask():
    with pytest.raises(ValueError, match="text_bucket pads prompts behind a text mask, which FluxTransformer2DModel"):
        fastusp.compile_pipeline(tiny_flux(), backend="eager", text_bucket=64)
    with pytest.raises(ValueError, match="text_bucket must be an integer >= 1"):
        fastusp.compile_pipeline(tiny_qwen(), backend="eager", text_bucket=0)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend always fails")


def _compile_with_failing_backend():
    inputs = flux_inputs(batch=2, height=3, width=5, text_len=5)
    model = fastusp.parallelize(tiny_flux(), ulysses=1, ring=2)
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        fastusp.compile_pipeline(model, backend=_failing_backend)
        fallen_back = model(**inputs, return_dict=False)[0]
        again = model(**inputs, return_dict=False)[0]
    return eager, fallen_back, again, fastusp.compile_report(model)


def test_forced_compile_failure_returns_correct_eager_results():
    for eager, fallen_back, again, report in run_distributed(_compile_with_failing_backend, 2):
        assert torch.equal(fallen_back, eager) and torch.equal(again, eager)
        assert "this backend always fails" in report.fell_back["all blocks"]
        assert "fell back: all blocks" in report.summary()


def _compile_unparallelized():
    model = tiny_qwen()
    inputs = qwen_inputs(batch=1)
    with torch.no_grad():
        eager = model(**inputs, return_dict=False)[0]
        fastusp.compile_pipeline(model, backend="aot_eager")
        compiled = model(**inputs, return_dict=False)[0]
    return eager, compiled, fastusp.compile_report(model).compiled


def test_compile_single_device_model_without_parallelize():
    # In a child process like every compiling test: the test process itself never compiles, because forking
    # from a process that holds compiler worker threads can deadlock the children of later tests.
    [(eager, compiled, regions)] = run_distributed(_compile_unparallelized, 1)
    assert regions == ["QwenImageTransformerBlock"]
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def _spmd_checks_while_compiling():
    """How often Inductor's SPMD graph check ran: under compile_pipeline, then under a plain torch.compile with the
    overlap option that enables it (the control: the check is there and is seen)."""
    import torch._inductor.config as inductor_config
    import torch._inductor.fx_passes.spmd_check as spmd_check

    inductor_config.aten_distributed_optimizations.spmd_check = True  # torch 2.12's default
    inductor_config.fx_graph_cache = False  # a cache hit skips the post-grad passes, the check with them
    calls, check = [], spmd_check.spmd_check
    spmd_check.spmd_check = lambda gm: calls.append(gm) or check(gm)
    model = tiny_qwen()
    with torch.no_grad():
        fastusp.compile_pipeline(model)
        model(**qwen_inputs(batch=1), return_dict=False)
        ours = len(calls)
        torch.compile(lambda x: x.sin() + 1, options={"reorder_for_compute_comm_overlap": True})(torch.randn(4))
    return ours, len(calls) - ours


def test_compile_pipeline_turns_off_inductors_spmd_graph_check():
    # The check gathers every rank's graph hash on the default group while a block compiles. Ranks of an uneven
    # split trace different shapes, and a rank that does not reach the check (a fallback, a cache hit) leaves the
    # others waiting in it: with torch 2.12 (check on by default) FLUX's compiled ring deadlocked on CPU.
    pytest.importorskip("torch._inductor.fx_passes.spmd_check")
    [(ours, control)] = run_distributed(_spmd_checks_while_compiling, 1)
    assert control == 1
    assert ours == 0


def _compile_under_first_block_cache(cache_first: bool):
    from diffusers.hooks import FirstBlockCacheConfig

    compiles, counting_backend = _counting_backend()

    def cached(compile_it: bool):
        model = tiny_flux()
        if compile_it and not cache_first:
            fastusp.compile_pipeline(model, backend=counting_backend)
        model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        if compile_it and cache_first:
            fastusp.compile_pipeline(model, backend=counting_backend)
        ran = []  # the last block's attention: it runs in calls the cache does not skip
        model.single_transformer_blocks[-1].attn.register_forward_pre_hook(lambda m, a: ran.append(1))
        outs = []
        with torch.no_grad(), model.cache_context("cond"):
            for seed in (1, 1, 2):  # full, skipped (nothing changed), full (new inputs)
                outs.append(model(**flux_inputs(seed=seed), return_dict=False)[0])
        report = fastusp.compile_report(model) if compile_it else None
        # the compiled forward keeps the block's signature (code that binds arguments by it still can)
        assert "hidden_states" in inspect.signature(model.transformer_blocks[0].forward).parameters
        return outs, len(ran), report and report.fell_back

    expected, expected_runs, _ = cached(False)
    outs, runs, fell_back = cached(True)
    return expected, expected_runs, outs, runs, len(compiles), fell_back


def _compile_whole_model() -> tuple:
    compiles, counting_backend = _counting_backend()

    model = tiny_flux()
    with torch.no_grad():
        expected = model(**flux_inputs(), return_dict=False)[0]
        fastusp.parallelize(model, ulysses=2)
        fastusp.compile_pipeline(model, regional=False, backend=counting_backend)
        out = model(**flux_inputs(), return_dict=False)[0]
    report = fastusp.compile_report(model)
    return expected, out, len(compiles), report.compiled, report.fell_back


def test_whole_model_compile_under_ulysses():
    # regional=False: the whole call, fastusp's sharding wrapper and its collectives included, graph breaks allowed
    for expected, out, compiles, compiled, fell_back in run_distributed(_compile_whole_model, 2):
        assert compiles >= 1 and compiled == ["FluxTransformer2DModel"] and fell_back == {}, (compiles, fell_back)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_first", [True, False], ids=["cache-then-compile", "compile-then-cache"])
def test_blocks_compile_beneath_a_first_block_cache(cache_first):
    # The cache's decision (a host sync) runs in the first block's hook; compiled with the hook inside, fullgraph
    # failed on it and every block ran eagerly. Beneath the hooks the blocks compile and the cache still decides.
    [(expected, expected_runs, outs, runs, compiles, fell_back)] = run_distributed(
        _compile_under_first_block_cache, 1, cache_first)
    assert expected_runs == 2 and runs == 2  # precondition: the second call was skipped
    assert fell_back == {} and compiles >= 2, (fell_back, compiles)  # both block kinds compiled, none fell back
    for got, want in zip(outs, expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="reduce-overhead"), "use cuda_graphs=True"),
    (dict(cuda_graphs=True), "needs the transformer on a CUDA device"),
])
def test_bad_compile_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastusp.compile_pipeline(tiny_flux(), **kwargs)


def test_compile_twice_is_refused():
    model = fastusp.compile_pipeline(tiny_flux(), backend="aot_eager")
    with pytest.raises(ValueError, match="already applied"):
        fastusp.compile_pipeline(model)


def test_cuda_graph_signature_separates_everything_a_graph_depends_on():
    from torch.utils import _pytree as pytree

    from fastusp.cuda_graphs import _signature

    def key(**kwargs):
        return _signature(*pytree.tree_flatten(kwargs))

    base = key(x=torch.zeros(2, 3), shapes=[(1, 4, 4)], scale=1.0, mask=None)
    assert base == key(x=torch.ones(2, 3), shapes=[(1, 4, 4)], scale=1.0, mask=None)  # values are copied in
    for other in (key(x=torch.zeros(2, 4), shapes=[(1, 4, 4)], scale=1.0, mask=None),  # shape
                  key(x=torch.zeros(2, 3, dtype=torch.float64), shapes=[(1, 4, 4)], scale=1.0, mask=None),
                  key(x=torch.zeros(3, 2).t(), shapes=[(1, 4, 4)], scale=1.0, mask=None),  # strides
                  key(x=torch.zeros(2, 3), shapes=[(1, 4, 5)], scale=1.0, mask=None),  # image shape
                  key(x=torch.zeros(2, 3), shapes=[(1, 4, 4)], scale=2.0, mask=None),  # python value
                  key(x=torch.zeros(2, 3), shapes=[(1, 4, 4)], scale=1.0, mask=torch.ones(2))):  # mask given
        assert other != base
    assert key(x=torch.zeros(1), extra=object()) is None  # unknown objects: never graphed


def test_model_state_notices_what_a_graph_bakes_in_and_nothing_else():
    # what makes compiled graphs recapture (tests/test_lora.py covers LoRA changes end to end)
    from fastusp.cuda_graphs import ModelState
    from fastusp.testing import random_ip_adapter_state_dict
    from fastusp.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.transformer._load_ip_adapter_weights(random_ip_adapter_state_dict(pipe.transformer, 20),
                                              low_cpu_mem_usage=False)
    state = ModelState(pipe.transformer)
    assert not state.changed()
    torch.nn.Linear(2, 2)  # another model built
    pipe.vae.decoder.conv_out = torch.nn.Conv2d(16, 3, 3)  # a module set outside the transformer
    assert not state.changed()
    pipe.set_ip_adapter_scale(0.5)  # a Python float in the IP-Adapter processors
    assert state.changed() and not state.changed()  # seen once
    pipe.transformer.to(torch.float64)  # the same parameters, in new memory
    assert state.changed() and not state.changed()
    pipe.transformer.proj_out = torch.nn.Linear(pipe.transformer.inner_dim, 16)  # a module replaced inside
    assert state.changed() and not state.changed()
    pipe.transformer.proj_out.bias = torch.nn.Parameter(torch.zeros(16))  # inside the new module: it is a member
    assert state.changed() and not state.changed()


def test_model_state_notices_weights_that_were_away_even_if_they_return_to_their_old_memory():
    # enable_model_cpu_offload: the weights wait on the CPU between pipeline calls and come back inside the next call,
    # maybe to their old addresses on one rank and not on another; every rank must capture again all the same
    from fastusp.cuda_graphs import ModelState

    model = torch.nn.Linear(4, 4)
    state = ModelState(model)
    model(torch.ones(1, 4))
    assert not state.changed()
    kept = dict(model._parameters)
    model.to("meta")  # away (on a GPU, offload keeps them on the CPU)
    model(torch.ones(1, 4, device="meta"))  # the call begins with the weights away ...
    model._parameters.update(kept)  # ... and the hook brings them back to the same memory
    assert [p.data_ptr() for p in model.parameters()] == [p.data_ptr() for p in kept.values()]
    assert state.changed() and not state.changed()


def test_model_state_compares_tensor_scales_by_identity_and_version():
    from fastusp.cuda_graphs import _plain, _same_settings

    scale = torch.tensor(0.5)
    before = [("peft", ("a",), False, (), "a", _plain(scale))]
    assert _same_settings([("peft", ("a",), False, (), "a", _plain(scale))], before)
    scale.mul_(2)  # hotswap: in place
    assert not _same_settings([("peft", ("a",), False, (), "a", _plain(scale))], before)
    assert not _same_settings([("peft", ("a",), False, (), "a", _plain(torch.tensor(1.0)))], before)
    drifted = 0.8 * 0.7 / 0.7  # what diffusers leaves after joint_attention_kwargs={"scale": 0.7}
    assert drifted != 0.8 and _same_settings([("peft", ("a",), False, (), "a", drifted)],
                                             [("peft", ("a",), False, (), "a", 0.8)])


def test_capture_stages_only_python_data_bound_for_the_gpu_and_restores_torch_tensor():
    # the pinned staging itself needs CUDA (tests/gpu/parity_worker.py's Qwen-Image-Edit-2511 graphs check)
    from fastusp.cuda_graphs import _pinned_host_data

    real = torch.tensor
    with pytest.raises(RuntimeError, match="raised inside"):
        with _pinned_host_data() as buffers:
            assert torch.tensor is not real
            assert torch.equal(torch.tensor([[0, 1]], device="cpu", dtype=torch.int), real([[0, 1]], dtype=torch.int))
            assert torch.tensor([2.0]).dtype == torch.float32 and buffers == []  # CPU tensors: nothing staged
            raise RuntimeError("raised inside")
    assert torch.tensor is real


def _graph_memory_pool_under_gloo():
    from fastusp.cuda_graphs import nccl_memory_pool

    return nccl_memory_pool()


def test_graphs_use_nccl_memory_only_under_nccl():
    # NCCL's allocator backs the graph pool only when the default group is NCCL (checked on GPU by
    # tests/gpu/parity_worker.py); elsewhere the graphs keep torch's default pool instead of failing.
    from fastusp.cuda_graphs import nccl_memory_pool

    assert nccl_memory_pool() is None  # no process group
    assert run_distributed(_graph_memory_pool_under_gloo, world=2) == [None, None]


def test_graph_warmups_and_capture_each_get_fresh_input_containers(monkeypatch):
    # diffusers' FLUX forward pops ip_adapter_image_embeds out of joint_attention_kwargs: if the warm-up calls and
    # the capture shared one dict, only the first would see the IP-Adapter and the graph would be captured without
    # it. The capture itself needs CUDA; here it is replaced by its calls (2 warm-ups, then the captured call).
    from types import SimpleNamespace

    from fastusp import cuda_graphs

    seen = []

    def forward(hidden_states, joint_attention_kwargs):
        seen.append(joint_attention_kwargs.pop("ip_adapter_image_embeds", None) is not None)
        return hidden_states * 2

    def capture_graph(fn, warmup, pool):
        for _ in range(warmup):
            fn()
        return SimpleNamespace(replay=lambda: None), fn()

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture_graph)
    monkeypatch.setattr(cuda_graphs, "nccl_memory_pool", lambda: SimpleNamespace(id=0))
    graphed = cuda_graphs.GraphedForward(forward, warmup=2)
    kwargs = {"ip_adapter_image_embeds": [torch.ones(1, 1, 3)]}
    out = graphed(hidden_states=torch.ones(2), joint_attention_kwargs=kwargs)
    assert seen == [True, True, True]
    assert torch.equal(out, torch.full((2,), 2.0))
    assert "ip_adapter_image_embeds" in kwargs  # the caller's dict is not the one the forward pops from


def _graphs_across_destroy_process_group():
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed import destroy_process_group  # bound before fastusp builds a graph, as scripts do

    from fastusp import cuda_graphs

    captures = []
    cuda_graphs.capture_graph = lambda fn, warmup, pool: (captures.append(pool) or SimpleNamespace(replay=lambda: None),
                                                          fn())
    cuda_graphs.nccl_memory_pool = lambda: SimpleNamespace(id=len(captures))
    graphed = cuda_graphs.GraphedForward(lambda x: x * 2)
    graphed(x=torch.ones(2))
    before = (len(graphed.graphs), graphed.pool is not None)
    destroy_process_group()
    after = (len(graphed.graphs), graphed.pool, dist.is_initialized())
    graphed(x=torch.ones(2))  # captures again, in a new pool
    return before, after, captures


def test_destroy_process_group_releases_the_cuda_graphs_first():
    # NCCL's communicators do not shut down while a graph holds their collectives (destroy_process_group hung on
    # GPU; tests/gpu/no_set_device_worker.py now ends with it). Capture is replaced as in tests/_fake_graphs.py.
    results = run_distributed(_graphs_across_destroy_process_group, world=2)
    assert results == [((1, True), (0, None, False), [0, 1])] * 2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_graphs_on_a_gpu_that_is_not_the_current_device():
    """A rank whose script never called torch.cuda.set_device: its graphs are captured and replayed on the model's
    GPU, so each replay computes its own inputs (captured on the current device, a replay returns the capture's)."""
    from fastusp.cuda_graphs import GraphedForward

    assert torch.cuda.current_device() == 0
    device = f"cuda:{torch.cuda.device_count() - 1}"
    model = tiny_flux().to(device)
    graphed = GraphedForward(lambda **kwargs: model(**kwargs, return_dict=False)[0], model)
    with torch.no_grad():
        for seed in (1, 2, 3):  # the first call captures, the others replay
            inputs = {k: v.to(device) for k, v in flux_inputs(seed=seed).items()}
            torch.testing.assert_close(graphed(**inputs), model(**inputs, return_dict=False)[0])
    assert len(graphed.graphs) == 1 and torch.cuda.current_device() == 0


def test_more_input_shapes_than_dynamo_keeps_run_eagerly_instead_of_failing():
    # Each image size compiles its own block code (dynamic=False); past Dynamo's recompile_limit, fullgraph compiles
    # raise. Those calls must run eagerly and stay correct, not crash the pipeline.
    import torch._dynamo

    model = fastusp.compile_pipeline(tiny_flux(), backend="eager", cuda_graphs=False)
    reference = tiny_flux()
    # config.patch, not pytest's monkeypatch: undoing that deletes the setting from torch's config module
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for h, w in [(2, 3), (3, 3), (3, 4), (2, 3), (4, 4)]:  # the 3rd and 5th sizes are past the limit
            inputs = flux_inputs(height=h, width=w, text_len=5)
            torch.testing.assert_close(model(**inputs, return_dict=False)[0],
                                       reference(**inputs, return_dict=False)[0], rtol=1e-5, atol=1e-6)
    report = fastusp.compile_report(model)
    assert "recompile limit" in report.fell_back and "all blocks" not in report.fell_back
