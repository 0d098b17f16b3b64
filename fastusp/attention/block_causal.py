"""Qwen-Image 2.1's block-causal attention for the query rows one rank holds, against every key of the sequence.

The sequence is [text, condition image, text, ..., target image]: causal, except that each image block sees itself
whole, and the target image's rows see every key. diffusers' QwenImage21AttnProcessor computes it as one attention
call per prefix segment (keys up to the segment's end; text segments with a causal triangle) plus one for the
target rows. This is the same decomposition clipped to the rows [rows_start, rows_start + R): all rows under
Ulysses, one ring chunk's rows under Ring. Layout [B, H, S, D].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows_start: int,
                           segments: list[tuple[int, int, bool]], key_valid: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, R, D]: the global rows [rows_start, rows_start + R); k, v [B, H, S, D]: every key.
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
