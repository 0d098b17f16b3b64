"""Convolutions on a band of rows that give exactly the rows the whole-image convolution gives there.

A convolution of kernel k, stride s and zero padding (top, bottom) over the whole image computes output row o from
input rows [o*s - top, o*s - top + k). A rank whose output band is [a, b) (its input band [a*s, b*s), see
bands.py) needs input rows [a*s - top, (b-1)*s - top + k): its band plus halo rows of its neighbours, zeros beyond
the image. Width padding is the convolution's own.

The common case, stride 1 with "same" padding p, avoids copying the band to join the halos: the convolution runs on
the band with its own zero padding, which is right everywhere but in the p rows at each inner edge; those are
computed again from the halo rows and the band's first (last) 2p rows, and replace them. Other convolutions (the
encoder's stride-2 downsamplers, bands thinner than 2p rows) join band and halos and convolve without row padding.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .bands import RowBands, fetch_many, fetch_rows


def halo_rows(bands: RowBands, x: torch.Tensor, kernel: int, stride: int, pad_rows: tuple[int, int]):
    """The rows every rank needs for its output band: [(lo, hi)] in rank order. Checks that the whole-image output
    has the band arithmetic's height (height / stride), so no rank computes a row the whole image does not have."""
    top, bottom = pad_rows
    spans = bands.spans(bands.scale_of(x.shape[-2]))
    height = spans[-1][1]
    if any(a % stride for a, _ in spans) or (height + top + bottom - kernel) // stride + 1 != height // stride:
        raise RuntimeError(f"a convolution of kernel {kernel}, stride {stride}, row padding {pad_rows} on {height} "
                           f"rows split as {[b - a for a, b in spans]} does not keep the bands aligned")
    return [(a - top, b - stride - top + kernel) for a, b in spans]


def conv2d_on_band(conv: torch.nn.Conv2d, x: torch.Tensor, bands: RowBands, pad_rows: tuple[int, int]):
    """nn.Conv2d on this rank's rows (x: [B, C, rows, W]) with the whole image's row padding `pad_rows`."""
    def convolve(rows, pad: int):
        return F.conv2d(rows, conv.weight, conv.bias, conv.stride, (pad, conv.padding[1]), conv.dilation, conv.groups)

    return _on_band(x, bands, conv.kernel_size[0], conv.stride[0], pad_rows, lambda rows, cache, pad:
                    convolve(rows, pad))


def causal_conv3d_on_band(conv, original, x: torch.Tensor, cache_x, bands: RowBands):
    """Qwen-Image's QwenImageCausalConv3d (x: [B, C, T, rows, W]) on this rank's rows. `original` is its forward:
    it joins the cached frames (this rank's rows of them, given the same halos) and pads time and width; where the
    halos take the place of its row padding, that is switched off while it runs."""
    def convolve(rows, cache_rows, pad: int):
        if pad:
            return original(rows, cache_rows)
        with _no_row_padding(conv):
            return original(rows, cache_rows)

    if cache_x is not None:
        cache_x = cache_x.to(x.device)
    pad_rows = (conv._padding[2], conv._padding[3])
    return _on_band(x, bands, conv.kernel_size[1], conv.stride[1], pad_rows, convolve, cache_x)


def _on_band(x, bands: RowBands, kernel: int, stride: int, pad_rows: tuple[int, int], convolve, cache=None):
    """convolve(rows, cache rows, row padding) over this rank's output band; `cache` (Qwen-Image's cached frames,
    this rank's rows of them) gets the same halos as x."""
    wanted = halo_rows(bands, x, kernel, stride, pad_rows)
    pad = pad_rows[0]
    if not (stride == 1 and pad_rows == (pad, pad) and kernel == 2 * pad + 1 and x.shape[-2] >= 2 * pad):
        return convolve(*(fetch_rows(t, bands, wanted) if t is not None else None for t in (x, cache)), 0)
    spans = bands.spans(bands.scale_of(x.shape[-2]))
    (a, b), height = spans[bands.rank], spans[-1][1]
    above = [(lo, start) for (lo, _), (start, _) in zip(wanted, spans)]
    below = [(stop, hi) for (_, hi), (_, stop) in zip(wanted, spans)]
    halos = [fetch_many(t, bands, [above, below]) if t is not None else (None, None) for t in (x, cache)]
    out = convolve(x, cache, pad)  # zero row padding at the band's edges: right but for `pad` rows at inner edges
    if a > 0:
        out.narrow(-2, 0, pad).copy_(convolve(*_joined(halos, (x, cache), 0, 2 * pad), 0))
    if b < height:
        out.narrow(-2, out.shape[-2] - pad, pad).copy_(convolve(*_joined(halos, (x, cache), 1, 2 * pad), 0))
    return out


def _edge(t, rows: int, first: bool):
    return t.narrow(-2, 0 if first else t.shape[-2] - rows, rows)


def _joined(halos, tensors, side: int, rows: int):
    """(x, cache) strips: the halo above and the first `rows` rows (side 0), or the last rows and the halo below."""
    strips = []
    for (above, below), t in zip(halos, tensors):
        if t is None:
            strips.append(None)
        elif side == 0:
            strips.append(torch.cat([above, _edge(t, rows, True)], dim=-2))
        else:
            strips.append(torch.cat([_edge(t, rows, False), below], dim=-2))
    return strips


@contextlib.contextmanager
def _no_row_padding(conv):
    saved = conv._padding  # (w, w, h, h, 2t, 0), read by the forward at each call
    conv._padding = (*saved[:2], 0, 0, *saved[4:])
    try:
        yield
    finally:
        conv._padding = saved
