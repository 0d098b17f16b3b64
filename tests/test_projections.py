"""Per-head-chunk projections (processors/projections.py) equal the whole projection."""
import pytest
import torch

from fastusp.processors.projections import OutProjection, head_projection


class Scaled(torch.nn.Module):
    """Stands in for a LoRA wrapper or quantized linear: not an nn.Linear, so its weight must not be sliced."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 1.5 * self.linear(x)


def _modules(bias: bool):
    torch.manual_seed(0)
    plain = torch.nn.Linear(12, 12, bias=bias)
    return plain, Scaled(plain)


CHUNKS = [[slice(0, 6)], [slice(0, 3), slice(3, 6)], [slice(0, 2), slice(2, 4), slice(4, 6)]]  # 6 heads of 2


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunks", CHUNKS, ids=len)
def test_head_projection_equals_the_slice_of_the_whole(chunks, bias, wrapped):
    plain, scaled = _modules(bias)
    module = scaled if wrapped else plain
    x = torch.randn(2, 5, 12)
    whole = module(x).unflatten(-1, (6, 2))
    project = head_projection(module, x, head_dim=2)
    for heads in chunks:
        torch.testing.assert_close(project(heads), whole[:, :, heads], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunks", CHUNKS, ids=len)
def test_out_projection_accumulated_per_chunk_equals_the_whole(chunks, bias, wrapped):
    plain, scaled = _modules(bias)
    module = scaled if wrapped else plain
    x = torch.randn(2, 5, 12)
    out = OutProjection(module, head_dim=2)
    for heads in chunks:
        out.add(heads, x[:, :, heads.start * 2:heads.stop * 2])
    torch.testing.assert_close(out.output(), module(x), rtol=1e-5, atol=1e-6)
