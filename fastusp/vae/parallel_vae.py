"""Decode and encode with each rank on a band of rows, exactly as on the whole image.

apply_parallel_vae(vae) patches the VAE in place, each change recorded through _forward.py (fastusp.unparallelize
undoes them with the rest; remove_parallel_vae undoes only these):
  vae._decode / vae._encode   take this rank's rows of the latent (of the image), run diffusers' own code on them,
                              and gather the result's rows from every rank once at the end
  convolutions                fetch the halo rows they need from the neighbouring bands (halo_conv.py); the
                              stride-2 downsamplers' one-row bottom padding happens at the image's bottom only
  GroupNorm                   statistics over all ranks (group_norm.py)
  mid-block attention         this rank's queries against every rank's keys and values (attention.py)
Everything else in these VAEs (activations, nearest upsampling, Qwen-Image's RMS norm over channels, 1x1
convolutions) works per position and runs unchanged. Outside a decode or encode every patched module runs diffusers'
own forward, so a call that does not split (tiling on, an image smaller than the ranks) needs no other path.

Every rank must decode together (pipelines do: each rank runs the same call). The bands are cut over the whole world,
not the sequence group: after the denoising loop every rank holds the same latents, also under cfg=2, so all of
them can share the decode.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderOutput

from .._forward import hook_forward, patch_attribute, undo_changes
from ..distributed.gather import gather_seq
from .attention import attention_on_band, qwen_attention_on_band
from .bands import RowBands
from .group_norm import group_norm_on_band
from .halo_conv import causal_conv3d_on_band, conv2d_on_band

logger = logging.getLogger("fastusp")

SUPPORTED_VAES = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage")
# modules of these VAEs that work per position (or only hold others): they run unchanged on a band. A VAE holding
# anything not listed here or patched below stays whole, rather than decode a silently wrong image.
_PER_POSITION = {
    "AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage", "Encoder", "Decoder", "DownEncoderBlock2D",
    "UpDecoderBlock2D", "UNetMidBlock2D", "ResnetBlock2D", "Upsample2D", "Downsample2D", "Linear", "Dropout", "SiLU",
    "ModuleList", "Sequential", "Identity", "BatchNorm2d", "QwenImageEncoder3d", "QwenImageDecoder3d",
    "QwenImageMidBlock", "QwenImageResidualBlock", "QwenImageUpBlock", "QwenImageResample", "QwenImageUpsample",
    "QwenImageRMS_norm", "ZeroPad2d",
}
_PATCHED = {"Conv2d", "QwenImageCausalConv3d", "GroupNorm", "Attention", "QwenImageAttentionBlock"}


class _BandState:
    """The bands of the decode or encode in progress; None outside one."""

    def __init__(self):
        self.bands: RowBands | None = None
        self.said: set[str] = set()

    @contextlib.contextmanager
    def using(self, bands: RowBands):
        self.bands = bands
        try:
            yield
        finally:
            self.bands = None

    def say_once(self, key: str, message: str) -> None:
        if key not in self.said and dist.get_rank() == 0:
            logger.info(message)
        self.said.add(key)


def apply_parallel_vae(vae, group=None) -> bool:
    """Make vae's decode and encode split the rows over `group`'s ranks (default: the whole world); returns whether
    it did (a VAE of another kind, or holding modules not known to work on a band, stays whole, with a log line)."""
    if getattr(vae, "_fastusp_vae", None) is not None:  # shared by a pipeline made with from_pipe
        return True
    group = group or dist.group.WORLD
    unknown = _unsupported(vae)
    if unknown:
        if dist.get_rank() == 0:
            logger.info("fastusp: %s decodes whole on every rank: %s", type(vae).__name__, unknown)
        return False
    state = _BandState()
    _patch_modules(vae, state)
    factor = 2 ** sum(_is_downsampler(m) for m in vae.encoder.modules())
    patch_attribute(vae, "_decode", _decode_on_bands(vae, vae._decode, state, group))
    patch_attribute(vae, "_encode", _encode_on_bands(vae, vae._encode, state, group, factor))
    patch_attribute(vae, "_fastusp_vae", state)  # the bands in use (benchmarks set them to time one rank's share)
    if dist.get_rank() == 0:
        logger.info("fastusp: %s decodes and encodes in row bands over %d ranks", type(vae).__name__,
                    dist.get_world_size(group))
    return True


def remove_parallel_vae(vae) -> None:
    """Undo apply_parallel_vae (only it: fastusp changes nothing else in a VAE)."""
    if getattr(vae, "_fastusp_vae", None) is not None:
        undo_changes(vae.modules())


def _unsupported(vae) -> str:
    """Why the VAE cannot run on bands ('' if it can)."""
    if type(vae).__name__ not in SUPPORTED_VAES:
        return f"fastusp's parallel VAE supports {', '.join(SUPPORTED_VAES)}"
    unknown = sorted({type(m).__name__ for m in vae.modules()} - _PER_POSITION - _PATCHED)
    if unknown:
        return f"modules {unknown} are not known to work on a band of rows"
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d) or type(m).__name__ == "QwenImageCausalConv3d":
            if m.padding_mode != "zeros" or isinstance(m.padding, str) or any(d != 1 for d in m.dilation):
                return f"a convolution with padding {m.padding!r} ({m.padding_mode}), dilation {m.dilation}"
        if type(m).__name__ == "Upsample2D" and (m.use_conv_transpose or not m.interpolate):
            return "an Upsample2D without nearest interpolation"
        if type(m).__name__ == "Downsample2D" and not m.use_conv:
            return "a Downsample2D without a convolution"
        if type(m).__name__ == "Attention" and m.spatial_norm is not None:
            return "an attention with a spatial norm"
    return ""


def _is_downsampler(module) -> bool:
    return type(module).__name__ == "Downsample2D" or (type(module).__name__ == "QwenImageResample"
                                                       and module.mode.startswith("downsample"))


def _patch_modules(vae, state: _BandState) -> None:
    # The downsamplers pad one row and column at the bottom and right before a stride-2, unpadded convolution: on a
    # band the row goes to the image's bottom only, and their convolution gets that row padding.
    padded = {}
    for m in vae.modules():
        if type(m).__name__ == "Downsample2D" and m.padding == 0:
            padded[m.conv] = (0, 1)
            hook_forward(m, _on_band(state, lambda bands, forward, x, *args, m=m, **kwargs: _downsample2d(m, x)))
        elif type(m).__name__ == "QwenImageResample" and _is_downsampler(m):
            # nn.Sequential(ZeroPad2d((0, 1, 0, 1)), Conv2d(stride 2))
            pad, conv = m.resample
            padded[conv] = (pad.padding[2], pad.padding[3])
            hook_forward(pad, _on_band(state, lambda bands, forward, x, pad=pad: _pad_width_only(pad, x)))
    for m in vae.modules():
        on_band = _band_version(m, padded.get(m))
        if on_band is not None:
            hook_forward(m, _on_band(state, on_band))


def _band_version(m, pad_rows: tuple[int, int] | None):
    """on_band(bands, original, *forward args) for the modules that need the other ranks' rows; None for the rest.
    pad_rows: a convolution's row padding where its downsampler pads, not the convolution."""
    kind = type(m).__name__
    if kind == "Conv2d" and (m.kernel_size[0], m.stride[0]) != (1, 1):
        rows = pad_rows or (m.padding[0], m.padding[0])
        return lambda bands, original, x: conv2d_on_band(m, x, bands, rows)
    if kind == "QwenImageCausalConv3d" and (m.kernel_size[1], m.stride[1]) != (1, 1):
        return lambda bands, original, x, cache_x=None: causal_conv3d_on_band(m, original, x, cache_x, bands)
    if kind == "GroupNorm":
        return lambda bands, original, x: group_norm_on_band(m, x, bands)
    if kind == "Attention":  # UNetMidBlock2D passes temb=None
        return lambda bands, original, x, *args, **kwargs: attention_on_band(m, x, bands)
    if kind == "QwenImageAttentionBlock":
        return lambda bands, original, x: qwen_attention_on_band(m, x, bands)
    return None


