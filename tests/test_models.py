"""Parallel FLUX / FLUX.2 / Qwen-Image transformers equal the single-process model (float32, CPU, gloo)."""
import functools

import pytest
import torch

import fastusp
from _dist import run_distributed
from fastusp.testing import flux2_inputs, flux_inputs, qwen_inputs, qwen_layered_inputs, tiny_flux, tiny_flux2, tiny_qwen

LAYOUTS = [(2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]  # (ulysses, ring)
MODELS = {"flux": (tiny_flux, flux_inputs), "flux2": (tiny_flux2, flux2_inputs), "qwen": (tiny_qwen, qwen_inputs),
          "qwen-edit-2511": (functools.partial(tiny_qwen, zero_cond_t=True), qwen_inputs),
          "qwen-layered": (functools.partial(tiny_qwen, layered=True), qwen_layered_inputs)}


def _parallel_forward(build, inputs, ulysses, ring, fp8_comm=False, return_dict=False, options=None):
    model = build()
    fastusp.parallelize(model, ulysses=ulysses, ring=ring, fp8_comm=fp8_comm, **(options or {}))
    with torch.no_grad():
        out = model(**inputs, return_dict=return_dict)
    return out.sample if return_dict else out[0]


def assert_parallel_matches_single(name, layout, tol=1e-4, fp8_comm=False, options=None, **input_kw):
    build, make_inputs = MODELS[name]
    inputs = make_inputs(**input_kw)
    with torch.no_grad():
        ref = build()(**inputs, return_dict=False)[0]
    outs = run_distributed(_parallel_forward, layout[0] * layout[1], build, inputs, *layout, fp8_comm, False, options)
    for rank, out in enumerate(outs):
        assert out.shape == ref.shape
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < tol, f"rank {rank}: relative error {err:.2e} >= {tol}"
    return outs


@pytest.mark.parametrize("layout", [(2, 1), (1, 2), (2, 2)], ids=lambda l: f"u{l[0]}r{l[1]}")
def test_qwen_image_edit_2511_reference_tokens(layout):
    # zero_cond_t: the edited image's 15 tokens, then a reference image's 8, which every block modulates as at t = 0
    # (modulate_index, built inside the forward for all 23 tokens). The reference tokens sit on the last ranks, so a
    # rank that used other ranks' rows of modulate_index would modulate them as the edited image.
    inputs = qwen_inputs(batch=2, height=3, width=5, text_len=5, valid_lens=[2, 5], reference_hw=(2, 4))
    with torch.no_grad():  # precondition: the reference tokens' own modulation matters to the output
        plain = tiny_qwen()(**inputs, return_dict=False)[0]
        edit = tiny_qwen(zero_cond_t=True)(**inputs, return_dict=False)[0]
    assert ((plain - edit).norm() / edit.norm()).item() > 1e-2
    assert_parallel_matches_single("qwen-edit-2511", layout, batch=2, height=3, width=5, text_len=5,
                                   valid_lens=[2, 5], reference_hw=(2, 4))


@pytest.mark.parametrize("layout", [(2, 1), (1, 2), (2, 2)], ids=lambda l: f"u{l[0]}r{l[1]}")
def test_qwen_image_layered(layout):
    # Qwen-Image-Layered: four 3x5 images (composite, 2 layers, the input image) = 60 image tokens, uneven over the
    # ranks, each image at its own position on RoPE's layer axis (the input image at -1); the RoPE tables are built
    # for all of them and each rank keeps its rows, as for Qwen-Image
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    inputs = qwen_layered_inputs(batch=2, height=3, width=5, text_len=5, valid_lens=[2, 5])
    model = tiny_qwen(layered=True)
    with torch.no_grad():  # precondition: the layer axis matters (plain Qwen-Image RoPE gives another output)
        layered = model(**inputs, return_dict=False)[0]
        model.pos_embed = QwenEmbedRope(theta=10000, axes_dim=[4, 6, 6], scale_rope=True)
        plain = model(**inputs, return_dict=False)[0]
    assert ((plain - layered).norm() / layered.norm()).item() > 1e-2
    assert_parallel_matches_single("qwen-layered", layout, batch=2, height=3, width=5, text_len=5, valid_lens=[2, 5])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}r{l[1]}")
def test_flux2_with_reference_tokens(layout):
    # FLUX.2: 15 image tokens, then a reference image's 6 (RoPE ids with first axis 10), and text ids that count up
    # along the fourth axis (FLUX.1's are all zero), so each rank must take its own rows of both id tensors
    inputs = flux2_inputs(batch=2, height=3, width=5, text_len=5, reference_hw=(2, 3))
    model = tiny_flux2()
    with torch.no_grad():  # precondition: text positions matter
        ref = model(**inputs, return_dict=False)[0]
        no_text_positions = model(**{**inputs, "txt_ids": torch.zeros_like(inputs["txt_ids"])}, return_dict=False)[0]
    assert ((no_text_positions - ref).norm() / ref.norm()).item() > 1e-3
    assert_parallel_matches_single("flux2", layout, batch=2, height=3, width=5, text_len=5, reference_hw=(2, 3))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"u{l[0]}r{l[1]}")
