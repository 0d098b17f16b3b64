"""The benchmark harness's trace arithmetic: "NCCL time not hidden by compute", in total and per position."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from step_latency import kernel_breakdown, parse_fastusp_config  # noqa: E402


def _kernel(name, start_us, dur_us):
    return {"cat": "kernel", "name": name, "ts": start_us, "dur": dur_us}


def test_breakdown_counts_only_the_nccl_time_no_compute_kernel_covers():
    trace = {"traceEvents": [
        _kernel("ncclDevKernel_SendRecv", 0, 1000),        # 0-1 ms, half under the GEMM
        _kernel("nvjet_tst_gemm", 500, 1000),              # 0.5-1.5 ms
        _kernel("cudnn_generated_fort_native_sdpa", 2000, 500),  # after a 0.5 ms gap
        _kernel("triton_poi_fused_cat_0", 2500, 500),
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000},  # host events are not kernels
    ]}
    b = kernel_breakdown(trace, steps=1)
    assert (b["nccl_ms"], b["gemm_ms"], b["attention_ms"], b["other_ms"]) == (1.0, 1.0, 0.5, 0.5)
    assert b["compute_busy_ms"] == 2.0 and b["nccl_exposed_ms"] == 0.5
    assert b["span_ms"] == 3.0 and b["idle_ms"] == 0.5 and b["kernels_per_step"] == 4
    assert kernel_breakdown(trace, steps=2)["nccl_exposed_ms"] == 0.25


def test_fastusp_config_names():
    assert parse_fastusp_config("u2r1") == dict(ulysses=2, ring=1, fp8_comm=False)
    assert parse_fastusp_config("u2r2-fp8all-c4") == dict(ulysses=2, ring=2, fp8_comm="all", ulysses_chunks=4)
    assert parse_fastusp_config("cfg2u1r1") == dict(cfg=2, ulysses=1, ring=1, fp8_comm=False)


def _true_cfg_step_worker(config: str | None):
    """step_latency's --true-cfg path, --tiny, on this rank: the pipeline step that it times."""
    import torch

    import step_latency

    a = step_latency.parse_args(["--tiny", "--model", "qwen", "--true-cfg", "4", "--steps", "1", "--warmup", "1",
                                 "--txt", "5"] + (["--impl", "fastusp", "--config", config] if config else []))
    model = step_latency.build_model(a.model, torch.device("cpu"), torch.float32, tiny=True)
    pipe = step_latency.build_pipeline(a.model, model)
    step_latency.APPLY[a.impl](pipe, a, 2 if config else 1)
    kw = step_latency.pipeline_inputs(model, a, torch.device("cpu"), torch.float32)
    _, times_ms, latents = step_latency.pipeline_steps(pipe, kw, torch.device("cpu"), a.warmup, a.steps)
    return times_ms, latents


def test_true_cfg_pipeline_step_gives_one_process_latents():
    # the timed pipeline step with CFG parallelism denoises exactly what one process does
    import torch

    from _dist import run_distributed

    [(times, expected)] = run_distributed(_true_cfg_step_worker, 1, None)
    assert len(times) == 1
    for config in ("cfg2u1r1", "u2r1"):
        for times, latents in run_distributed(_true_cfg_step_worker, 2, config):
            assert len(times) == 1
            torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def _step_worker(args: list, impl: str | None, config: str | None):
    """step_latency's forward for `args` (--tiny), on this rank: one process without impl, else impl + config."""
    import torch

    import step_latency

    a = step_latency.parse_args(args + (["--impl", impl, "--config", config] if impl else []))
    model = step_latency.build_model(a.model, torch.device("cpu"), torch.float32, tiny=True, zero_cond_t=a.edit_2511)
    step_latency.APPLY[a.impl](model, a, 2 if impl else 1)
    kw = step_latency.make_inputs(a.model, torch.device("cpu"), torch.float32, a.height, a.width, a.txt,
                                  reference=a.edit_2511)
    with torch.no_grad():
        return model(**kw)[0], kw["hidden_states"].shape[1]


