"""Parallel VAE decode / encode (fastusp/vae/) and the text encoders on one rank (fastusp/text_encoder.py), on CPU
ranks against one process.

The VAEs are diffusers' AutoencoderKL (FLUX.1), AutoencoderKLFlux2 and AutoencoderKLQwenImage, tiny but with their
real structure: three resolutions (latent = image / 4), the mid-block attention, Qwen-Image's temporal downsampler.
Latents of 5 x 7 rows and columns split over 4 ranks as 2, 1, 1, 1 rows: every halo then crosses a band of one row.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

import fastusp
from _dist import run_distributed
from fastusp.vae import apply_parallel_vae, remove_parallel_vae
from fastusp.vae.bands import RowBands
from fastusp.vae import group_norm
from fastusp.vae.group_norm import group_norm_on_band
from fastusp.testing import tiny_call_kwargs, tiny_flux_pipeline, tiny_qwen_layered_pipeline
from fastusp._forward import has_changes

TOL = 1e-5
LATENT_SIZES = [(5, 7), (9, 4)]  # rows, columns: odd, and one that splits unevenly over 2, 3 and 4 ranks
BATCHES = [1, 2]  # images per latent size
VAES = ["flux", "flux2", "qwen"]


def tiny_vae(name: str):
    from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLQwenImage

    torch.manual_seed(0)
    if name == "qwen":  # Qwen-Image's layout: the second downsampler is temporal ("downsample3d")
        return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[False, True]).eval()
    cls = AutoencoderKL if name == "flux" else AutoencoderKLFlux2
    return cls(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=4, sample_size=32).eval()


def _latent(vae, rows: int, cols: int, batch: int = 1) -> torch.Tensor:
    shape = (batch, 4, 1, rows, cols) if type(vae).__name__ == "AutoencoderKLQwenImage" else (batch, 4, rows, cols)
    return torch.randn(shape, generator=torch.Generator().manual_seed(rows * 100 + cols))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _rows_seen(module) -> list:
    """Heights of the inputs `module` gets (to show a rank ran on its band, not the whole image)."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
    return seen


def _group_norm_errors() -> list:
    """GroupNorm with statistics over the ranks against torch's over the whole tensor: [rel. difference at mean 2,
    the same with statistics merged from many chunks, and at mean 300 (where one-pass sums of squares lose digits)
    the errors of both against float64]."""
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(2))
    torch.nn.init.normal_(norm.bias, generator=torch.Generator().manual_seed(3))
    bands = RowBands.even(11, dist.group.WORLD)
    errors = []
    for mean in (2.0, 300.0):
        x = mean + torch.randn(2, 8, 11, 5, generator=torch.Generator().manual_seed(1))
        ours = group_norm_on_band(norm, bands.local(x, 1), bands)
        if mean == 2.0:
            errors.append(_rel_err(ours, bands.local(norm(x), 1)))
            monkeypatch = pytest.MonkeyPatch()
            monkeypatch.setattr(group_norm, "_CHUNK", 16)  # the statistics of many chunks, merged
            errors.append(_rel_err(group_norm_on_band(norm, bands.local(x, 1), bands), bands.local(norm(x), 1)))
            monkeypatch.undo()
        else:
            truth = bands.local(torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(),
                                                               norm.bias.double(), norm.eps), 1)
            errors += [_rel_err(ours.double(), truth), _rel_err(bands.local(norm(x), 1).double(), truth)]
    return errors


