"""FLUX.2 with fastusp sequence parallelism.

    torchrun --nproc-per-node 2 examples/flux2.py                                 # tiny random pipeline, CPU
    torchrun --nproc-per-node 4 examples/flux2.py --model black-forest-labs/FLUX.2-dev --compile \\
        --height 1024 --width 1024 --check --out flux2.png                       # real weights, one GPU per rank

FLUX.2-dev's transformer is 32B parameters (64 GB in bfloat16) and every rank holds all of it, so each GPU needs
room for the whole pipeline. See examples/_common.py (or --help) for every option.
"""
import _common

FLUX2 = _common.Example(
    name="flux2", pipeline_cls="Flux2Pipeline", tiny_builder="tiny_flux2_pipeline", default_steps=50,
    guidance_kwarg="guidance_scale", default_guidance=4.0,
)

if __name__ == "__main__":
    _common.main(FLUX2)
