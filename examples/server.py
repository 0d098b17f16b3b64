"""An HTTP image server over several processes: rank 0 takes the requests (FastAPI + uvicorn), the other ranks follow.

    pip install fastusp[server]
    torchrun --nproc-per-node 2 examples/server.py --port 8000                        # tiny random FLUX.1, CPU
    torchrun --nproc-per-node 4 examples/server.py --model black-forest-labs/FLUX.1-dev --port 8000
    curl -s localhost:8000/generate -H 'content-type: application/json' -o cat.png \\
        -d '{"prompt": "a cat holding a sign", "seed": 1, "steps": 28, "height": 1024, "width": 1024}'

Every rank loads the pipeline and calls fastusp.parallelize; rank 0 then serves inside fastusp.lead(pipe), so each
request's pipeline call runs on every rank (the others are in fastusp.follow(pipe)), one request at a time.

GET /health: 200 once every rank is ready (rank 0 starts serving only after all ranks joined).
POST /generate, JSON {"prompt": str, "seed": int, "steps": int, "height": int, "width": int, "guidance": float,
    "negative_prompt": str}, all but prompt optional -> 200 image/png.
    guidance: the pipeline's guidance_scale (FLUX) or true_cfg_scale (Qwen-Image); with a negative_prompt, FLUX.1
    runs true CFG at --true-cfg. Errors come back as JSON {"error": ...}: 422 for a malformed request (an unknown
    field, a wrong type, a size that is not a positive multiple of the model's patch <= --max-size), 400 for a
    request the pipeline or fastusp refuses (a ValueError raised on every rank), 500 for a failure inside the call;
    after any of them the ranks are in step and the server takes the next request.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import torch
from pydantic import BaseModel, ConfigDict

import _common


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="diffusers pipeline (directory or hub id), bfloat16 on cuda:LOCAL_RANK; "
                                    "default: the tiny random FLUX.1 pipeline on CPU (float32, gloo)")
    ap.add_argument("--ulysses", type=int, help="Ulysses degree (default: chosen from the processes and heads)")
    ap.add_argument("--ring", type=int, help="Ring degree (default: the rest)")
    ap.add_argument("--cfg", type=int, default=1, choices=[1, 2], help="cfg parallelism (true CFG pipelines)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-size", type=int, help="largest height / width served (default 2048; tiny: 256)")
    ap.add_argument("--true-cfg", type=float, default=4.0, help="FLUX.1's true_cfg_scale with a negative_prompt")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a collective waits for a rank that never joins it (parallelize's timeout)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error(f"launch with torchrun, e.g. torchrun --nproc-per-node 2 {sys.argv[0]} --port 8000")
    return args


def build(args):
    """-> (pipe, defaults): the pipeline on this rank's device, and what a request leaves out."""
    if args.model is None:
        from fastusp.testing import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(text_encoders=True)
        defaults = dict(steps=4, height=64, width=64, guidance=3.5, max_size=args.max_size or 256)
    else:
        import diffusers

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
        defaults = dict(steps=28, height=1024, width=1024, guidance=3.5 if _is_flux(pipe) else 4.0,
                        max_size=args.max_size or 2048)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(defaults, true_cfg=args.true_cfg)


def _is_flux(pipe) -> bool:
    return type(pipe).__name__.startswith("Flux")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # unknown fields and wrong types are errors
    prompt: str
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None


def size_error(pipe, request, defaults: dict) -> str | None:
    """Why the request's sizes and steps cannot be served, or None."""
    multiple = pipe.vae_scale_factor * 2  # the VAE's factor times the 2x2 latent patches
    for name in ("height", "width"):
        value = getattr(request, name)
        if value is not None and not (0 < value <= defaults["max_size"] and value % multiple == 0):
            return f"{name} must be a multiple of {multiple} from {multiple} to {defaults['max_size']}, got {value}"
    if request.steps is not None and not 1 <= request.steps <= 1000:
        return f"steps must be from 1 to 1000, got {request.steps}"
    return None


def call_kwargs(pipe, request, defaults: dict) -> dict:
    """The pipeline call that serves `request` (the same on every rank: rank 0 sends it to the others)."""
    guidance = defaults["guidance"] if request.guidance is None else request.guidance
    kwargs = dict(prompt=request.prompt, num_inference_steps=request.steps or defaults["steps"],
                  height=request.height or defaults["height"], width=request.width or defaults["width"],
                  generator=torch.Generator().manual_seed(request.seed), output_type="pil")
    kwargs["guidance_scale" if _is_flux(pipe) else "true_cfg_scale"] = guidance
    if request.negative_prompt is not None:
        kwargs["negative_prompt"] = request.negative_prompt
        if _is_flux(pipe) and "true_cfg_scale" not in kwargs:
            kwargs["true_cfg_scale"] = defaults["true_cfg"]
    return kwargs


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_app(pipe, defaults: dict, ranks: int):
    import inspect

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="fastusp image server")
    accepted = inspect.signature(pipe.__call__).parameters

    @app.get("/health")
    def health():
        return {"status": "ready", "ranks": ranks, "pipeline": type(pipe).__name__}

    @app.post("/generate")
    def generate(request: GenerateRequest):  # a plain def: FastAPI runs it in a worker thread, lead() queues calls
        error = size_error(pipe, request, defaults)
        if error is None and request.negative_prompt is not None and "negative_prompt" not in accepted:
            error = f"{type(pipe).__name__} takes no negative_prompt"
        if error is not None:
            return JSONResponse({"error": error}, status_code=422)
        try:
            image = pipe(**call_kwargs(pipe, request, defaults)).images[0]
        except ValueError as e:  # raised on every rank: the pipeline or fastusp refuses these arguments
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # noqa: BLE001 -- the ranks are in step again (fastusp.lead); report it
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return Response(png_bytes(image), media_type="image/png")

    return app


def main(argv=None) -> None:
    args = parse_args(argv)
    fastusp = _common._fastusp()
    import torch.distributed as dist

    pipe, defaults = build(args)
    fastusp.parallelize(pipe, ulysses=args.ulysses, ring=args.ring, cfg=args.cfg, timeout=args.timeout)
    if dist.get_rank() != 0:
        fastusp.follow(pipe)
    else:
        import uvicorn

        with fastusp.lead(pipe):
            print(f"serving {type(pipe).__name__} on http://{args.host}:{args.port} with {dist.get_world_size()} "
                  f"processes", flush=True)
            uvicorn.run(make_app(pipe, defaults, dist.get_world_size()), host=args.host, port=args.port,
                        log_level="warning")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
