"""fastusp.quantize(pipe, "fp8"): float8 matrix products for a transformer's linear layers, through torchao.

torchao's Float8DynamicActivationFloat8WeightConfig: each selected nn.Linear keeps its weight in float8_e4m3fn with
one scale per output row (granularity="row", default) or one for the whole weight ("tensor"), and quantizes its
input at every call (per row of tokens, or per tensor) before one float8 GEMM (torch._scaled_mm). torchao does the
arithmetic; fastusp chooses the layers and checks the order of the calls.

Which layers: only the linear layers inside the repeated transformer blocks (the ones compile_pipeline compiles).
Everything outside them stays bf16: the input embedders (x_embedder / img_in, context_embedder / txt_in), the
timestep / guidance / pooled-text embedders and the output's norm_out and proj_out. They are well under a percent of
a step's arithmetic (FLUX at 1024²: context_embedder's 13 GFLOP of ~60 TFLOP in the blocks' linears), and they
read the model's inputs and write its output directly, where float8's rounding is not averaged by later layers.
Inside the blocks, `keep_bf16` lists more layers to keep (fnmatch patterns of module names, as
transformer.named_modules() gives them; LAYER_GROUPS names the blocks' groups). A layer whose widths are not
multiples of 16 (what the float8 GEMM needs) stays bf16 too.

Granularity and parallelism: with per-row scales every token's activation row is quantized on its own, so a
parallelized model (tokens split over ranks) quantizes exactly as one GPU does. With granularity="tensor" each rank
scales its own shard of the activations, so the parallel output is not the one-GPU float8 output (both are within
float8's error of bf16).

Order: quantize before compile_pipeline (compiled code and CUDA graphs are built for the weights they saw), before
or after parallelize (parallelize replaces attention processors, not linear weights). LoRA: load adapters after
quantizing; the base layer then runs in float8 and the adapter in bf16 beside it (PEFT's LoRA layer around a
torchao-quantized linear, TorchaoLoraLinear). fuse_lora then raises PEFT's error (it cannot re-quantize a merged
float8 weight); quantizing a model that already holds LoRA layers raises ours.

Memory: torchao's quantize_ walks the layers one at a time and replaces each bf16 weight by its float8 copy, which
should hold the bf16 model plus one layer's float8 copy. Not yet measured through fastusp: the earlier probe (every
linear, torchao directly) peaked at about twice the bf16 model (FLUX 45 GB against 22.5), so the bf16 weights may
live on until the end; benchmarks/step_latency.py --quant fp8 records quantize_peak_gb to check.
"""
from __future__ import annotations

import fnmatch
import logging

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

logger = logging.getLogger("fastusp")

MODES = ("fp8",)
GRANULARITIES = ("row", "tensor")
# Layers inside the blocks kept in bf16 by default: none yet. Which groups carry the error is for
# benchmarks/fp8_quality.py to measure on a GPU (docs/fp8.md); until it has, every block layer computes in float8.
DEFAULT_KEEP_BF16: tuple[str, ...] = ()
# The layer groups of the blocks of FLUX, FLUX.2 and Qwen-Image, as fnmatch patterns of module names: for keep_bf16,
# and for benchmarks/fp8_quality.py's per-group error.
LAYER_GROUPS: dict[str, tuple[str, ...]] = {
    "modulation": ("*.norm1.linear", "*.norm1_context.linear", "*single_transformer_blocks.*.norm.linear",
                   "*.img_mod.1", "*.txt_mod.1"),
    "qkv": ("*.attn.to_q", "*.attn.to_k", "*.attn.to_v", "*.attn.add_q_proj", "*.attn.add_k_proj",
            "*.attn.add_v_proj", "*.attn.to_qkv_mlp_proj"),
    "attn_out": ("*.attn.to_out.0", "*.attn.to_add_out", "*.attn.to_out"),
    "mlp_in": ("*.net.0.proj", "*.net.0.linear_in", "*.linear_in", "*.proj_mlp"),
    "mlp_out": ("*.net.2", "*.linear_out", "*single_transformer_blocks.*.proj_out"),
}


