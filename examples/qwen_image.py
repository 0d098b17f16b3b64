"""Qwen-Image with fastusp sequence parallelism.

    torchrun --nproc-per-node 4 examples/qwen_image.py --ulysses 2 --ring 2      # tiny random pipeline, CPU
    torchrun --nproc-per-node 4 examples/qwen_image.py --model Qwen/Qwen-Image --ulysses 4 \\
        --height 1328 --width 1328 --check --out qwen_image.png                  # real weights, one GPU per rank

It runs true classifier-free guidance (negative prompt " ", --guidance = true_cfg_scale 4.0), as the Qwen-Image
model card does; the tiny pipeline too, with its tiny random text encoder. See examples/_common.py (or --help)
for every option.
"""
import _common

QWEN_IMAGE = _common.Example(
    name="qwen_image", pipeline_cls="QwenImagePipeline", tiny_builder="tiny_qwen_pipeline", tiny_text=True,
    default_steps=50, guidance_kwarg="true_cfg_scale", default_guidance=4.0, real_kwargs=dict(negative_prompt=" "),
)

if __name__ == "__main__":
    _common.main(QWEN_IMAGE)
