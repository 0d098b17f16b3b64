"""Qwen-Image 2.1 (QwenImage21Transformer2DModel): its spec, and everything only it needs.

Its forward builds one joint sequence itself ([text, condition image, text, ..., target image]) from whole inputs,
so fastusp shards it at the first block instead of cutting the forward's inputs (`shard_joint_sequence`). Its
attention processor computes diffusers' QwenImage21AttnProcessor math, the attention over the whole joint sequence
from this rank's rows: q, k and v go from sequence to head sharding and back as for the other models (usp_attention,
with this model's attention in place of fastusp's); under Ring the keys and values of the other ring chunks are
all-gathered (one collective, not the pipelined ring: the block-causal mask differs row by row). Each rank then holds
its heads' keys for the whole sequence and attends with its rows' queries (`block_causal_attention`).

The prefix KV cache (Qwen-Image 2.1's pipeline fills it on the first step, "extract", and reads it on the later
ones, "cached") holds this rank's heads of the prefix keys and values, [B, heads / ulysses, prefix, D]: a cache
filled by a parallelized transformer serves only that transformer, with the same settings.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._forward import (hook_forward, own_forward, patch_attribute, pre_forward_hook, set_own_forward,
                        wrap_forward)
from ..attention.usp import ring_chunk_lens, usp_attention
from ..cuda_graphs import GraphedForward, graphed_or_eager
from ..distributed.gather import gather_seq
from ..processors.context import USPContext, USPProcessor, cached_call_signature
from ..sharding import SeqLayout, narrow_tokens
from .qwen_image import real_rope
from .spec import ModelSpec


@cached_call_signature
class FastUSPQwenImage21AttnProcessor(USPProcessor):
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        layer_cache=None,
        kv_cache_mode: str | None = None,
        cache_write_slice: slice | None = None,
        segments: list[tuple[int, int, bool]] | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if segments is None and kv_cache_mode != "cached":
            raise ValueError("FastUSPQwenImage21AttnProcessor needs the prefix segments that diffusers' forward "
                             "passes to its QwenImage21AttnProcessor")
        head_dim = attn.inner_dim // attn.heads
        query = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        query = attn.norm_q(query).to(value.dtype)
        key = attn.norm_k(key).to(value.dtype)
        if rotary_emb is not None:  # diffusers' apply_rotary_emb_qwen(x, rotary_emb, use_real=False), in real form
            query, key = real_rope(query, rotary_emb), real_rope(key, rotary_emb)

        layout, config = self.context.current_layout(), self.context.config
        chunk_lens = ring_chunk_lens(layout.tokens, config)

        def attend(q, kv):
            """This ring chunk's rows' queries [B, h, R, D] against every key of the sequence."""
            if config.ring > 1:  # the other chunks' keys and values, in sequence order
                kv = gather_seq(kv.contiguous(), chunk_lens, config.ring_group, dim=0)
            k, v = kv.permute(1, 2, 3, 0, 4).unbind(0)
            if kv_cache_mode == "cached":  # the target image's rows: every key, the cached prefix's first
                # a dict under compile_pipeline's CUDA graphs: the cache's tensors copied into the graph's inputs
                cached_k, cached_v = (layer_cache["k"], layer_cache["v"]) if isinstance(layer_cache, dict) \
                    else layer_cache.get()
                k, v = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            if kv_cache_mode == "extract" and layer_cache is not None and cache_write_slice is not None:
                layer_cache.store(k[:, :, cache_write_slice].clone(), v[:, :, cache_write_slice].clone())
            return block_causal_attention(q, k, v, sum(chunk_lens[:config.ring_rank]), segments, key_valid)

        # one head chunk: the cache holds a layer's heads in one tensor
        out = usp_attention(query, key, value, layout, config, attend).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows_start: int,
                           segments: list[tuple[int, int, bool]], key_valid: torch.Tensor | None) -> torch.Tensor:
    """The block-causal attention of the query rows one rank holds, against every key of the sequence.

    The sequence is [text, condition image, text, ..., target image]: causal, except that each image block sees
    itself whole, and the target image's rows see every key. diffusers' QwenImage21AttnProcessor computes it as one
    attention call per prefix segment (keys up to the segment's end; text segments with a causal triangle) plus one
    for the target rows. This is the same decomposition clipped to the rows [rows_start, rows_start + R): all rows
    under Ulysses, one ring chunk's rows under Ring.
    q [B, H, R, D]: the global rows [rows_start, rows_start + R); k, v [B, H, S, D]: every key.
    segments: diffusers' (start, end, is_text) runs of the prefix (text and condition images), in global positions;
    the rows after the last one are the target image's. key_valid: None or bool [B, S] (False: a padded prompt
    token, never attended to). Returns [B, H, R, D]."""
    rows_stop = rows_start + q.shape[2]
    prefix_len = segments[-1][1] if segments else 0
    outputs = []
    for start, end, is_text in [*segments, (prefix_len, k.shape[2], False)]:
        lo, hi = max(start, rows_start), min(end, rows_stop)
        if lo >= hi:
            continue
        mask = None
        if is_text:  # row p sees the keys [0, p]
            positions = torch.arange(end, device=q.device)
            mask = (positions[None, :] <= torch.arange(lo, hi, device=q.device)[:, None])[None, None]
        if key_valid is not None:
            valid = key_valid[:, None, None, :end]
            mask = valid if mask is None else mask & valid
        rows = slice(lo - rows_start, hi - rows_start)
        outputs.append(F.scaled_dot_product_attention(q[:, :, rows], k[:, :, :end], v[:, :, :end], attn_mask=mask))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def shard_joint_sequence(transformer, context: USPContext) -> None:
    """The joint sequence is built inside the forward (text and condition-image tokens interleaved, the target
    image's last; with a KV cache after the first step, the target image's alone). The first block gets this rank's
    rows of it, every block this rank's rows of the per-token inputs (RoPE, which tokens modulate as the target), and
    the last block's output is gathered: the forward's tail (norm_out, proj_out) runs on the whole sequence, as on
    one device. The segments and key mask that the processors read stay global."""
    config, blocks = context.config, transformer.transformer_blocks
    ranks, rank = config.sequence_size, config.sequence_rank

    def enter(block, args, kwargs):
        if block is blocks[0]:
            hidden = kwargs["hidden_states"]
            if hidden.shape[1] < ranks:
                raise ValueError(f"{hidden.shape[1]} tokens cannot be split over {ranks} ranks; use a larger image")
            context.layout = SeqLayout.even(0, hidden.shape[1], ranks)
            kwargs["hidden_states"] = narrow_tokens(hidden, context.layout.image_slice(rank), 1)
        rows = context.current_layout().image_slice(rank)
        for name in ("rotary_emb", "target_token_mask"):
            kwargs[name] = narrow_tokens(kwargs.get(name), rows, 0)
        return args, kwargs

    def leave(forward, *args, **kwargs):
        output = forward(*args, **kwargs)
        return gather_seq(output, list(context.current_layout().image), config.sequence_group, dim=1)

    for block in blocks:
        pre_forward_hook(block, enter)
    hook_forward(blocks[-1], leave)

    def run_sharded(original, inputs):
        if getattr(transformer, "_cache_config", None) is not None:
            raise NotImplementedError(f"diffusers' caches are not supported on a parallelized "
                                      f"{type(transformer).__name__}")
        try:
            return original(**inputs, return_dict=False)[0]
        finally:
            context.layout = None

    wrap_forward(transformer, run_sharded)
    reuse_joint_layout(transformer)


def reuse_joint_layout(transformer, max_layouts: int = 4) -> None:
    """Build the joint sequence's host-side layout once per layout, not at every step.

    The forward lays it out on the host at every step: its RoPE table (`pos_embed`: `.tolist()`, Python loops over
    every token, two uploads) and its token labels (`build_token_metadata`: `nonzero`, one more upload), and the GPU
    waits for that host work, since the forward reads the mask on the host first. Both depend only on `img_mask` and
    `img_shapes`, which the pipeline passes unchanged at every step. So they are memoized per layout: `img_mask`'s
    first row (the forward reads only that row), compared by value on the host, with `img_shapes[0]` and the
    device. Up to `max_layouts` are kept, the oldest dropped first (true CFG alternates two masks). Callers only
    read the results (slices, narrows), so sharing them across steps is safe."""
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
    patch_attribute(transformer, "build_token_metadata", memoized("labels", build_labels))
    wrap_forward(transformer, run)


def block_stack_cuda_graphs(transformer, report) -> None:
    """compile_pipeline's CUDA graphs: all the blocks together, one graph per input signature. The forward reads
    tensors on the host before its blocks (it lays out RoPE and the block-causal segments with .tolist()), so it
    cannot be captured whole. Its head runs eagerly; the first block's call runs every block (replays the graph) and
    the other blocks' calls pass its output on.

    A step's KV cache is new with every pipeline call: a cached step gets every layer's cached keys and values as
    graph inputs, copied in at each replay. The cache's first step ("extract") stores new tensors into it and runs
    eagerly. The sequence layout is part of the key: a rank's row count alone does not fix the other ranks'."""
    report.graphs_of = "all-blocks"
    blocks = list(transformer.transformer_blocks)
    forwards = [own_forward(block) for block in blocks]
    context = getattr(transformer, "_fastusp_context", None)

    def run_blocks(hidden_states, layer_caches, layout_tokens, **shared):
        for forward, layer_cache in zip(forwards, layer_caches):
            hidden_states = forward(hidden_states=hidden_states, layer_cache=layer_cache, **shared)
        return hidden_states

    graphed = graphed_or_eager(GraphedForward(run_blocks, transformer), report, "cuda graphs")
    step = {"kv_cache": None, "ran": False}

    def first_block(hidden_states, layer_cache=None, **shared):
        kv_cache = step["kv_cache"]
        caches = [kv_cache.get_layer(i) for i in range(len(blocks))] if kv_cache is not None else [None] * len(blocks)
        layout = context.current_layout().tokens if context is not None else None
        inputs = dict(hidden_states=hidden_states, layout_tokens=layout, **shared)
        step["ran"] = True
        if shared.get("kv_cache_mode") == "extract":  # stores new tensors into the cache
            return run_blocks(layer_caches=caches, **inputs)
        if kv_cache is not None:
            caches = [dict(zip(("k", "v"), cache.get())) for cache in caches]
        inputs["layer_caches"] = caches
        return graphed(inputs, lambda: run_blocks(**inputs))

    def later_block(forward):
        @functools.wraps(forward)
        def call(hidden_states, **kwargs):
            return hidden_states if step["ran"] else forward(hidden_states=hidden_states, **kwargs)
        return call

    set_own_forward(blocks[0], functools.wraps(forwards[0])(first_block))
    for block, forward in zip(blocks[1:], forwards[1:]):
        set_own_forward(block, later_block(forward))

    def run(original, inputs):
        step.update(kv_cache=inputs.get("kv_cache"), ran=False)
        try:
            return original(**inputs, return_dict=False)[0]
        finally:
            step.update(kv_cache=None, ran=False)

    wrap_forward(transformer, run)


def output_tokens(inputs: dict) -> int:
    """The forward returns its whole joint sequence: every slot of img_mask (prompt tokens, and a slot per 2x2 latent
    tokens of each image) with the image slots expanded four-fold; after the KV cache's first step, the target
    image's tokens alone."""
    if inputs.get("kv_cache_mode") == "cached":
        return math.prod(inputs["img_shapes"][0][-1])
    img_mask = inputs["img_mask"]
    return img_mask.shape[1] + 3 * int(img_mask[0].sum())


SPEC = ModelSpec(
    {"QwenImage21AttnProcessor": FastUSPQwenImage21AttnProcessor,
     "QwenImage21FlexAttnProcessor": FastUSPQwenImage21AttnProcessor},
    no_text_mask="builds inside its forward, with the joint sequence",
    output_tokens=output_tokens,
    ring_op=False,
    shard_sequence=shard_joint_sequence,
    cuda_graphs=block_stack_cuda_graphs,
)