# --- workers ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def _vae_worker(check_fallbacks: bool) -> dict:
    """Every VAE's decode and encode, parallel vs the same VAE before fastusp patched it; errors and band heights."""
    out = {"group_norm": _group_norm_errors()}

    for name in VAES:
        vae = tiny_vae(name)
        latents = [_latent(vae, rows, cols, batch) for (rows, cols), batch in zip(LATENT_SIZES, BATCHES)]
        expected = [vae.decode(z).sample for z in latents]
        images = [image.clamp(-1, 1) for image in expected]
        expected_latents = [vae.encode(image).latent_dist.mean for image in images]
        assert apply_parallel_vae(vae)
        decoder_rows, encoder_rows = _rows_seen(vae.decoder.conv_in), _rows_seen(vae.encoder.conv_in)
        out[name] = dict(
            decode=[_rel_err(vae.decode(z).sample, e) for z, e in zip(latents, expected)],
            encode=[_rel_err(vae.encode(i).latent_dist.mean, e) for i, e in zip(images, expected_latents)],
            decoder_rows=decoder_rows, encoder_rows=encoder_rows)
        if check_fallbacks:
            vae.enable_slicing()  # composes: each image of the batch decodes in bands
            out[name]["sliced"] = _rel_err(vae.decode(latents[1]).sample, expected[1])
            vae.disable_slicing()
            # whole on every rank, and still right: tiling on, fewer latent rows than ranks
            one_row = _latent(vae, 1, 6)
            whole = [vae.decode(one_row).sample]
            vae.enable_tiling()  # FLUX's tiles hold 8 latent rows: 9 rows decode in two overlapping tiles
            whole.append(vae.decode(latents[1]).sample)
            vae.disable_tiling()
            remove_parallel_vae(vae)
            assert not hasattr(vae, "_fastusp_vae")
            reference = [vae.decode(one_row).sample]
            vae.enable_tiling()
            reference.append(vae.decode(latents[1]).sample)
            vae.disable_tiling()
            out[name]["fallbacks"] = [_rel_err(a, e) for a, e in zip(whole, reference)]
            out[name]["after_remove"] = _rel_err(vae.decode(latents[1]).sample, expected[1])
    return out


def _img2img_worker(parallel_vae: bool) -> dict:
    pipe = _img2img_pipeline()
    fastusp.parallelize(pipe, ring=3, parallel_vae=parallel_vae)
    decoder_rows, encoder_rows = _rows_seen(pipe.vae.decoder.conv_in), _rows_seen(pipe.vae.encoder.conv_in)
    return dict(image=_img2img(pipe), decoder_rows=decoder_rows, encoder_rows=encoder_rows)