def test_edit_2511_step_is_the_same_forward_for_every_impl():
    # twice the image tokens (the reference image's after the edited one's); fastusp on 2 ranks gives what one
    # process does (diffusers' context parallel needs an accelerator)
    import torch

    from _dist import run_distributed

    args = ["--tiny", "--model", "qwen", "--edit-2511", "--txt", "5", "--height", "64", "--width", "48"]
    [(expected, tokens)] = run_distributed(_step_worker, 1, args, None, None)
    assert tokens == 2 * (64 // 16) * (48 // 16)
    for out, _ in run_distributed(_step_worker, 2, args, "fastusp", "u2r1"):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_flux2_step_is_the_same_forward_for_every_impl():
    import torch

    from _dist import run_distributed

    args = ["--tiny", "--model", "flux2", "--txt", "5", "--height", "64", "--width", "48"]
    [(expected, tokens)] = run_distributed(_step_worker, 1, args, None, None)
    assert tokens == (64 // 16) * (48 // 16)
    for config in ("u2r1", "u1r2"):
        for out, _ in run_distributed(_step_worker, 2, args, "fastusp", config):
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_exposure_by_position():
    from trace_exposure import exposure_by_position
    # one step: gemm 0-10; nccl#0 at 10-14 alone (exposed 4); attention 14-20 with nccl#1 at 15-19 (hidden);
    # nccl#2 (a final gather, past the one whole layer of 2) at 20-22 alone
    trace = {"traceEvents": [_kernel("nvjet_gemm", 0, 10), _kernel("ncclDevKernel_SendRecv", 10, 4),
                             _kernel("cudnn_sdpa", 14, 6), _kernel("ncclDevKernel_SendRecv", 15, 4),
                             _kernel("ncclDevKernel_AllGather", 20, 2)]}
    out = exposure_by_position(trace, steps=1, per_layer=2)
    assert out[0] == {"calls": 1, "ms": 0.004, "exposed_ms": 0.004}
    assert out[1] == {"calls": 1, "ms": 0.004, "exposed_ms": 0.0}
    assert out["rest"] == {"calls": 1, "ms": 0.002, "exposed_ms": 0.002}


def test_idle_by_next_kernel():
    from trace_exposure import idle_by_next_kernel
    # two steps: gemm 0-10, nccl 5-12 on another stream (no gap: the gemm still runs), attention 14-20 (gap 2),
    # gemm 21-30 (gap 1); step 2 starts 5000 later (a gap between steps, left out) with the same kernels
    step = [("nvjet_gemm", 0, 10), ("ncclDevKernel_SendRecv", 5, 7), ("cudnn_sdpa", 14, 6), ("nvjet_gemm", 21, 9)]
    trace = {"traceEvents": [_kernel(n, t + offset, d) for offset in (0, 5000) for n, t, d in step]}
    assert idle_by_next_kernel(trace, steps=2) == {"cudnn_sdpa": {"gaps": 1, "ms": 0.002, "avg_us": 2.0},
                                                   "nvjet_gemm": {"gaps": 1, "ms": 0.001, "avg_us": 1.0}}


def test_wait_by_position():
    from trace_exposure import wait_by_position
    # two ranks, one layer of 2 collectives per step, three steps. #0: rank 0 waits 3 us for rank 1 (7 against
    # 4 us), except in the first step, where rank 1 waits 900 us (the profile's start; the median leaves it out);
    # #1: rank 1 waits 1 us (6 against 5). The compute kernels between them do not count.
    def step(t, first):
        return ([("ncclDevKernel_AllToAll", t, 4 if first else 7), ("cudnn_sdpa", t + 7, 10),
                 ("ncclDevKernel_AllToAll", t + 18, 5)],
                [("ncclDevKernel_AllToAll", t + 3, 904 if first else 4), ("cudnn_sdpa", t + 7, 10),
                 ("ncclDevKernel_AllToAll", t + 17, 6)])
    steps = [step(t, t == 0) for t in (0, 1000, 2000)]
    traces = [{"traceEvents": [_kernel(n, t, d) for s in steps for n, t, d in s[rank]]} for rank in (0, 1)]
    assert wait_by_position(traces, steps=3, per_layer=2) == {
        0: {"calls_per_step": 1.0, "transfer_us": 4.0, "wait_us": [3.0, 0.0]},
        1: {"calls_per_step": 1.0, "transfer_us": 5.0, "wait_us": [0.0, 1.0]}}


def _yunchang_worker(a):
    import torch
    from step_latency import apply_yunchang
    from fastusp.testing import flux_inputs, tiny_flux

    model = tiny_flux()
    apply_yunchang(model, a, 2)  # in place
    with torch.no_grad():
        return model(**flux_inputs(height=4, width=4, text_len=6), return_dict=False)[0]


def test_yunchang_baseline_computes_the_single_device_output():
    # the baseline must be right before its time means anything: yunchang's USP inside fastusp's sharding
    import argparse

    import pytest
    import torch

    pytest.importorskip("yunchang")
    from _dist import run_distributed
    from fastusp.testing import flux_inputs, tiny_flux

    with torch.no_grad():
        ref = tiny_flux()(**flux_inputs(height=4, width=4, text_len=6), return_dict=False)[0]
    outs = run_distributed(_yunchang_worker, 2, argparse.Namespace(config="u2r1"))
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _controlnet_step_worker(config: str | None, whole: bool):
    """step_latency's --controlnet path, --tiny, eager, on this rank: the ControlNet + transformer step it times."""
    import torch

    import step_latency

    args = ["--tiny", "--controlnet", "1+1", "--txt", "5"]
    args += (["--impl", "fastusp", "--config", config] + (["--controlnet-whole"] if whole else [])) if config else []
    a = step_latency.parse_args(args)
    device = torch.device("cpu")
    model = step_latency.build_model(a.model, device, torch.float32, tiny=True)
    net = step_latency.build_controlnet(model, a.controlnet, device, torch.float32)
    target = step_latency.controlnet_target(model, net, a)
    step_latency.APPLY[a.impl](target, a, 2 if config else 1)
    kw = step_latency.make_inputs(a.model, device, torch.float32, 64, 64, a.txt)
    step = step_latency.controlnet_step(model, net, kw, device, torch.float32)
    with torch.no_grad():
        return step(**kw)[0], getattr(net, "_fastusp_config", None) is not None


def test_controlnet_step_gives_one_process_output_sharded_or_whole():
    import torch

    from _dist import run_distributed

    [(expected, _)] = run_distributed(_controlnet_step_worker, 1, None, False)
    for whole in (False, True):
        for out, sharded in run_distributed(_controlnet_step_worker, 2, "u2r1", whole):
            assert sharded == (not whole)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_report_keeps_controlnet_steps_apart_and_labels_the_whole_controlnet():
    # A step with a ControlNet is another workload: its speed-ups are against the one-GPU ControlNet step, not the
    # plain one, and --controlnet-whole rows say so.
    import report

    base = dict(model="flux", res="1024x1024", txt=512, tiny=False, card="H200", compiled=True, backend=None,
                date="2026-11-27", finite=True, err=None)
    records = [dict(base, world=1, impl="single", config="-", compile_mode="regional", median_ms=131.0),
               dict(base, world=1, impl="single", config="-", compile_mode="regional", median_ms=170.0,
                    controlnet="5+10"),
               dict(base, world=2, impl="fastusp", config="u2r1", compile_mode="pipeline", median_ms=100.0,
                    controlnet="5+10"),
               dict(base, world=2, impl="fastusp", config="u2r1", compile_mode="pipeline", median_ms=110.0,
                    controlnet="5+10", controlnet_whole=True)]
    rows = report.add_speedups(report.dedupe([report.normalize(r) for r in records]))
    sharded, whole = [r for r in rows if r["impl"] == "fastusp"]
    assert (sharded["speedup_vs_same_mode"], whole["speedup_vs_same_mode"]) == (1.7, round(170.0 / 110.0, 3))
    text = report.markdown("H200", rows)
    assert "with a 5+10-block ControlNet" in text and "| u2r1 (ControlNet whole) |" in text


def test_controlnet_of_a_full_size_transformer_has_the_blocks_asked_for(monkeypatch):
    """build_model passes no widths, so its config lists every key as a default: a ControlNet built from it must
    still get --controlnet's block counts, not the transformer's 19 + 38 (what the first GPU timing measured)."""
    import torch
    from diffusers import FluxTransformer2DModel

    import step_latency

    monkeypatch.setattr(step_latency, "fill_random_", lambda model, device: None)  # nothing to fill on meta
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    net = step_latency.build_controlnet(model, "5+10", torch.device("meta"), torch.bfloat16)
    assert (len(net.transformer_blocks), len(net.single_transformer_blocks)) == (5, 10)
    assert net.config.num_attention_heads == 24 and net.config.attention_head_dim == 128


def test_a_compiled_run_records_what_fell_back_to_eager():
    # a timing of blocks that fell back to eager must not read like a compiled one: the record carries the report's
    # fallbacks ({} when none), and only for runs that fastusp compiled
    import fastusp
    import step_latency
    from fastusp.testing import tiny_flux

    compiled = step_latency.parse_args(["--tiny", "--impl", "fastusp", "--config", "u1r1", "--compile", "1"])
    eager = step_latency.parse_args(["--tiny", "--impl", "fastusp", "--config", "u1r1", "--compile", "0"])
    model = tiny_flux()
    assert step_latency.compile_fallbacks(model, compiled) is None  # compile_pipeline not applied
    fastusp.compile_pipeline(model, cuda_graphs=False)
    assert step_latency.compile_fallbacks(model, compiled) == {}
    fastusp.compile_report(model).fell_back["all blocks"] = "transformer_blocks.0 failed to compile"
    assert step_latency.compile_fallbacks(model, compiled) == {"all blocks": "transformer_blocks.0 failed to compile"}
    assert step_latency.compile_fallbacks(model, eager) is None


def test_peer_config_names_and_the_ones_refused():
    import pytest

    import peers

    assert peers.parse_cache_dit_config("u2r1") == dict(ulysses_size=2, ring_size=None, ulysses_async=False,
                                                        ulysses_float8=False, attention_backend=None)
    assert peers.parse_cache_dit_config("u2r2-fp8-async-cudnn") == dict(
        ulysses_size=2, ring_size=2, ulysses_async=True, ulysses_float8=True, attention_backend="_sdpa_cudnn")
    assert peers.parse_xdit_config("cfg2u1r2-fp8") == dict(use_cfg_parallel=True, ulysses_degree=1, ring_degree=2,
                                                           use_fp8_comms=True)
    assert [peers.degrees("cache-dit", "u1r4"), peers.degrees("xdit", "cfg2u2r1")] == [4, 4]
    for impl, config in (("cache-dit", "ulysses2"), ("cache-dit", "u1r2-async"), ("cache-dit", "u1r2-fp8"),
                         ("xdit", "u2r1-async"), ("xdit", "cfg4u1r1")):
        with pytest.raises(ValueError, match=f"{impl} config"):
            peers.degrees(impl, config)
    with pytest.raises(ValueError, match="2 processes, but the world is 4"):
        peers.check_world("xdit", "u2r1", 4)


def test_peer_runs_take_the_plain_flux_or_qwen_forward_and_the_peers_compile_path():
    import pytest

    import step_latency

    a = step_latency.parse_args(["--impl", "xdit", "--config", "u2r1", "--compile", "1", "--model", "qwen"])
    assert step_latency.resolved_compile_mode(a) == "peer"
    assert step_latency.resolved_compile_mode(step_latency.parse_args(["--impl", "cache-dit", "--config", "u2r1",
                                                                       "--compile", "1", "--compile-mode",
                                                                       "whole"])) == "whole"
    for extra in (["--model", "flux2"], ["--true-cfg", "4"], ["--controlnet", "5+10"], ["--first-block-cache", "0.1"]):
        with pytest.raises(SystemExit):
            step_latency.parse_args(["--impl", "cache-dit", "--config", "u2r1"] + extra)


def test_a_peer_record_names_the_peer_version_and_why_it_did_not_run(monkeypatch, capsys):
    # without the package the run fails in apply, and its record says so and what to carry; the record written for a
    # run that died (run_gpu.sh's --record-failure) names the peer too
    import importlib.metadata
    import json

    import pytest
    import torch

    import step_latency

    for impl, module, wheel in (("cache-dit", "cache_dit", "cache_dit-1.5.3"), ("xdit", "xfuser", "xfuser-0.7.0")):
        monkeypatch.setitem(sys.modules, module, None)  # not importable, installed or not
        a = step_latency.parse_args(["--tiny", "--impl", impl, "--config", "u1r1", "--txt", "5", "--height", "32",
                                     "--width", "32"])
        record = step_latency.base_record(a, 1, torch.device("cpu"))
        try:
            expected = importlib.metadata.version({"cache-dit": "cache-dit", "xdit": "xfuser"}[impl])
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert (record["peer"], record["peer_version"]) == (impl, expected)
        with pytest.raises(ModuleNotFoundError) as failure:
            step_latency.run(a, 1, 0, torch.device("cpu"), record)
        assert f"carry {wheel}" in step_latency.error_text(failure.value)

    assert step_latency.main(["--impl", "xdit", "--config", "u2r1", "--world", "2", "--record-failure", "timeout"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["impl"], record["peer"], record["err"], record["world"]) == ("xdit", "xdit", "timeout", 2)


def test_the_one_gpu_check_flags_a_wrong_output_and_a_wrong_shape():
    import torch

    import peers
    import step_latency

    bf16 = step_latency.parse_args(["--impl", "cache-dit", "--config", "u2r1"])
    fp8 = step_latency.parse_args(["--impl", "cache-dit", "--config", "u2r1-fp8"])
    reference = torch.randn(1, 64, 16)
    assert peers.one_gpu_check(reference.clone(), reference, bf16) == dict(one_gpu_rel_err=0.0, matches_one_gpu=True)
    swapped = torch.cat([reference[:, 32:], reference[:, :32]], dim=1)  # the ranks' halves gathered in the wrong order
    assert peers.one_gpu_check(swapped, reference, bf16)["matches_one_gpu"] is False
    noisy = reference + 0.07 * reference.norm() / reference.numel() ** 0.5 * torch.randn(1, 64, 16)
    assert [peers.one_gpu_check(noisy, reference, c)["matches_one_gpu"] for c in (bf16, fp8)] == [False, True]
    check = peers.one_gpu_check(reference[:, :32], reference, bf16)
    assert check["matches_one_gpu"] is False and "(1, 32, 16)" in check["one_gpu_note"]


def _peer_step_worker(impl: str, config: str):
    """step_latency's forward with a peer applied (--tiny, CPU), this rank's output."""
    import torch

    import step_latency

    a = step_latency.parse_args(["--tiny", "--impl", impl, "--config", config, "--txt", "6", "--height", "64",
                                 "--width", "64"])
    model = step_latency.build_model(a.model, torch.device("cpu"), torch.float32, tiny=True)
    kw = step_latency.make_inputs(a.model, torch.device("cpu"), torch.float32, a.height, a.width, a.txt)
    reference = step_latency.peers.one_gpu_output(model, kw)
    step_latency.APPLY[impl](model, a, 2)
    with torch.no_grad():  # clone: cache-dit's gathered output is a collective not yet waited for, whose storage
        return model(**kw)[0].clone(), reference  # torch.save would read as it is


def test_cache_dit_ulysses_computes_the_one_process_output():
    # runs where cache-dit is importable (not in the CPU venv: PYTHONPATH=/tmp/peersite, see benchmarks/peers.py)
    import pytest
    import torch

    pytest.importorskip("cache_dit")
    from _dist import run_distributed

    for config in ("u2r1", "u2r1-async"):
        for out, reference in run_distributed(_peer_step_worker, 2, "cache-dit", config):
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_run_gpu_accepts_the_peers_runs_and_refuses_an_unknown_impl():
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run_gpu.sh")
    check = "source <(sed -n '/^check_spec()/,/^}/p' \"$0\"); for s in \"$@\"; do check_spec \"$s\" || exit 1; done"
    run = lambda *specs: subprocess.run(["bash", "-c", check, script, *specs], capture_output=True, text=True)
    assert run("2:cache-dit:u2r1-async:1", "4:xdit:u2r2:1", "1:single:-:1").returncode == 0
    refused = run("2:cache_dit:u2r1:1")
    assert refused.returncode == 1 and "cache-dit|xdit" in refused.stderr


def _xdit_step_worker(model_name: str):
    """peers.apply_xdit on this rank, on CPU: xfuser 0.7.0 wants an accelerator at import and finds yunchang only with
    CUDA, so it is told it runs on MPS (gloo, SDPA, no set_device) and that yunchang is there. Returns None where
    xfuser does not import, else (this rank's output, the one-process output)."""
    import torch

    import step_latency

    torch.backends.mps.is_available = lambda: True  # this forked rank only
    try:
        import xfuser.config.config
        import xfuser.core.distributed.group_coordinator
        import xfuser.core.distributed.parallel_state
        import xfuser.model_executor.layers.usp as usp
        import yunchang.globals
    except Exception:  # not installed, or its dependencies (triton) missing
        return None
    for module in (xfuser.config.config, xfuser.core.distributed.parallel_state,
                   xfuser.core.distributed.group_coordinator):
        module.HAS_LONG_CTX_ATTN = True
    usp.PROCESS_GROUP = yunchang.globals.PROCESS_GROUP
    a = step_latency.parse_args(["--tiny", "--model", model_name, "--impl", "xdit", "--config", "u2r1", "--txt", "6",
                                 "--height", "64", "--width", "64"])
    model = step_latency.build_model(a.model, torch.device("cpu"), torch.float32, tiny=True)
    kw = step_latency.make_inputs(a.model, torch.device("cpu"), torch.float32, a.height, a.width, a.txt)
    reference = step_latency.peers.one_gpu_output(model, kw)
    step_latency.APPLY["xdit"](model, a, 2)
    with torch.no_grad():
        return model(**kw)[0].clone(), reference


def test_xdit_ulysses_on_the_built_transformer_computes_the_one_process_output():
    # runs where xfuser imports (not in the CPU venv, see benchmarks/peers.py); xfuser is imported in the forked ranks
    # only, as it patches torchao at import
    import pytest
    import torch

    from _dist import run_distributed

    for model_name in ("flux", "qwen"):
        results = run_distributed(_xdit_step_worker, 2, model_name)
        if results[0] is None:
            pytest.skip("xfuser does not import here")
        for out, reference in results:
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
