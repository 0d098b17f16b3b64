"""Convolutions on a band of rows that give exactly the rows the whole-image convolution gives there.

A convolution of kernel k, stride s and zero padding (top, bottom) over the whole image computes output row o from
input rows [o*s - top, o*s - top + k). A rank whose output band is [a, b) (its input band [a*s, b*s), see
bands.py) fetches input rows [a*s - top, (b-1)*s - top + k) -- its band plus the halo rows of its neighbours,
zeros beyond the image -- and convolves them without padding along the rows. Width padding is the convolution's own.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .bands import RowBands, fetch_rows


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
    wanted = halo_rows(bands, x, conv.kernel_size[0], conv.stride[0], pad_rows)
    rows = fetch_rows(x, bands, wanted)
    return F.conv2d(rows, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


def causal_conv3d_on_band(conv, original, x: torch.Tensor, cache_x, bands: RowBands):
    """Qwen-Image's QwenImageCausalConv3d (x: [B, C, T, rows, W]) on this rank's rows. `original` is its forward:
    it joins the cached frames (this rank's rows of them, fetched with the same halo) and pads time and width;
    its row padding is switched off while it runs, the halo takes its place."""
    pad_rows = (conv._padding[2], conv._padding[3])
    wanted = halo_rows(bands, x, conv.kernel_size[1], conv.stride[1], pad_rows)
    x = fetch_rows(x, bands, wanted)
    if cache_x is not None:
        cache_x = fetch_rows(cache_x.to(x.device), bands, wanted)
    with _no_row_padding(conv):
        return original(x, cache_x)


@contextlib.contextmanager
def _no_row_padding(conv):
    saved = conv._padding  # (w, w, h, h, 2t, 0), read by the forward at each call
    conv._padding = (*saved[:2], 0, 0, *saved[4:])
    try:
        yield
    finally:
        conv._padding = saved
