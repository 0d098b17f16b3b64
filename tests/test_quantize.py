"""fastusp.quantize(pipe, "fp8"): which layers it selects, its errors, its order with parallelize / compile_pipeline.

torchao's float8 config refuses to quantize without a CUDA GPU of compute capability 8.9+ (a global check, not the
weights' device); with that check and fastusp's own device check lifted (`cpu_float8`), torchao's Float8Tensor
computes on CPU too, so the selection, the parallel output and LoRA on a quantized base are tested here on real
float8 weights. The CUDA kernels and compile are tests/gpu/fp8_worker.py's.
"""
import os
import sys

import pytest
import torch

import fastusp
from _dist import run_distributed
from fastusp.quantization import DEFAULT_KEEP_BF16, LAYER_GROUPS, fp8_layer_names, is_quantized_weight
from fastusp.testing import flux_inputs, qwen_inputs, random_lora_state_dict
from fastusp.testing import tiny_flux as tiny_flux_float32
from fastusp.testing import tiny_flux2 as tiny_flux2_float32
from fastusp.testing import tiny_qwen as tiny_qwen_float32

pytest.importorskip("torchao")
quantization = sys.modules["fastusp.quantization"]  # the module (fastusp.quantize is the function)


@pytest.fixture
def cpu_float8(monkeypatch):
    lift_device_checks(monkeypatch.setattr)


def lift_device_checks(setattr_=setattr):
    import torchao.quantization.quant_api as quant_api

    setattr_(quant_api, "_check_hardware_support", lambda granularity: None)
    setattr_(quantization, "_check_device", lambda transformer: None)


def tiny_flux():  # per-row float8 scales need bf16 weights
    return tiny_flux_float32().to(torch.bfloat16)


def tiny_flux2():
    return tiny_flux2_float32().to(torch.bfloat16)


def tiny_qwen():
    return tiny_qwen_float32().to(torch.bfloat16)


def bf16(inputs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def block_linears(model):
    kinds = set(model._repeated_blocks)
    return {f"{b}.{n}" for b, m in model.named_modules() if type(m).__name__ in kinds
            for n, sub in m.named_modules() if isinstance(sub, torch.nn.Linear)}


@pytest.mark.parametrize("build", [tiny_flux, tiny_flux2, tiny_qwen], ids=["flux", "flux2", "qwen"])
def test_selects_the_blocks_linears_and_keeps_embedders_and_output_bf16(build):
    model = build()
    names = fp8_layer_names(model)
    assert set(names) == block_linears(model) and names
    outside = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(names)
    assert {"proj_out", "norm_out.linear", "x_embedder" if build is not tiny_qwen else "img_in"} <= outside
    assert not any(n.startswith(("transformer_blocks", "single_transformer_blocks")) for n in outside)


def test_every_block_linear_is_in_one_layer_group():
    for build in (tiny_flux, tiny_flux2, tiny_qwen):
        model = build()
        for name in fp8_layer_names(model):
            groups = [g for g in LAYER_GROUPS if name not in fp8_layer_names(model, LAYER_GROUPS[g])]
            assert len(groups) == 1, (name, groups)


def test_keep_bf16_patterns_and_widths_the_float8_gemm_cannot_take():
    model = tiny_flux()
    kept = fp8_layer_names(model, ("*.attn.to_q", "*.ff.*"))
    assert not any(n.endswith("attn.to_q") or ".ff." in n for n in kept)
    assert "transformer_blocks.0.attn.to_k" in kept and "transformer_blocks.0.ff_context.net.2" in kept
    assert fp8_layer_names(model, "*.attn.to_q") == fp8_layer_names(model, ("*.attn.to_q",))
    from diffusers import FluxTransformer2DModel
    odd = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=12,
                                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                                 axes_dims_rope=(4, 4, 4))
    assert fp8_layer_names(odd) == []  # 24-wide projections: no float8 GEMM


@pytest.mark.parametrize("kwargs, match", [(dict(mode="int4"), "mode='int4'"),
                                           (dict(granularity="block"), "granularity='block'"),
                                           (dict(keep_bf16=("*",)), "no linear layer")])
def test_argument_errors(cpu_float8, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastusp.quantize(tiny_flux(), **kwargs)


def test_per_row_scales_need_bf16_weights(cpu_float8):
    with pytest.raises(ValueError, match="need bf16 weights"):
        fastusp.quantize(tiny_flux_float32(), "fp8")


def test_on_cpu_it_says_float8_gemms_need_a_cuda_gpu():
    with pytest.raises(ValueError, match=r"compute capability 8\.9.*pipe\.to\('cuda'\)"):
        fastusp.quantize(tiny_flux(), "fp8")


def test_without_torchao_it_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"pip install fastusp\[fp8\]"):
        fastusp.quantize(tiny_flux(), "fp8")