def _on_band(state: _BandState, on_band):
    """For hook_forward: on_band(bands, forward, ...) during a banded decode or encode, the module's forward
    otherwise."""
    def run(forward, *args, **kwargs):
        if state.bands is None:
            return forward(*args, **kwargs)
        return on_band(state.bands, forward, *args, **kwargs)
    return run


def _downsample2d(module, hidden_states):
    """diffusers' Downsample2D (padding 0) on a band: pad the right column here, the bottom row in the convolution."""
    if module.norm is not None:  # over channels, per position
        hidden_states = module.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return module.conv(F.pad(hidden_states, (0, 1, 0, 0)))


def _pad_width_only(pad, x):
    """Qwen-Image's downsampler's ZeroPad2d on a band: the columns; the convolution pads the rows."""
    return F.pad(x, (pad.padding[0], pad.padding[1], 0, 0), value=pad.value)


def _gather_rows(x: torch.Tensor, bands: RowBands) -> torch.Tensor:
    return gather_seq(x, bands.rows(bands.scale_of(x.shape[-2])), bands.group, dim=x.ndim - 2)


def _bands_for(vae, state: _BandState, latent_rows: int, group, what: str) -> RowBands | None:
    """This call's bands, or None where it runs whole (with a log line, once)."""
    if vae.use_tiling:
        state.say_once("tiling", f"fastusp: {type(vae).__name__} tiling is on, so each rank runs diffusers' tiled "
                                 f"{what} of the whole image; vae.disable_tiling() splits it over the ranks instead")
        return None
    ranks = dist.get_world_size(group)
    if ranks == 1:
        return None
    if latent_rows < ranks:
        state.say_once(f"small-{what}", f"fastusp: a {what} of {latent_rows} latent rows runs whole on each of the "
                                        f"{ranks} ranks (a band needs at least one row)")
        return None
    return RowBands.even(latent_rows, group)


def _decode_on_bands(vae, original, state: _BandState, group):
    def _decode(z: torch.Tensor, return_dict: bool = True):
        bands = _bands_for(vae, state, z.shape[-2], group, "decode")
        if bands is None:
            return original(z, return_dict=return_dict)
        with state.using(bands):
            sample = original(bands.local(z, 1), return_dict=True).sample
        sample = _gather_rows(sample, bands)
        return DecoderOutput(sample=sample) if return_dict else (sample,)
    return _decode


def _encode_on_bands(vae, original, state: _BandState, group, factor: int):
    """factor: image rows per latent row; an image whose height is not a multiple of it encodes whole."""
    def _encode(x: torch.Tensor):
        rows = x.shape[-2]
        if rows % factor:
            state.say_once("uneven-encode", f"fastusp: an image of {rows} rows (not a multiple of {factor}) encodes "
                                            f"whole on every rank")
            return original(x)
        bands = _bands_for(vae, state, rows // factor, group, "encode")
        if bands is None:
            return original(x)
        with state.using(bands):
            latent = original(bands.local(x, factor))
        return _gather_rows(latent, bands)
    return _encode
