"""What the agreement checks cost (fastusp/agreement.py), against a transformer step, on the same ranks.

    torchrun --nproc-per-node 2 benchmarks/call_check_cost.py                  # FLUX.1-dev's shapes, random weights
    torchrun --nproc-per-node 2 benchmarks/call_check_cost.py --tiny           # CPU smoke test

Measured, median over --iters on rank 0 (each rank's numbers are alike):
  pipeline-call check   the fingerprint of a FluxPipeline call's arguments (512-token prompt embeddings, pooled
                        embeddings, generator, sizes, steps, guidance) and its all_gather: once per image
  transformer check     the same for one bare-transformer forward's inputs (what parallelize(transformer) checks
                        before every step)
  step                  one parallelized transformer forward, eager (check_calls=False), synchronized
  step with check       the same forward with the per-call check on: the check's whole cost, including the host
                        waiting for the GPU at its all_gather (lost overlap), not just its own time
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastusp  # noqa: E402
from fastusp.agreement import check_call  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def _inputs(config: dict, tokens: int, text: int, device, dtype) -> dict:
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    return dict(hidden_states=rand(1, tokens, config["in_channels"]),
                encoder_hidden_states=rand(1, text, config["joint_attention_dim"]),
                pooled_projections=rand(1, config["pooled_projection_dim"]),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
                img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(text, 3, device=device))


def _median_ms(fn, iters: int, device) -> float:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny FLUX transformer on CPU (gloo)")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    from diffusers import FluxTransformer2DModel

    if args.tiny:
        from fastusp.testing import tiny_flux
        model, device, dtype = tiny_flux(), torch.device("cpu"), torch.float32
        config, tokens, text = dict(model.config), 20, 7
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), torch.bfloat16
        torch.cuda.set_device(device)
        with device:
            model = FluxTransformer2DModel(**FLUX_DEV).to(dtype).eval()
        config, tokens, text = FLUX_DEV, args.height * args.width // 256, 512
    fastusp.parallelize(model)  # with the per-forward check (a bare transformer)
    inputs = _inputs(config, tokens, text, device, dtype)
    pipeline_call = dict(prompt=None, prompt_embeds=inputs["encoder_hidden_states"],
                         pooled_prompt_embeds=inputs["pooled_projections"], height=args.height, width=args.width,
                         num_inference_steps=28, guidance_scale=3.5, num_images_per_prompt=1,
                         generator=torch.Generator().manual_seed(0), max_sequence_length=512)

    with torch.inference_mode():
        forward = lambda: model(**inputs, return_dict=False)
        for _ in range(3):
            forward()
        with_check = _median_ms(forward, args.iters, device)
        pipeline_check = _median_ms(lambda: check_call(pipeline_call, "a pipeline call", device), args.iters, device)
        transformer_check = _median_ms(lambda: check_call(inputs, "a forward", device), args.iters, device)
        model._fastusp_input_check.remove()  # the per-forward check off (parallelize(..., check_calls=False))
        step = _median_ms(forward, args.iters, device)
    if dist.get_rank() == 0:
        where = "tiny, CPU" if args.tiny else f"FLUX.1-dev shapes, {args.height}x{args.width}, bf16, " \
                                              f"{torch.cuda.get_device_name(device)}"
        print(f"{dist.get_world_size()} ranks ({where}), median of {args.iters}:")
        print(f"  step (eager, no check)        {step:9.3f} ms")
        print(f"  step with the per-call check  {with_check:9.3f} ms  ({(with_check / step - 1) * 100:+.2f}%)")
        print(f"  transformer check alone       {transformer_check * 1e3:9.1f} us  "
              f"({transformer_check / step * 100:.3f}% of a step)")
        print(f"  pipeline-call check alone     {pipeline_check * 1e3:9.1f} us  "
              f"({pipeline_check / step / 28 * 100:.4f}% of a 28-step image)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
