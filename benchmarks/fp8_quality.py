"""How far float8 GEMMs move a transformer's output from bf16, and which layers carry the error.

The model is step_latency.py's: diffusers' FLUX / Qwen-Image transformer at full size with random bf16 weights,
rebuilt identically (seeded) for every variant, on the same inputs (1024², text 512 / 128). For each variant,
fastusp.quantize(model, "fp8", keep_bf16=...) and the relative L2 error ||out - ref|| / ||ref|| against bf16:
- one step: the transformer's output on the step inputs;
- 28 steps (--steps-28): the final latents of a 28-step Euler flow-matching loop from the same noise (sigma 1 -> 0,
  the velocity from the transformer), bf16 against the variant.
Variants: every block linear in float8 ("all"), fastusp's default filter ("default"), per-tensor scales, and one per
layer group of fastusp.quantization.LAYER_GROUPS kept in bf16 ("keep:<group>"); each record carries the share of the
blocks' linear weights that stays bf16. Eager (no compile): the error is the kernels', compile changes no math.

    python benchmarks/fp8_quality.py --model flux --model qwen --steps-28 all,default

Prints one JSON record per variant and appends them to $OUT/fp8-quality.jsonl when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from step_latency import DEFAULT_TXT, MODEL_NAMES, build_model, card_name, emit, make_inputs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def variants(only: list[str] | None) -> dict[str, dict]:
    from fastusp.quantization import DEFAULT_KEEP_BF16, LAYER_GROUPS

    found = {"all": dict(keep_bf16=()), "default": dict(keep_bf16=DEFAULT_KEEP_BF16),
             "tensor": dict(keep_bf16=DEFAULT_KEEP_BF16, granularity="tensor")}
    found.update({f"keep:{g}": dict(keep_bf16=patterns) for g, patterns in LAYER_GROUPS.items()})
    return {name: kw for name, kw in found.items() if only is None or name in only}


@torch.inference_mode()
def denoise(model, kw: dict, steps: int) -> torch.Tensor:
    """Final latents of `steps` Euler steps of the flow from kw's hidden_states (the noise) at sigma 1 to 0."""
    x = kw["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        timestep = torch.full_like(kw["timestep"], sigma)
        v = model(**dict(kw, hidden_states=x, timestep=timestep))[0]
        x = x + (next_sigma - sigma) * v
    return x


def bf16_weight_share(model, keep_bf16) -> float:
    """Of the blocks' linear weights, the share (by parameters) that stays bf16."""
    from fastusp.quantization import fp8_layer_names

    everything = fp8_layer_names(model, ())
    kept = set(everything) - set(fp8_layer_names(model, keep_bf16))
    size = lambda names: sum(model.get_submodule(n).weight.numel() for n in names)
    return size(kept) / size(everything)


def main(argv=None) -> int:
    import fastusp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", choices=sorted(MODEL_NAMES), help="repeatable; default flux")
    ap.add_argument("--only", default=None, help="comma-separated variants (default: all of them)")
    ap.add_argument("--steps-28", default="all,default", help="variants whose 28-step latents are compared")
    ap.add_argument("--steps", type=int, default=28)
    a = ap.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    only = a.only.split(",") if a.only else None
    long_runs = set(a.steps_28.split(",")) if a.steps_28 else set()
    for model_name in [MODEL_NAMES[m] for m in (a.model or ["flux"])]:
        kw = make_inputs(model_name, device, dtype, 1024, 1024, DEFAULT_TXT[model_name])
        model = build_model(model_name, device, dtype)
        with torch.inference_mode():
            ref = model(**kw)[0].float()
            ref_long = denoise(model, kw, a.steps).float() if long_runs else None
        del model
        for name, options in variants(only).items():
            torch.cuda.empty_cache()
            model = build_model(model_name, device, dtype)
            share = bf16_weight_share(model, options["keep_bf16"])
            bf16_gb = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fastusp.quantize(model, "fp8", **options)
            torch.cuda.synchronize()
            record = dict(check="fp8-quality", model=model_name, variant=name, res="1024x1024",
                          txt=DEFAULT_TXT[model_name], granularity=options.get("granularity", "row"),
                          keep_bf16=list(options["keep_bf16"]), bf16_weight_share=round(share, 4),
                          quantize_s=round(time.perf_counter() - t0, 2), bf16_mem_gb=round(bf16_gb, 2),
                          quantize_peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          fp8_mem_gb=round(torch.cuda.memory_allocated() / 2**30, 2))
            with torch.inference_mode():
                record["step_rel_err"] = round(rel_err(model(**kw)[0], ref), 5)
                if name in long_runs:
                    record[f"latents_{a.steps}_rel_err"] = round(rel_err(denoise(model, kw, a.steps), ref_long), 5)
            record.update(card=card_name(device), torch=torch.__version__, quant="fp8")
            emit(record, "fp8-quality.jsonl")
            del model
        del ref, ref_long
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