@pytest.mark.parametrize("name", ["flux", "qwen"])
def test_uneven_tokens_batch2(name, layout):
    # 3x5 = 15 image tokens and 5 text tokens: neither divides 2 nor 4, so every layout splits unevenly.
    assert_parallel_matches_single(name, layout, batch=2, height=3, width=5, text_len=5)


@pytest.mark.parametrize("layout", [(2, 1), (2, 2)], ids=lambda l: f"u{l[0]}r{l[1]}")
@pytest.mark.parametrize("name", ["flux", "flux2", "qwen"])
def test_heads_in_chunks(name, layout):
    # Eager defaults to one chunk; force two (one head each on 2 Ulysses ranks), as compiled / graphed forwards use.
    assert_parallel_matches_single(name, layout, options=dict(ulysses_chunks=2), batch=2, height=3, width=5,
                                   text_len=5)


@pytest.mark.parametrize("layout", [(2, 1), (1, 2), (2, 2)], ids=lambda l: f"u{l[0]}r{l[1]}")
def test_qwen_padded_text_mask(layout):
    # Sample 0 keeps 2 of 6 text tokens: under (1, 2) and (2, 2) whole text chunks of some ranks are padding.
    assert_parallel_matches_single("qwen", layout, batch=2, text_len=6, valid_lens=[2, 6])


def test_qwen_mask_changes_the_output():
    """Guards the test above: a padded mask must matter, or the mask tests could not fail."""
    inputs = qwen_inputs(batch=2, text_len=6, valid_lens=[2, 6])
    model = tiny_qwen()
    with torch.no_grad():
        masked = model(**inputs, return_dict=False)[0]
        unmasked = model(**{**inputs, "encoder_hidden_states_mask": None}, return_dict=False)[0]
    assert not torch.allclose(masked[0], unmasked[0], atol=1e-4)
    assert torch.allclose(masked[1], unmasked[1], atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "flux2", "qwen"])
def test_text_shorter_than_world_and_return_dict(name):
    # 3 text tokens over 4 ranks: one rank holds no text at all. return_dict=True returns the diffusers output class.
    build, make_inputs = MODELS[name]
    inputs = make_inputs(text_len=3, height=2, width=3)
    with torch.no_grad():
        ref = build()(**inputs).sample
    for out in run_distributed(_parallel_forward, 4, build, inputs, 2, 2, False, True):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def _tiny_flux_fused_qkv():
    model = tiny_flux()
    model.fuse_qkv_projections()  # diffusers' one-GEMM q|k|v (to_qkv, to_added_qkv)
    for attn in (m for m in model.modules() if getattr(m, "fused_projections", False)):
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(attn, name, None)  # only the fused weights are left: the processor must use them
    return model


def test_flux_with_fused_qkv_projections():
    inputs = flux_inputs(batch=2, height=3, width=5, text_len=5)
    with torch.no_grad():
        ref = tiny_flux()(**inputs, return_dict=False)[0]
    for out in run_distributed(_parallel_forward, 2, _tiny_flux_fused_qkv, inputs, 2, 1):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _flux_with_deprecated_3d_ids(inputs):
    model = tiny_flux()
    fastusp.parallelize(model, ulysses=2)
    inputs = {**inputs, "img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None]}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_flux_accepts_deprecated_batched_ids():
    inputs = flux_inputs()
    with torch.no_grad():
        ref = tiny_flux()(**inputs, return_dict=False)[0]
    for out in run_distributed(_flux_with_deprecated_3d_ids, 2, inputs):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq", [0, 7])
def test_qwen_rope_in_real_arithmetic_equals_diffusers_complex_rope(seq, dtype):
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
    from fastusp.models.qwen_image import real_rope as _rope
    x = torch.randn(2, seq, 3, 8).to(dtype)
    freqs = torch.polar(torch.ones(seq, 4), torch.randn(seq, 4))
    expected = apply_rotary_emb_qwen(x, freqs, use_real=False) if seq else x  # diffusers' fails on no tokens
    tol = 1e-6 if dtype == torch.float32 else 0  # bf16: the same float32 products, rounded once: bitwise equal
    torch.testing.assert_close(_rope(x, freqs), expected, rtol=tol, atol=tol)


def test_processors_store_their_call_signature_for_diffusers_per_call_inspect():
    import inspect

    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from fastusp.processors.context import USPContext
    from fastusp.models.flux import FastUSPFluxAttnProcessor, FastUSPFluxIPAdapterAttnProcessor
    from fastusp.models.flux2 import FastUSPFlux2AttnProcessor, FastUSPFlux2ParallelSelfAttnProcessor
    from fastusp.models.qwen_image import FastUSPQwenImageAttnProcessor

    context = USPContext(config=None)
    ip_adapter = FastUSPFluxIPAdapterAttnProcessor.from_diffusers(FluxIPAdapterAttnProcessor(8, 8), context)
    for processor in (FastUSPFluxAttnProcessor(context), FastUSPQwenImageAttnProcessor(context), ip_adapter,
                      FastUSPFlux2AttnProcessor(context), FastUSPFlux2ParallelSelfAttnProcessor(context)):
        stored = type(processor).__call__.__dict__.get("__signature__")
        assert stored is not None and "hidden_states" in stored.parameters
        assert list(inspect.signature(processor.__call__).parameters) == list(stored.parameters)[1:]  # minus self
