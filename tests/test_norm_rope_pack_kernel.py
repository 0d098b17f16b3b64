"""fastusp's norm + RoPE + pack kernel (fastusp/kernels/norm_rope_pack.py) against the modules and ops it replaces:
FLUX's (torch.nn.RMSNorm, diffusers' apply_rotary_emb) and Qwen-Image's (diffusers' RMSNorm, its complex RoPE), the
text stream joined in front, and a2a.pack_head_chunks.

On CUDA the kernel itself runs (skipped without a GPU; the device runs it). On CPU it runs under Triton's interpreter
where Triton is installed (CI's CPU-only torch has none: skipped there). Equal within rounding, not bitwise: the sum of
squares is reduced in another order.
"""
import pytest
import torch

from _triton_interpreter import run_under_triton_interpreter, script_main

# batch, text tokens (0: a single-stream block), image tokens, heads, head dim, Ulysses size, head chunks
CASES = [(1, 5, 37, 4, 16, 2, 2), (2, 0, 9, 6, 8, 3, 1), (1, 3, 7, 6, 32, 2, 3), (1, 1, 2, 2, 4, 2, 1)]
GPU_CASES = [(1, 256, 2048, 24, 128, 2, 2), (1, 0, 2304, 24, 128, 2, 2), (1, 0, 1152, 24, 128, 4, 2)]


def reference(image, text, image_norms, text_norms, cos, sin, heads, group_size, chunks):
    from diffusers.models.embeddings import apply_rotary_emb

    from fastusp.distributed.ulysses import pack_head_chunks

    def normed(qkv, norms):
        q, k, v = (x.unflatten(-1, (heads, -1)) for x in qkv)
        return norms[0](q), norms[1](k), v
    q, k, v = normed(image, image_norms)
    if text is not None:
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(normed(text, text_norms), (q, k, v)))
    q, k = (apply_rotary_emb(x, (cos, sin), sequence_dim=1) for x in (q, k))
    return pack_head_chunks([q, k, v], group_size, chunks)


def _norm_pair(norm_class, dim: int, eps: float, rand, device, dtype) -> tuple:
    """q's and k's norms with random weights (they start as ones, where a swapped weight would not show)."""
    pair = (norm_class(dim, eps=eps), norm_class(dim, eps=eps))
    for n in pair:
        n.weight.data = rand(dim).abs() + 0.5
    return tuple(n.to(device, dtype) for n in pair)


def flux_case(rand, device, dtype, batch, text_len, image_len, heads, dim, group_size, chunks):
    """FLUX: torch.nn.RMSNorm, one (cos, sin) table over text + image, image q/k/v as views of a fused to_qkv's
    output -> (pack's arguments, the reference's buffers)."""
    from fastusp.models.flux import flux_rotation

    wide = rand(batch, image_len, 3 * heads * dim).to(dtype)  # a fused to_qkv's output: strided views
    image = wide.chunk(3, dim=-1)
    text = tuple(rand(batch, text_len, heads * dim).to(dtype) for _ in range(3)) if text_len else None
    image_norms = _norm_pair(torch.nn.RMSNorm, dim, 1e-6, rand, device, dtype)
    text_norms = _norm_pair(torch.nn.RMSNorm, dim, 1e-5, rand, device, dtype)
    cos, sin = rand(text_len + image_len, dim), rand(text_len + image_len, dim)
    rotation = flux_rotation((cos, sin), text_len)
    return ((image, text, image_norms, text_norms, rotation, heads, group_size, chunks),
            reference(image, text, image_norms, text_norms, cos, sin, heads, group_size, chunks))


def qwen_reference(image, text, image_norms, text_norms, image_freqs, text_freqs, heads, group_size, chunks):
    """Qwen-Image's processor: diffusers' RMSNorm per stream, RoPE on each stream's complex frequencies, joined."""
    from fastusp.distributed.ulysses import pack_head_chunks
    from fastusp.models.qwen_image import real_rope as _rope

    streams = []
    for qkv, norms, freqs in ((text, text_norms, text_freqs), (image, image_norms, image_freqs)):
        q, k, v = (x.unflatten(-1, (heads, -1)) for x in qkv)
        streams.append((_rope(norms[0](q), freqs), _rope(norms[1](k), freqs), v))
    return pack_head_chunks([torch.cat(pair, dim=1) for pair in zip(*streams)], group_size, chunks)


def qwen_case(rand, device, dtype, batch, text_len, image_len, heads, dim, group_size, chunks):
    """Qwen-Image: diffusers' RMSNorm, complex frequencies per stream, a text stream always (empty with no text
    tokens, as on a rank that holds none) -> (pack's arguments, the reference's buffers)."""
    from diffusers.models.normalization import RMSNorm

    from fastusp.models.qwen_image import qwen_rotation

    image = tuple(rand(batch, image_len, heads * dim).to(dtype) for _ in range(3))
    text = tuple(rand(batch, text_len, heads * dim).to(dtype) for _ in range(3))
    image_norms, text_norms = (_norm_pair(RMSNorm, dim, 1e-6, rand, device, dtype) for _ in range(2))
    image_freqs, text_freqs = (torch.polar(torch.ones(n, dim // 2), rand(n, dim // 2).cpu()).to(device)
                               for n in (image_len, text_len))
    rotation = qwen_rotation((image_freqs, text_freqs))
    return ((image, text, image_norms, text_norms, rotation, heads, group_size, chunks),
            qwen_reference(image, text, image_norms, text_norms, image_freqs, text_freqs, heads, group_size, chunks))


def mismatches(device: str, dtypes) -> list[str]:
    """Every case where the kernel's send buffers differ from the reference's by more than rounding, for FLUX's
    and Qwen-Image's norms and tables."""
    from fastusp.kernels import norm_rope_pack

    bad = []
    for seed, make_case in enumerate((flux_case, qwen_case)):
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
        for dtype in dtypes:
            for case in CASES + (GPU_CASES if device != "cpu" else []):
                name = f"{make_case.__name__} {dtype} {case}"
                with torch.no_grad():
                    args, want = make_case(rand, device, dtype, *case)
                    if not norm_rope_pack.applies_to_tensors(*args[:5], *args[5:7]):
                        bad.append(f"{name}: not taken")
                        continue
                    got = norm_rope_pack.pack(*args)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                for j, (a, b) in enumerate(zip(got, want)):
                    if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=tol, atol=tol):
                        bad.append(f"{name} chunk {j}: max diff {(a.float() - b.float()).abs().max().item():.3g}")
    return bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_norm_rope_pack_kernel_on_cuda():
    assert mismatches("cuda", (torch.bfloat16, torch.float16, torch.float32)) == []


def test_norm_rope_pack_kernel_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


if __name__ == "__main__":  # the interpreter run
    script_main(mismatches)