def _img2img_pipeline():
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline.from_pipe(tiny_flux_pipeline())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img(pipe) -> torch.Tensor:
    """FLUX.1 image-to-image: encodes the input image, denoises, decodes (36 x 44 pixels: 18 x 22 latent rows)."""
    image = torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(5))
    return pipe(**tiny_call_kwargs(pipe), image=image, height=36, width=44, strength=0.7, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _pipeline_with_text_encoders():
    """The tiny FluxPipeline with its tiny CLIP and T5 text encoders: its own encode_prompt runs them. Counts the T5
    calls, and raises in the T5 when `pipe.fail_encoding` is set (an encode_prompt that fails on its rank)."""
    pipe = tiny_flux_pipeline(text_encoders=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.encode_calls, pipe.fail_encoding = 0, False

    def count(module, args):
        pipe.encode_calls += 1
        if pipe.fail_encoding:
            raise ValueError("this prompt cannot be encoded")

    pipe.text_encoder_2.register_forward_pre_hook(count)
    return pipe


def _prompted(pipe, prompt: str) -> torch.Tensor:
    return pipe(prompt=prompt, height=32, width=48, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _text_encoder_worker() -> dict:
    pipe = _pipeline_with_text_encoders()
    fastusp.parallelize(pipe, ulysses=2, text_encoder_rank=0)
    image = _prompted(pipe, "a lighthouse at dusk")
    pipe.fail_encoding = True
    try:
        _prompted(pipe, "a lighthouse at dawn")
        failure = None
    except Exception as ex:  # every rank raises, none waits for a broadcast that never comes
        failure = f"{type(ex).__name__}: {ex}"
    encoder_params = sum(p.numel() for name, m in pipe.components.items()
                         if name.startswith("text_encoder") and isinstance(m, torch.nn.Module) for p in m.parameters())
    fastusp.unparallelize(pipe)
    # diffusers' own encode_prompt and VAE decode again
    unwrapped = "encode_prompt" not in vars(pipe) and "_decode" not in vars(pipe.vae)
    refusals = []  # refused by parallelize before it changes anything
    flux = tiny_flux_pipeline()
    for other, rank in [(flux, 2), (tiny_qwen_layered_pipeline(), 0), (flux.transformer, 0)]:
        with pytest.raises(ValueError) as refused:
            fastusp.parallelize(other, ulysses=2, text_encoder_rank=rank)
        assert not has_changes(getattr(other, "transformer", other)), "patched before refusing"
        refusals.append(str(refused.value))
    return dict(image=image, rank=dist.get_rank(), calls=pipe.encode_calls, encoder_params=encoder_params,
                failure=failure, refusals=refusals, unwrapped=unwrapped)


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
def test_decode_and_encode_equal_one_process(world):
    results = run_distributed(_vae_worker, world, world == 2, timeout=90)
    for rank, out in enumerate(results):
        same, chunked, ours, torchs = out["group_norm"]
        # at mean 300 float32 itself holds inputs to ~2e-5 of their spread: both land there, where one-pass sums of
        # squares are off by ~6e-3 here
        assert max(same, chunked) < 1e-6 and ours < 1e-4 and ours <= 2 * torchs, f"rank {rank}: {out['group_norm']}"
        for name in VAES:
            errors = out[name]
            assert max(errors["decode"] + errors["encode"]) < TOL, f"rank {rank} {name}: {errors}"
            if world == 2:
                # bit for bit: these ran diffusers' own code, whole
                assert errors["fallbacks"] == [0.0, 0.0] and errors["after_remove"] == 0.0, f"{name}: {errors}"
                assert errors["sliced"] < TOL, f"{name}: {errors}"
    for name in VAES:  # each rank ran on its own band: the rows it saw add up to the latent's (the image's)
        for rows_key, factor in [("decoder_rows", 1), ("encoder_rows", 4)]:
            seen = [out[name][rows_key][:len(LATENT_SIZES)] for out in results]  # the first calls: no fallbacks
            totals = [sum(rank_rows[i] for rank_rows in seen) for i in range(len(LATENT_SIZES))]
            assert totals == [factor * rows for rows, _ in LATENT_SIZES], f"{name} {rows_key}: {seen}"


def test_img2img_pipeline_equals_one_process():
    expected = _img2img(_img2img_pipeline())
    results = run_distributed(_img2img_worker, 3, True)
    for rank, out in enumerate(results):
        assert _rel_err(out["image"], expected) < 1e-4, f"rank {rank}"
    # the encode and the decode ran in bands (18 latent rows: 6 a rank), not whole on every rank
    assert [out["decoder_rows"] for out in results] == [[6]] * 3
    assert [out["encoder_rows"] for out in results] == [[12]] * 3


def test_text_encoder_on_one_rank():
    expected = _prompted(_pipeline_with_text_encoders(), "a lighthouse at dusk")
    results = run_distributed(_text_encoder_worker, 2)
    for out in results:
        assert _rel_err(out["image"], expected) < 1e-4, f"rank {out['rank']}"
    assert [out["calls"] for out in results] == [2, 0]  # only rank 0 runs T5 (the good prompt and the failing one)
    assert results[0]["encoder_params"] > 0 and results[1]["encoder_params"] == 0  # rank 1 holds no text encoder
    assert "ValueError: this prompt cannot be encoded" in results[0]["failure"]
    assert "failed on rank 0" in results[1]["failure"] and "cannot be encoded" in results[1]["failure"]
    assert [out["unwrapped"] for out in results] == [True, True]
    for out in results:  # refused on every rank, naming the argument: no such rank; an encoder used outside
        # encode_prompt; a bare transformer
        assert "text_encoder_rank must be a rank from 0 to 1" in out["refusals"][0]
        assert "QwenImageLayeredPipeline uses its text encoder outside encode_prompt" in out["refusals"][1]
        assert "pass the pipeline, not the transformer" in out["refusals"][2]


def _vae_only_benchmark(out_dir: str) -> list:
    import json
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import time_per_image

    os.environ["OUT"] = out_dir
    time_per_image.main(["--tiny", "--vae-only", "--model", "qwen", "--sizes", "32", "--shares", "2,3",
                         "--repeats", "1"])
    with open(os.path.join(out_dir, "vae_decode.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_time_per_image_vae_only_times_the_whole_decode_and_one_share(tmp_path):
    records = run_distributed(_vae_only_benchmark, 1, str(tmp_path))[0]
    assert [r["decode"] for r in records] == ["whole", "share-of-2", "share-of-3"]
    assert all(r["ms"] > 0 and "err" not in r for r in records)
