"""CUDA float8 GEMMs (torchao) through fastusp: quantize, parallelize, compile and CUDA graphs, on one GPU.

Launched by tests/gpu/test_fp8_gpu.py as `torchrun --nproc-per-node 1 tests/gpu/fp8_worker.py` (compute capability
8.9+). FLUX and Qwen-Image at real widths, two layers each (parity_worker.build). Checks, each one JSON line:
- fastusp.quantize: every layer it names holds a float8 weight, the output moved from bf16 but within FP8_TOL;
- quantized then parallelized, and parallelized then quantized, compiled (Inductor + whole-forward CUDA graphs): the
  compiled output equals the eager float8 output (BF16_TOL), nothing fell back;
- a model loaded with diffusers' TorchAoConfig (float8 per row) from a saved checkpoint: parallelized and compiled,
  equal to its own eager output, nothing fell back;
- bf16, not parallelized, compile_pipeline: CUDA graphs on and nothing fell back (Qwen-Image's forward builds a CUDA
  tensor from a Python int when given a text mask, which capture refused before it was staged in pinned memory).
Exits non-zero if any check fails.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from parity_worker import BF16_TOL, build, inputs, rel_err  # noqa: E402  (puts the repository on sys.path)

import fastusp  # noqa: E402
from fastusp.quantization import fp8_layer_names, is_quantized_weight  # noqa: E402

FP8_TOL = 0.1  # two random layers, every block linear in float8: ~3e-2 expected


def emit(**record) -> bool:
    print(json.dumps(dict(**record, card=torch.cuda.get_device_name())), flush=True)
    return record["ok"]


def run(model, x, compiled: bool) -> tuple[torch.Tensor, object]:
    with torch.no_grad():
        if compiled:
            fastusp.compile_pipeline(model)
            model(**x, return_dict=False)  # compiles and captures
        out = model(**x, return_dict=False)[0].float()
    return out, fastusp.compile_report(model)


def compiled_check(name, model, x, eager, **record) -> bool:
    out, report = run(model, x, compiled=True)
    err = rel_err(out, eager)
    ok = err < BF16_TOL and not report.fell_back and report.cuda_graphs
    torch._dynamo.reset()
    return emit(check="fp8 compiled", model=name, **record, rel_err=round(err, 5), ok=ok, compile=report.summary())


def torchao_config_model(name: str, device):
    """The two-layer model saved and loaded again with diffusers' TorchAoConfig (float8 weights and activations,
    per-row scales), as a user loads a checkpoint."""
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, TorchAoConfig
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    cls = FluxTransformer2DModel if name == "flux" else QwenImageTransformer2DModel
    with tempfile.TemporaryDirectory() as folder:
        build(name, device).save_pretrained(folder)
        config = TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        model = cls.from_pretrained(folder, quantization_config=config, torch_dtype=torch.bfloat16)
    return model.to(device).eval()


def main() -> int:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    ok = True
    for name, shape in (("flux", dict(batch=1, image_hw=(32, 32), text_len=64)),
                        ("qwen", dict(batch=1, image_hw=(32, 32), text_len=64))):
        x = inputs(name, device, **shape)
        with torch.no_grad():
            ref = build(name, device)(**x, return_dict=False)[0].float()

        model = fastusp.quantize(build(name, device), "fp8")
        names = fp8_layer_names(model, ())
        quantized = all(is_quantized_weight(model.get_submodule(n).weight) for n in names)
        eager, _ = run(model, x, compiled=False)
        err = rel_err(eager, ref)
        ok &= emit(check="fp8 eager vs bf16", model=name, layers=len(names), rel_err=round(err, 5),
                   ok=quantized and 1e-3 < err < FP8_TOL)
        ok &= compiled_check(name, fastusp.parallelize(model, ulysses=1), x, eager, order="quantize, parallelize")
        del model

        model = fastusp.quantize(fastusp.parallelize(build(name, device), ulysses=1), "fp8")
        ok &= compiled_check(name, model, x, eager, order="parallelize, quantize")
        del model

        model = torchao_config_model(name, device)
        loaded, _ = run(model, x, compiled=False)
        ok &= emit(check="TorchAoConfig eager vs bf16", model=name, rel_err=round(rel_err(loaded, ref), 5),
                   ok=rel_err(loaded, ref) < FP8_TOL)
        ok &= compiled_check(name, fastusp.parallelize(model, ulysses=1), x, loaded, order="TorchAoConfig, parallelize")
        del model

        ok &= compiled_check(name, build(name, device), x, ref, order="bf16, not parallelized")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
