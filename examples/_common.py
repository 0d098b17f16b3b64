"""What examples/flux.py, flux2.py and qwen_image.py share: command line, pipeline set-up, reference run, timing.

Every rank holds the whole pipeline; fastusp.parallelize() splits each transformer call's token sequence over
the ranks. The flow on every rank:
  1. check the degrees against the number of processes and the model's heads (before anything runs), build the
     pipeline: real weights (--model PATH, bfloat16, cuda:LOCAL_RANK, NCCL) or the tiny random one from
     fastusp.testing (CPU, float32, gloo; the tiny FLUX.1 and Qwen-Image pipelines have tiny random text encoders,
     so --prompt works)
  2. tiny mode or --check: run it once un-parallelized, as the single-process reference
  3. fastusp.parallelize(pipe, ulysses=, ring=, cfg=, fp8_comm=) (+ fastusp.compile_pipeline(pipe) with --compile)
  4. --warmup runs, then one timed run with generator=torch.Generator().manual_seed(--seed)
  5. rank 0 prints the per-step latency and the max abs difference to the reference (worst over ranks), saves --out
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Example:
    name: str                  # "flux" | "qwen_image": default --out
    pipeline_cls: str          # diffusers class for --model
    tiny_builder: str          # function in fastusp.testing
    default_steps: int         # with real weights
    guidance_kwarg: str        # what --guidance sets
    default_guidance: float
    real_kwargs: dict = field(default_factory=dict)  # extra pipeline kwargs with real weights (and tiny_text)
    tiny_text: bool = False    # the tiny pipeline has text encoders (text_encoders=True): it takes --prompt


DEFAULT_PROMPT = "A cat holding a sign that says hello world, photorealistic, 35mm"
TINY_SIZE, TINY_STEPS = 64, 4


def parse_args(example: Example, argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=f"{example.pipeline_cls} with fastusp (Ulysses x Ring sequence parallelism). Launch with "
                    f"torchrun --nproc-per-node N; without --model a tiny random pipeline runs on CPU.")
    ap.add_argument("--model", help="diffusers checkpoint (directory or hub id) for real weights, bfloat16 on "
                                    "cuda:LOCAL_RANK; default: the tiny random pipeline on CPU (float32, gloo)")
    ap.add_argument("--cfg", type=int, default=1, choices=[1, 2],
                    help="2: the two guidance passes of true CFG on two halves of the processes (default 1)")
    ap.add_argument("--ulysses", type=int, help="Ulysses degree (default: with --ring, nproc / cfg / ring; without, "
                                                "the largest degree dividing the heads and nproc / cfg)")
    ap.add_argument("--ring", type=int, help="Ring degree (default: nproc / cfg / ulysses)")
    ap.add_argument("--steps", type=int, help=f"inference steps (default: {example.default_steps}; tiny: {TINY_STEPS})")
    ap.add_argument("--height", type=int, help=f"image height (default: the pipeline's; tiny: {TINY_SIZE})")
    ap.add_argument("--width", type=int, help=f"image width (default: the pipeline's; tiny: {TINY_SIZE})")
    only = "" if example.tiny_text else "real weights only; "
    ap.add_argument("--prompt", help=f"text prompt ({only}default {DEFAULT_PROMPT!r})")
    ap.add_argument("--guidance", type=float,
                    help=f"{example.guidance_kwarg} ({only}default {example.default_guidance})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp8-comm", nargs="?", const="qkv", default=False, choices=["qkv", "all"],
                    help="parallelize's fp8_comm: quantize communication to float8: q/k/v and ring k/v (bare flag "
                         "or 'qkv'), or also the attention output ('all')")
    ap.add_argument("--offload", action="store_true",
                    help="pipe.enable_model_cpu_offload on each rank's device instead of moving the pipeline there: "
                         "the models wait in CPU memory and take turns on the GPU (FLUX.2-dev on 80 GB cards)")
    ap.add_argument("--first-block-cache", type=float, default=None, metavar="THRESHOLD",
                    help="diffusers' First Block Cache on the transformer (e.g. 0.12): steps whose first block changed "
                         "less than this reuse the rest of the last full step")
    ap.add_argument("--compile", action="store_true", help="fastusp.compile_pipeline(pipe) after parallelize")
    ap.add_argument("--check", action="store_true",
                    help="with --model: also run the un-parallelized pipeline first and report the difference "
                         "(always on in tiny mode)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed parallel runs before the timed one (default: 1 with real weights or --compile, "
                         "else 0)")
    ap.add_argument("--out", default=f"out/{example.name}_usp.png", help="PNG written by rank 0")
    args = ap.parse_args(argv)

    if "RANK" not in os.environ:
        ap.error(f"launch with torchrun, e.g. torchrun --nproc-per-node 2 {sys.argv[0]}")
    args.tiny = args.model is None
    _check_degrees(ap, example, args)
    if args.tiny and not example.tiny_text and (args.prompt is not None or args.guidance is not None) \
            and os.environ["RANK"] == "0":
        print("note: --prompt / --guidance only apply with --model; the tiny pipeline uses random prompt embeddings",
              file=sys.stderr)
    if args.warmup is None:
        args.warmup = 1 if (args.compile or not args.tiny) else 0
    return args


def _check_degrees(ap, example: Example, args) -> None:
    """The degrees fastusp.parallelize will use, checked against the processes and the model's heads now, before
    a pipeline is loaded and the reference runs (with --check and real weights, a whole one-GPU generation)."""
    fastusp = _fastusp()
    if args.tiny:
        heads = fastusp.testing.HEADS
    else:
        import diffusers

        heads = diffusers.FluxTransformer2DModel.load_config(args.model, subfolder="transformer")["num_attention_heads"]
    try:
        args.ulysses, args.ring = fastusp.config.fill_degrees(args.ulysses, args.ring, args.cfg, heads)
        config = fastusp.ParallelConfig(ulysses=args.ulysses, ring=args.ring, cfg=args.cfg, fp8_comm=args.fp8_comm)
        config.validate_world(int(os.environ.get("WORLD_SIZE", "1")))
        config.validate_heads(heads)
    except ValueError as e:
        ap.error(str(e))


def _fastusp():
    try:
        import fastusp
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO))
        import fastusp
    import fastusp.config
    import fastusp.testing
    return fastusp


# --- set-up --------------------------------------------------------------------------------------------------------

def build(example: Example, args):
    """-> (pipe, device, call kwargs without generator / steps / size)."""
    if args.tiny:
        testing = _fastusp().testing
        builder = getattr(testing, example.tiny_builder)
        pipe = builder(text_encoders=True) if example.tiny_text else builder()
        args.height, args.width = args.height or TINY_SIZE, args.width or TINY_SIZE
        args.steps = args.steps or TINY_STEPS
        if args.offload:
            pipe.enable_model_cpu_offload(device="cpu")  # the same hooks as on a GPU
        if not example.tiny_text:
            return pipe, torch.device("cpu"), testing.tiny_call_kwargs(pipe)
        return pipe, torch.device("cpu"), dict(_prompt_kwargs(example, args), **example.real_kwargs)

    import diffusers

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    pipe = getattr(diffusers, example.pipeline_cls).from_pretrained(args.model, torch_dtype=torch.bfloat16)
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    args.steps = args.steps or example.default_steps
    return pipe, device, dict(_prompt_kwargs(example, args), **example.real_kwargs)


def _prompt_kwargs(example: Example, args) -> dict:
    guidance = example.default_guidance if args.guidance is None else args.guidance
    return dict(prompt=args.prompt or DEFAULT_PROMPT, **{example.guidance_kwarg: guidance})


class StepTimer:
    """Per-step wall time: from the first transformer call of a pipeline run to each callback_on_step_end."""

    def __init__(self, pipe, device):
        self.device, self.marks, self.latents = device, [], None
        self._hook = pipe.transformer.register_forward_pre_hook(self._on_transformer)

    def detach(self):
        self._hook.remove()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _on_transformer(self, module, args):
        if not self.marks:
            self.marks.append(self._now())

    def callback(self, pipe, step, timestep, kwargs):
        self.marks.append(self._now())
        self.latents = kwargs["latents"]
        return {}

    def reset(self):
        self.marks, self.latents = [], None

    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def generate(pipe, args, call_kwargs, timer: StepTimer):
    timer.reset()
    image = pipe(**call_kwargs, height=args.height, width=args.width, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(args.seed), output_type="pt",
                 callback_on_step_end=timer.callback).images
    return image.float(), timer.latents.float()


def _max_over_ranks(value: float, device) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    # gloo's worker thread frees a finished collective a moment after wait() returns. If this tensor's Python object
    # is gone by then, that free takes the GIL; at interpreter exit (this is the script's last collective) the thread
    # is killed inside a C++ destructor and the process aborts: "terminate called without an active exception", 3 of
    # 225 runs of the tiny demo. So keep the tensor until the worker has let go of it (NCCL's works live longer).
    deadline = time.monotonic() + 1.0
    while device.type == "cpu" and t._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.0005)
    return t.item()


# --- main ----------------------------------------------------------------------------------------------------------

def main(example: Example, argv=None) -> None:
    args = parse_args(example, argv)
    fastusp = _fastusp()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    pipe, device, call_kwargs = build(example, args)
    if args.first_block_cache is not None:  # on the reference run too, so that both skip the same steps
        from diffusers.hooks import FirstBlockCacheConfig
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=args.first_block_cache))
    timer = StepTimer(pipe, device)

    reference = None
    if args.tiny or args.check:
        if rank != 0:
            pipe.set_progress_bar_config(disable=True)
        reference = generate(pipe, args, call_kwargs, timer)
        ref_ms = timer.step_ms()

    fp8 = args.fp8_comm
    fastusp.parallelize(pipe, ulysses=args.ulysses, ring=args.ring, cfg=args.cfg, fp8_comm=fp8)
    if args.compile:
        timer.detach()  # hook the module that is actually called (compile_pipeline may swap it)
        pipe = fastusp.compile_pipeline(pipe) or pipe
        timer = StepTimer(pipe, device)
    for _ in range(args.warmup):
        generate(pipe, args, call_kwargs, timer)
    image, latents = generate(pipe, args, call_kwargs, timer)
    step_ms = timer.step_ms()

    diffs = None
    if reference is not None:
        diffs = [_max_over_ranks((a - b).abs().max().item(), device) for a, b in zip((image, latents), reference)]

    if rank == 0:
        mode = (f"{args.model} (bfloat16, {device.type})" if not args.tiny else "tiny random pipeline (float32, cpu)")
        print(f"\n{example.pipeline_cls}: {mode}, {args.width}x{args.height}, {args.steps} steps, world "
              f"{dist.get_world_size()} = cfg {args.cfg} x ulysses {args.ulysses} x ring {args.ring}, fp8_comm={fp8}, "
              f"compile={args.compile}, first_block_cache={args.first_block_cache}")
        print("per-step latency (ms): " + " ".join(f"{t:.1f}" for t in step_ms))
        rest = step_ms[1:] or step_ms
        print(f"  mean {sum(step_ms) / len(step_ms):.1f} ms; excluding step 0: {sum(rest) / len(rest):.1f} ms")
        if reference is not None:
            print("single-process reference per-step latency (ms): " + " ".join(f"{t:.1f}" for t in ref_ms))
            print(f"max abs diff vs single-process reference (worst rank): image {diffs[0]:.3g}, "
                  f"final latents {diffs[1]:.3g}")
        _save_png(image[0], args.out)
        print(f"saved {args.out}")
    dist.destroy_process_group()


def _save_png(image: torch.Tensor, path: str) -> None:
    """image: (3, H, W) in [0, 1]."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
