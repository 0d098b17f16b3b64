"""fastusp's RoPE kernel (fastusp/kernels/rope.py) against the ops it replaces: bitwise equal outputs.

On CUDA the kernel itself runs (skipped without a GPU; the device runs it). On CPU it runs under Triton's interpreter
where Triton is installed (CI's CPU-only torch has none: skipped there), in float32 and float16 only: the interpreter
rounds float32 to bfloat16 by truncation, where GPUs round to nearest even as torch does.
"""
import pytest
import torch

from _triton_interpreter import run_under_triton_interpreter, script_main


def mismatches(device: str, dtypes) -> list[str]:
    """Every case where the kernel's output differs from diffusers' FLUX RoPE or fastusp's Qwen-Image RoPE."""
    from diffusers.models.embeddings import apply_rotary_emb

    from fastusp.kernels import rope
    from fastusp.models.qwen_image import real_rope as _rope

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    shapes = [(1, 37, 3, 16), (2, 5, 4, 8), (1, 1, 5, 6)] + ([(1, 4608, 24, 128)] if device != "cpu" else [])
    bad = []
    for dtype in dtypes:
        for batch, seq, heads, dim in shapes:
            name = f"{dtype} {(batch, seq, heads, dim)}"
            q, k = rand(batch, seq, heads, dim).to(dtype), rand(batch, seq, heads, dim).to(dtype)
            cos, sin = rand(seq, dim), rand(seq, dim)
            q_strided = rand(batch, seq, heads + 2, dim).to(dtype)[:, :, 1:-1]  # heads of a wider tensor
            out_q, out_k = rope.rotate(q_strided, k, cos, sin)
            if not (torch.equal(out_q, apply_rotary_emb(q_strided, (cos, sin), sequence_dim=1))
                    and torch.equal(out_k, apply_rotary_emb(k, (cos, sin), sequence_dim=1))):
                bad.append(f"FLUX {name}")
            # Qwen-Image: one (cos, sin) per pair, written into the tokens after 3 others of a joined tensor
            freqs = torch.polar(torch.rand(seq, dim // 2, generator=g), torch.randn(seq, dim // 2, generator=g))
            cos_sin = torch.view_as_real(freqs.to(device))
            joined_q = torch.zeros(batch, seq + 3, heads, dim, dtype=dtype, device=device)
            joined_k = torch.zeros_like(joined_q)
            rope.rotate_into(q, k, cos_sin[..., 0], cos_sin[..., 1], joined_q[:, 3:], joined_k[:, 3:], pairs=True)
            if not (torch.equal(joined_q[:, 3:], _rope(q, freqs.to(device)))
                    and torch.equal(joined_k[:, 3:], _rope(k, freqs.to(device)))
                    and not joined_q[:, :3].any() and not joined_k[:, :3].any()):
                bad.append(f"Qwen-Image {name}")
    return bad


def test_kernel_takes_only_what_its_32_bit_offsets_reach():
    from fastusp.kernels import rope

    flux_4k = torch.empty(2, 66048, 24, 128, device="meta")  # FLUX 4096x4096 + 512 text, batch 2: 4.1e8 elements
    too_big = torch.empty(8, 66048, 48, 128, device="meta")  # 3.2e9
    few_but_far = torch.empty(2**20, 2**11 + 1, device="meta")[:, :8]  # 8M elements spread over 2.1e9
    assert rope.addressable(flux_4k)
    assert not rope.addressable(too_big) and not rope.addressable(flux_4k, too_big)
    assert not rope.addressable(few_but_far)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_kernel_on_cuda():
    assert mismatches("cuda", (torch.bfloat16, torch.float16, torch.float32)) == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_rope_kernel_on_a_gpu_that_is_not_the_current_device():
    """A rank whose script never called torch.cuda.set_device: Triton must still launch on the tensors' GPU."""
    assert torch.cuda.current_device() == 0
    assert mismatches(f"cuda:{torch.cuda.device_count() - 1}", (torch.bfloat16,)) == []


def test_rope_kernel_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


if __name__ == "__main__":  # the interpreter run
    script_main(mismatches)