def quantize(obj, mode: str = "fp8", *, granularity: str = "row", keep_bf16=DEFAULT_KEEP_BF16):
    """Quantize a pipeline's (or a transformer's) linear layers for float8 GEMMs in place; returns `obj`.

    mode: "fp8" (float8_e4m3fn weights and activations, dynamic activation scales).
    granularity: "row" (a scale per weight row and per token, default) or "tensor" (one scale each).
    keep_bf16: fnmatch patterns of module names inside the blocks to keep in bf16, besides everything outside the
        blocks (see the module docstring); LAYER_GROUPS names groups of them.
    Needs torchao (pip install fastusp[fp8]) and a CUDA GPU of compute capability 8.9 or newer. Call it before
    fastusp.compile_pipeline; before or after fastusp.parallelize.
    """
    if mode not in MODES:
        raise ValueError(f"fastusp.quantize: mode={mode!r} is not supported; use one of {MODES}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"fastusp.quantize: granularity={granularity!r}; use 'row' (per-row scales) or 'tensor'")
    keep_bf16 = (keep_bf16,) if isinstance(keep_bf16, str) else tuple(keep_bf16)
    transformer = getattr(obj, "transformer", obj)
    config = _float8_config(granularity)
    _check_order(transformer)
    _check_device(transformer)
    names = fp8_layer_names(transformer, keep_bf16)
    if not names:
        raise ValueError(f"fastusp.quantize: no linear layer of {type(transformer).__name__} is left to quantize "
                         f"(keep_bf16={keep_bf16!r})")
    _check_ranks_agree(transformer, mode, granularity, keep_bf16)
    dtypes = {transformer.get_submodule(n).weight.dtype for n in names}
    if granularity == "row" and dtypes != {torch.bfloat16}:
        raise ValueError(f"fastusp.quantize: per-row float8 scales need bf16 weights, got {sorted(map(str, dtypes))}; "
                         f"load the pipeline with torch_dtype=torch.bfloat16 (or pipe.to(torch.bfloat16)) first")
    from torchao.quantization import quantize_

    selected = set(names)
    quantize_(transformer, config, filter_fn=lambda module, name: name in selected)
    transformer._fastusp_quantized = dict(mode=mode, granularity=granularity, layers=len(names))
    total = sum(1 for m in transformer.modules() if isinstance(m, torch.nn.Linear))
    logger.info("fastusp: %d of %d linear layers of %s compute in float8 (%s-wise scales); the rest stay %s",
                len(names), total, type(transformer).__name__, granularity, _dtype_of(transformer))
    return obj


def fp8_layer_names(transformer, keep_bf16=DEFAULT_KEEP_BF16) -> list[str]:
    """Names of the linear layers quantize() turns to float8: those inside the repeated blocks, widths multiples
    of 16, not matched by keep_bf16."""
    keep_bf16 = (keep_bf16,) if isinstance(keep_bf16, str) else tuple(keep_bf16)
    kinds = set(getattr(transformer, "_repeated_blocks", None) or [])
    if not kinds:
        raise ValueError(f"fastusp.quantize: {type(transformer).__name__} declares no repeated blocks "
                         f"(_repeated_blocks), so fastusp does not know which of its layers to quantize")
    blocks = [(name, m) for name, m in transformer.named_modules() if type(m).__name__ in kinds]
    names = []
    for block_name, block in blocks:
        for name, module in block.named_modules(prefix=block_name):
            if not isinstance(module, torch.nn.Linear) or any(fnmatch.fnmatchcase(name, p) for p in keep_bf16):
                continue
            if module.in_features % 16 or module.out_features % 16:
                continue
            names.append(name)
    return names


def is_quantized_weight(tensor) -> bool:
    """A weight held as a tensor subclass (torchao's Float8Tensor, diffusers' TorchAoConfig models)."""
    return isinstance(tensor, torch.Tensor) and is_traceable_wrapper_subclass(tensor)



def _float8_config(granularity: str):
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor
    except ImportError as e:
        raise ImportError("fastusp.quantize(..., 'fp8') uses torchao's float8 kernels: pip install fastusp[fp8] "
                          "(or pip install torchao)") from e
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if granularity == "row" else PerTensor())


def _check_order(transformer) -> None:
    if getattr(transformer, "_fastusp_compile_report", None) is not None:
        raise ValueError("call fastusp.quantize before fastusp.compile_pipeline, not after (compiled code and CUDA "
                         "graphs are built for the weights they saw)")
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()):
        raise ValueError("this transformer is already compiled (torch.compile / compile_repeated_blocks): call "
                         "fastusp.quantize first, then compile")
    peft = sorted({type(m).__name__ for m in transformer.modules() if hasattr(m, "base_layer")})
    if peft:
        raise ValueError(f"this transformer holds LoRA layers ({', '.join(peft)}): quantize first, then load the "
                         f"LoRA, or fuse it into the bf16 weights before quantizing (pipe.fuse_lora(); "
                         f"pipe.unload_lora_weights())")
    if getattr(transformer, "_fastusp_quantized", None) is not None or any(
            is_quantized_weight(m.weight) for m in transformer.modules() if isinstance(m, torch.nn.Linear)):
        raise ValueError(f"{type(transformer).__name__} already holds quantized weights (fastusp.quantize, or "
                         f"diffusers' TorchAoConfig / PipelineQuantizationConfig): nothing to do; parallelize and "
                         f"compile it as it is")


def _check_ranks_agree(transformer, mode: str, granularity: str, keep_bf16: tuple) -> None:
    """After parallelize, every rank must quantize alike (before it, parallelize compares what quantize did)."""
    if getattr(transformer, "_fastusp_config", None) is None:
        return
    from .agreement import Fingerprint, check_same_on_every_rank

    fingerprint = Fingerprint()
    for name, value in dict(mode=mode, granularity=granularity, keep_bf16=keep_bf16).items():
        fingerprint.add(name, value)
    check_same_on_every_rank(fingerprint, "the arguments of fastusp.quantize", "every rank must quantize its "
                             "parallelized transformer with the same arguments",
                             get_module_execution_device(transformer))


def _check_device(transformer) -> None:
    """torchao's float8 GEMM (torch._scaled_mm) runs on CUDA GPUs of compute capability 8.9+ (Ada, Hopper, ...)."""
    device = get_module_execution_device(transformer)  # an offloaded model's GPU, not the CPU it waits on
    if device.type != "cuda":
        raise ValueError(f"fastusp.quantize(..., 'fp8'): float8 GEMMs need a CUDA GPU of compute capability 8.9 or "
                         f"newer (Ada, Hopper, Blackwell), and {type(transformer).__name__} runs on {device}; move "
                         f"the pipeline to the GPU first (pipe.to('cuda')), then quantize")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"fastusp.quantize(..., 'fp8'): {torch.cuda.get_device_name(device)} is compute capability "
                         f"{major}.{minor}; float8 GEMMs need 8.9 or newer (Ada, Hopper, Blackwell)")


def _dtype_of(module) -> torch.dtype | None:
    first = next((p for p in module.parameters() if not is_quantized_weight(p)), None)
    return first.dtype if first is not None else None