def test_after_compile_pipeline_it_raises(cpu_float8):
    model = fastusp.compile_pipeline(tiny_flux(), cuda_graphs=False)
    with pytest.raises(ValueError, match="before fastusp.compile_pipeline"):
        fastusp.quantize(model, "fp8")
    regional = tiny_flux()
    regional.compile_repeated_blocks(fullgraph=True)
    with pytest.raises(ValueError, match="already compiled"):
        fastusp.quantize(regional, "fp8")


def test_twice_or_on_a_model_with_lora_layers_it_raises(cpu_float8):
    model = fastusp.quantize(tiny_flux(), "fp8")
    with pytest.raises(ValueError, match="already holds quantized weights"):
        fastusp.quantize(model, "fp8")
    pipe = flux_pipeline(tiny_flux())
    pipe.load_lora_weights(random_lora_state_dict(pipe.transformer, 1), adapter_name="a")
    with pytest.raises(ValueError, match="quantize first, then load the LoRA"):
        fastusp.quantize(pipe, "fp8")


def flux_pipeline(transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_quantizes_the_selected_weights_in_place(cpu_float8, granularity):
    inputs = bf16(flux_inputs(batch=1, height=4, width=6, text_len=5))
    model = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        pipe = fastusp.quantize(flux_pipeline(model), "fp8", granularity=granularity, keep_bf16=("*.attn.to_out.0",))
        out = pipe.transformer(**inputs, return_dict=False)[0]
    selected = set(fp8_layer_names(tiny_flux(), ("*.attn.to_out.0",)))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_quantized_weight(module.weight) == (name in selected), name
    assert not is_quantized_weight(model.get_submodule("transformer_blocks.0.attn.to_out.0").weight)
    err = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 0.1  # float8 moved the output, a little


def _quantized_forward(build, inputs, ulysses, ring, quantize_first):
    lift_device_checks()
    model = build()
    if quantize_first:
        fastusp.quantize(model, "fp8")
    fastusp.parallelize(model, ulysses=ulysses, ring=ring)
    if not quantize_first:
        fastusp.quantize(model, "fp8")
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("quantize_first", [True, False], ids=["quantize-parallelize", "parallelize-quantize"])
@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_parallel_float8_output_equals_the_single_process_one(cpu_float8, name, quantize_first):
    # per-row scales are per token, so sharding the tokens over ranks quantizes every row as one process does;
    # the shared modulation (its linears in float8 too) computes each block's on one rank
    build, inputs = (tiny_flux, flux_inputs(batch=1, height=4, width=5, text_len=7)) if name == "flux" else \
        (tiny_qwen, qwen_inputs(batch=2, height=4, width=5, text_len=7, valid_lens=[3, 7]))
    inputs = bf16(inputs)
    model = fastusp.quantize(build(), "fp8")
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    outs = run_distributed(_quantized_forward, 2, build, inputs, 2, 1, quantize_first)
    for out in outs:  # bf16 attention over other shards: bf16's rounding, not float8's (~5e-2)
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def _quantize_unlike_rank_0(quantize_first: bool) -> str:
    lift_device_checks()
    model = tiny_flux()
    granularity = "row" if torch.distributed.get_rank() == 0 else "tensor"
    try:
        if quantize_first:
            fastusp.quantize(model, "fp8", granularity=granularity)
        fastusp.parallelize(model, ulysses=2)
        if not quantize_first:
            fastusp.quantize(model, "fp8", granularity=granularity)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("quantize_first", [True, False], ids=["quantize-parallelize", "parallelize-quantize"])
def test_ranks_that_quantize_differently_all_raise(quantize_first):
    what = "settings of fastusp.parallelize" if quantize_first else "arguments of fastusp.quantize"
    for rank, error in enumerate(run_distributed(_quantize_unlike_rank_0, 2, quantize_first, timeout=60)):
        assert what in error and "granularity" in error and "rank 1" in error, f"rank {rank}: {error}"


def test_lora_loads_and_applies_on_a_float8_base(cpu_float8):
    inputs = bf16(flux_inputs(batch=1, height=4, width=6, text_len=5))
    pipe = fastusp.quantize(flux_pipeline(tiny_flux()), "fp8")
    with torch.no_grad():
        base = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.load_lora_weights(random_lora_state_dict(pipe.transformer, 1), adapter_name="a")
        with_lora = pipe.transformer(**inputs, return_dict=False)[0]
        pipe.set_adapters("a", 0.0)
        scaled_off = pipe.transformer(**inputs, return_dict=False)[0]
    assert ((with_lora - base).norm() / base.norm()).item() > 1e-2
    assert torch.allclose(scaled_off, base, atol=1e-6)
    assert is_quantized_weight(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight)
    with pytest.raises(ValueError, match="re-quantize the base layer"):  # PEFT's own error: no merge into float8
        pipe.fuse_lora(adapter_names=["a"])


def test_default_keep_list_is_documented_patterns():
    assert isinstance(DEFAULT_KEEP_BF16, tuple) and all(isinstance(p, str) for p in DEFAULT_KEEP_BF16)


def test_graph_model_state_sees_a_quantized_weight_reallocated(cpu_float8):
    from fastusp.cuda_graphs import ModelState

    model = fastusp.quantize(tiny_flux(), "fp8")
    state = ModelState(model)
    assert not state.changed()
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert weight.data_ptr() == 0  # a wrapper: only its inner tensors hold memory
    weight.qdata = weight.qdata.clone()  # what moving the weight does to the memory a graph reads
    assert state.changed()


def test_capture_stages_torch_as_tensor_too_and_restores_it():
    from fastusp.cuda_graphs import _pinned_host_data

    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor
    with _pinned_host_data() as buffers:
        assert torch.as_tensor is not real_as_tensor and torch.tensor is not real_tensor
        x = torch.arange(3)
        assert torch.as_tensor(x) is x and torch.equal(torch.as_tensor(7), real_as_tensor(7))
        assert buffers == []  # nothing bound for a GPU: nothing staged
    assert torch.as_tensor is real_as_tensor and torch.tensor is real_tensor


def test_gemm_rewrites_leave_quantized_weights_and_say_so(caplog):
    from torch.testing._internal.two_tensor import TwoTensor

    from fastusp import gemm_rewrites

    graph = torch.fx.Graph()
    node = graph.placeholder("weight")
    node.meta["example_value"] = TwoTensor(torch.randn(4, 4), torch.randn(4, 4))
    gemm_rewrites._NOTED.discard("TwoTensor")
    with caplog.at_level("INFO", logger="fastusp"):
        assert not gemm_rewrites._plain_matrix(node)
    assert "leave the linear layers with TwoTensor weights" in caplog.text


def test_step_latency_records_the_quantization_only_when_asked():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import step_latency

    device = torch.device("cpu")
    fp8 = step_latency.parse_args(["--quant", "fp8", "--quant-keep", "*.norm1.linear"])
    plain = step_latency.parse_args([])
    assert step_latency.base_record(fp8, 1, device)["quant"] == "fp8"
    assert step_latency.base_record(fp8, 1, device)["quant_keep"] == ["*.norm1.linear"]
    assert "quant" not in step_latency.base_record(plain, 1, device)
    with pytest.raises(SystemExit):
        step_latency.parse_args(["--quant-keep", "*.norm1.linear"])


def load_with_torchao_config(folder, name):
    """A model loaded as a user loads a checkpoint with diffusers' TorchAoConfig (float8, per-row scales)."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    lift_device_checks()
    cls = FluxTransformer2DModel if name == "flux" else QwenImageTransformer2DModel
    config = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return cls.from_pretrained(folder, quantization_config=config, torch_dtype=torch.bfloat16).eval()


def _torchao_config_forward(folder, name, inputs):
    model = fastusp.parallelize(load_with_torchao_config(folder, name), ulysses=2)
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_a_model_loaded_with_diffusers_torchao_config_parallelizes(cpu_float8, tmp_path, name):
    build, inputs = (tiny_flux, flux_inputs(batch=1, height=4, width=5, text_len=7)) if name == "flux" else \
        (tiny_qwen, qwen_inputs(batch=2, height=4, width=5, text_len=7, valid_lens=[3, 7]))
    inputs = bf16(inputs)
    build().save_pretrained(tmp_path)
    model = load_with_torchao_config(tmp_path, name)
    assert is_quantized_weight(model.transformer_blocks[0].attn.to_q.weight)
    with pytest.raises(ValueError, match="already holds quantized weights"):
        fastusp.quantize(model, "fp8")
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    for out in run_distributed(_torchao_config_forward, 2, str(tmp_path), name, inputs):
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
