"""How a sequence is cut across ranks, the per-forward layout the attention needs to know, and the cut itself.

Every rank holds a contiguous chunk of the text tokens and a contiguous chunk of the image tokens. Chunk sizes
differ by at most one token when the world size does not divide a length: nothing is padded, so results are
unchanged. Inside attention each rank's tokens are ordered [text chunk, image chunk] (diffusers' own joint order),
so the keys seen by attention are, globally, the concatenation over ranks of those local pairs. Attention is
invariant to the order of keys, so this permutation needs no undoing; only a key mask must follow it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def split_sizes(length: int, parts: int) -> list[int]:
    """Near-even sizes of `parts` contiguous chunks of `length` items (the first `length % parts` get one more)."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class SeqLayout:
    """Token counts of every rank for one forward (identical on all ranks, since inputs are).

    text[g], image[g]: text and image tokens held by world rank g.
    key_bias: None, or an additive float mask [batch, total tokens] in the global key order
              (rank 0 text, rank 0 image, rank 1 text, ...): 0 for keys to attend, a large negative number for
              padded text tokens.
    text_bias: the same mask over the text keys alone [batch, text tokens] (rank 0 text, rank 1 text, ...), for
               attention that takes the unmasked image keys apart (ring attention).
    """

    text: tuple[int, ...]
    image: tuple[int, ...]
    key_bias: torch.Tensor | None = None
    text_bias: torch.Tensor | None = None

    @classmethod
    def even(cls, text_len: int, image_len: int, world: int) -> "SeqLayout":
        """Near-even chunks, unmasked; with_text_mask adds a mask's two biases together."""
        return cls(tuple(split_sizes(text_len, world)), tuple(split_sizes(image_len, world)))

    def with_text_mask(self, text_mask: torch.Tensor, dtype: torch.dtype) -> "SeqLayout":
        """This layout with the key biases of a [B, S_text] text mask (True/1 = keep)."""
        text_bias = text_bias_from_mask(text_mask, dtype)
        return SeqLayout(self.text, self.image, key_bias_from_text_bias(text_bias, self.text, self.image), text_bias)

    @property
    def tokens(self) -> tuple[int, ...]:
        """Joint tokens (text + image) per rank: the sequence each rank feeds to attention."""
        return tuple(t + i for t, i in zip(self.text, self.image))

    def text_slice(self, rank: int) -> slice:
        start = sum(self.text[:rank])
        return slice(start, start + self.text[rank])

    def image_slice(self, rank: int) -> slice:
        start = sum(self.image[:rank])
        return slice(start, start + self.image[rank])


def text_bias_from_mask(text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias [B, S_text] from a [B, S_text] mask (True/1 = keep).

    A large finite negative value (not -inf) keeps a block of keys that is entirely padding (a ring chunk's text
    keys) from producing NaN: its log-sum-exp is then hugely negative and its merge weight is exactly zero.
    """
    keep = text_mask.to(torch.bool)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min / 2)


def key_bias_from_text_bias(text_bias: torch.Tensor, layout_text: tuple[int, ...],
                            layout_image: tuple[int, ...]) -> torch.Tensor:
    """The text keys' bias [B, S_text] -> the bias of all keys [B, S_total] in the global key order (image keys 0)."""
    pieces, start = [], 0
    for t, i in zip(layout_text, layout_image):
        pieces.append(text_bias[:, start:start + t])
        pieces.append(text_bias.new_zeros(text_bias.shape[0], i))
        start += t
    return torch.cat(pieces, dim=1)


def narrow_tokens(value, index: slice, dim: int):
    """value (a tensor, a list or tuple of them, or None) narrowed to index along dim."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(narrow_tokens(v, index, dim) for v in value)
    return value.narrow(dim, index.start, index.stop - index.start)


def shard_inputs(inputs: dict, spec, ranks: int, rank: int) -> SeqLayout:
    """Cut a forward's bound inputs to this rank's tokens, in place, along the token axes a ModelSpec names; returns
    the layout (with the key bias of a text mask, which replaces the mask). ranks: the sequence group's size (the
    ranks that share this sequence). Used for the transformer and for its ControlNets."""
    layout = _layout_for(inputs, spec, ranks)
    if spec.text_mask in inputs:  # now carried by layout.key_bias; diffusers' own mask code is not needed
        inputs[spec.text_mask] = None
    for name, dim in spec.text_inputs.items():
        if name in inputs:
            inputs[name] = narrow_tokens(inputs[name], layout.text_slice(rank), dim)
    for name, dim in spec.image_inputs.items():
        if name in inputs:
            inputs[name] = narrow_tokens(inputs[name], layout.image_slice(rank), dim)
    for name, dim in spec.residual_inputs.items():
        if inputs.get(name) is not None:
            inputs[name] = [_shard_residual(r, layout, rank, dim) for r in inputs[name]]
    return layout


def _layout_for(inputs: dict, spec, ranks: int) -> SeqLayout:
    image_len = inputs["hidden_states"].shape[1]
    text = inputs.get("encoder_hidden_states")
    text_len = 0 if text is None else text.shape[1]
    if image_len < ranks:
        raise ValueError(f"{image_len} image tokens cannot be split over {ranks} ranks; use a larger image")
    layout = SeqLayout.even(text_len, image_len, ranks)
    mask = inputs.get(spec.text_mask) if spec.text_mask else None
    # A given mask is always applied, as the single-device model does. Checking for an all-ones mask here would
    # cost a host sync every step (and break CUDA graph capture); pipelines drop such masks themselves.
    if mask is not None:
        layout = layout.with_text_mask(mask, inputs["hidden_states"].dtype)
    return layout


def _shard_residual(residual: torch.Tensor, layout: SeqLayout, rank: int, dim: int) -> torch.Tensor:
    """A ControlNet residual: full length from a ControlNet that ran whole, this rank's rows from a sharded one."""
    length = residual.shape[dim]
    if length == sum(layout.image):
        return narrow_tokens(residual, layout.image_slice(rank), dim)
    if length == layout.image[rank]:
        return residual
    raise ValueError(f"a ControlNet residual has {length} image tokens; expected all {sum(layout.image)} or this "
                     f"rank's {layout.image[rank]}")
