"""FLUX.2 with fastusp sequence parallelism.

    torchrun --nproc-per-node 2 examples/flux2.py                                 # tiny random pipeline, CPU
    torchrun --nproc-per-node 4 examples/flux2.py --model black-forest-labs/FLUX.2-dev --compile \\
        --height 1024 --width 1024 --check --out flux2.png                       # real weights, one GPU per rank

Every rank holds the whole pipeline: FLUX.2-dev's transformer (32B parameters, 64 GB in bfloat16) and its Mistral
text encoder (24B, 48 GB) fit together on 141 GB cards (H200), not on 80 GB ones. There add --offload
(enable_model_cpu_offload): the two wait in CPU memory (112 GB per rank) and take turns on the GPU, so each call
moves them there once. See examples/_common.py (or --help) for every option.
"""
import _common

FLUX2 = _common.Example(
    name="flux2", pipeline_cls="Flux2Pipeline", tiny_builder="tiny_flux2_pipeline", default_steps=50,
    guidance_kwarg="guidance_scale", default_guidance=4.0,
)

if __name__ == "__main__":
    _common.main(FLUX2)
