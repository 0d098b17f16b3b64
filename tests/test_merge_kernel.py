"""fastusp's log-sum-exp merge kernel (fastusp/kernels/merge.py) against the torch ops it replaces.

On CUDA the kernel itself runs (skipped without a GPU; the device runs it). On CPU it runs under Triton's interpreter
where Triton is installed (CI's CPU-only torch has none: skipped there), in float32 and float16.
"""
import pytest
import torch

from _triton_interpreter import run_under_triton_interpreter, script_main


def differences(device: str, dtypes) -> list[str]:
    """Every case where the kernel's merge differs from the torch ops' by more than rounding."""
    from fastusp.attention import merge
    from fastusp.kernels import merge as merge_kernel

    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    shapes = [(1, 3, 37, 16), (2, 2, 5, 8), (1, 1, 1, 6)] + ([(1, 24, 2304, 128)] if device != "cpu" else [])
    bad = []
    for dtype in dtypes:
        for batch, heads, seq, dim in shapes:
            # attention outputs as the kernels leave them: [B, H, S, D] views of [B, S, H, D] memory, and an LSE
            # [B, H, S] view of [B, H, S, 1] with a few rows at -inf in both blocks (every key masked)
            blocks = [(rand(batch, seq, heads, dim).to(dtype).transpose(1, 2), 4 * rand(batch, heads, seq, 1)[..., 0])
                      for _ in range(3)]
            for _, block_lse in blocks:
                block_lse[:, :, ::7] = float("-inf")
            for steps in (2, 3):  # Ring-2, Ring-3: a float32 running result between the merges
                want = got = (blocks[0][0], blocks[0][1])
                for step in range(1, steps):
                    out_dtype = dtype if step + 1 == steps else torch.float32
                    want = merge._merge_ops(*want, *blocks[step], out_dtype)
                    got = merge_kernel.merge(*got, *blocks[step], out_dtype)
                name = f"{dtype} {(batch, heads, seq, dim)} {steps} blocks"
                (want_out, want_lse), (got_out, got_lse) = want, got
                if got_out.dtype != dtype or got_out.shape != want_out.shape:
                    bad.append(f"{name}: {got_out.dtype} {tuple(got_out.shape)}")
                    continue
                if not got_out.transpose(1, 2).is_contiguous():  # ring attention's result is used in that layout
                    bad.append(f"{name}: strides {got_out.stride()}, not [B, S, H, D] memory")
                finite = torch.isfinite(want_out).all(-1)  # rows with every key masked are NaN both ways
                # within two units in the last place of the output dtype, relative to each row's largest value; in
                # float32 1e-5: an LSE near 10 is itself rounded to 1e-6, and a weight exp(lse - total) with it
                tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
                scale = want_out.float().abs().amax(-1, keepdim=True)
                if not ((got_out.float() - want_out.float()).abs() <= tol * scale)[finite].all():
                    bad.append(f"{name}: out")
                if not (torch.isnan(got_out) == ~finite[..., None]).all():
                    bad.append(f"{name}: masked rows")
                if not torch.allclose(got_lse, want_lse, rtol=1e-6, atol=1e-5, equal_nan=True):
                    bad.append(f"{name}: lse")
    return bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_kernel_on_cuda():
    from fastusp.attention import merge
    from fastusp.attention.local import attention_with_lse
    from fastusp.kernels import merge as merge_kernel

    assert differences("cuda", (torch.bfloat16, torch.float16, torch.float32)) == []
    # what ring attention hands it on CUDA takes the kernel: cuDNN's (out, lse) in bfloat16
    q = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    first = merge.merge_attention(None, None, *attention_with_lse(q, q, q))
    assert merge_kernel.applies(*first, *attention_with_lse(q, q, q))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_merge_kernel_on_a_gpu_that_is_not_the_current_device():
    """A rank whose script never called torch.cuda.set_device: Triton must still launch on the tensors' GPU."""
    assert torch.cuda.current_device() == 0
    assert differences(f"cuda:{torch.cuda.device_count() - 1}", (torch.bfloat16,)) == []


def test_merge_kernel_under_triton_interpreter():
    run_under_triton_interpreter(__file__)


if __name__ == "__main__":  # the interpreter run
    script_main(differences)
