"""FLUX with fastusp sequence parallelism.

    torchrun --nproc-per-node 2 examples/flux.py                                  # tiny random pipeline, CPU
    torchrun --nproc-per-node 4 examples/flux.py --model black-forest-labs/FLUX.1-dev --ulysses 2 --ring 2 \\
        --height 1024 --width 1024 --check --out flux.png                        # real weights, one GPU per rank

See examples/_common.py (or --help) for every option.
"""
import _common

FLUX = _common.Example(
    name="flux", pipeline_cls="FluxPipeline", tiny_builder="tiny_flux_pipeline", tiny_text=True,
    default_steps=28, guidance_kwarg="guidance_scale", default_guidance=3.5,
)

if __name__ == "__main__":
    _common.main(FLUX)
