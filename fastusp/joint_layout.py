"""Qwen-Image 2.1 lays out its joint sequence on the host at every step: its RoPE table (`pos_embed`: `.tolist()`,
Python loops over every token, two uploads) and its token labels (`build_token_metadata`: `nonzero`, one more
upload). Both depend only on `img_mask` and `img_shapes`, which the pipeline passes unchanged at every step, so
they are built once per layout and reused.

The GPU waits for this host work at every step (about 2.6 ms of a 64 ms step on 2×H200): the forward reads the mask
on the host first, so nothing queued is left to run meanwhile."""
from __future__ import annotations

import torch

from ._forward import own_forward, set_own_forward, wrap_forward


def reuse_joint_layout(transformer, max_layouts: int = 4) -> None:
    """Memoize `transformer.pos_embed` and `transformer.build_token_metadata` per layout: `img_mask`'s first row (the
    forward reads only that row), compared by value on the host, with `img_shapes[0]` and the device. Up to
    `max_layouts` are kept, the oldest dropped first (true CFG alternates two masks). Callers only read the results
    (slices, narrows), so sharing them across steps is safe."""
    build_rope, build_labels = own_forward(transformer.pos_embed), transformer.build_token_metadata
    layouts: list[dict] = []  # {"mask": CPU tensor, "shapes": tuple, "device": str, "rope": ..., "labels": ...}
    step = {"layout": None}

    def find(mask: torch.Tensor, shapes, device) -> dict:
        key = dict(mask=mask.detach().cpu(), shapes=tuple(tuple(s) for s in shapes), device=str(device))
        for layout in layouts:
            # torch.equal compares the shapes too
            if (layout["shapes"], layout["device"]) == (key["shapes"], key["device"]) and \
                    torch.equal(layout["mask"], key["mask"]):
                return layout
        layouts.append(key)
        del layouts[:-max_layouts]
        return key

    def run(original, inputs):
        mask, shapes = inputs.get("img_mask"), inputs.get("img_shapes")
        step["layout"] = find(mask[0], shapes[0], mask.device) if mask is not None and shapes else None
        try:
            return original(**inputs, return_dict=False)[0]
        finally:
            step["layout"] = None

    def memoized(name, build):
        def call(*args, **kwargs):
            layout = step["layout"]
            if layout is None:
                return build(*args, **kwargs)
            if name not in layout:
                layout[name] = build(*args, **kwargs)
            return layout[name]
        return call

    set_own_forward(transformer.pos_embed, memoized("rope", build_rope))
    transformer.build_token_metadata = memoized("labels", build_labels)
    wrap_forward(transformer, run)
