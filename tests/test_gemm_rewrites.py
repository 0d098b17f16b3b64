"""gemm_rewrites: which Dynamo-graph patterns the pass rewrites and which it leaves, that the rewritten graphs
compute the same (toy functions, and the blocks of FLUX, FLUX.2 and Qwen-Image), and that Inductor runs the pass
under compile_pipeline's options.

On CPU linear_gelu keeps torch's ops (CPU's _addmm_activation has the erf GELU), so these tests check the matching
and the split of a linear over a cat. The GELU epilogue itself is checked where CUDA is (the last test), and in
the models by tests/gpu/parity_worker.py.
"""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.two_tensor import TwoTensor

from _dist import run_distributed

torch.manual_seed(0)
W_UP, B_UP = torch.randn(24, 8), torch.randn(24)
W_DOWN, B_DOWN = torch.randn(8, 32), torch.randn(8)
W_TWO = TwoTensor(W_UP, W_UP.clone())


def mlp(x, attn):  # FLUX's single-stream tail: gelu(tanh) of a biased linear, cat, linear
    return F.linear(torch.cat([attn, F.gelu(F.linear(x, W_UP, B_UP), approximate="tanh")], dim=2), W_DOWN, B_DOWN)


def exact_gelu(x, attn):  # not the GELU cuBLASLt's epilogue computes: kept
    return F.gelu(F.linear(x, W_UP, B_UP))


def unbiased(x, attn):  # _addmm_activation needs a bias: kept
    return F.gelu(F.linear(x, W_UP), approximate="tanh")


def linear_also_read(x, attn):  # the linear's output has a second reader: kept
    up = F.linear(x, W_UP, B_UP)
    return F.gelu(up, approximate="tanh") + up


def cat_of_linear(x, attn):  # any GEMM's output in the cat: split
    return F.linear(torch.cat([attn, F.linear(x, W_UP, B_UP)], dim=-1), W_DOWN)


def cat_also_read(x, attn):  # the cat is needed anyway: kept
    joined = torch.cat([attn, F.linear(x, W_UP, B_UP)], dim=-1)
    return F.linear(joined, W_DOWN), joined


def cat_of_rows(x, attn):  # a cat along tokens is not a split of the weight's columns: kept
    return F.linear(torch.cat([attn, x], dim=1), W_UP)


def cat_of_pointwise(x, attn):  # no GEMM's output in the cat: Inductor writes the parts into it, kept
    return F.linear(torch.cat([attn, F.silu(x)], dim=-1), W_UP[:, :8].repeat(1, 2))


def subclass_weight(x, attn):  # a tensor subclass's weight (a quantized one, say): kept
    return F.gelu(F.linear(x, W_TWO, B_UP), approximate="tanh").a


def under_autocast(x, attn):  # autocast casts linear, not _addmm_activation: kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.gelu(F.linear(x, W_UP, B_UP), approximate="tanh").float()


def needs_grad(x, attn):  # _addmm_activation has no derivative: the gelu is kept, and so the cat
    return mlp(x, attn)


CASES = {mlp: (1, 1), cat_of_linear: (0, 1), exact_gelu: (0, 0), unbiased: (0, 0), linear_also_read: (0, 0),
         cat_also_read: (0, 0), cat_of_rows: (0, 0), cat_of_pointwise: (0, 0), subclass_weight: (0, 0),
         under_autocast: (0, 0), needs_grad: (0, 0)}


def _rewriting_backend(counts):
    """A torch.compile backend that runs the pass on each Dynamo graph and then the graph as it is, counting the
    rewrites."""
    from fastusp import gemm_rewrites

    def backend(gm, example_inputs):
        gemm_rewrites.GemmRewrites()(gm.graph)
        gm.recompile()
        counts.update(n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"
                      and n.target in (gemm_rewrites.linear_gelu, gemm_rewrites.linear_of_parts))
        return gm.forward

    return backend


def _rewritten_cases():
    """Each case's Dynamo graph after the pass: (its outputs, the case's eager outputs, the rewrites' counts)."""
    results = {}
    for fn in CASES:
        counts, grad = collections.Counter(), fn is needs_grad
        x, attn = torch.randn(2, 5, 8, requires_grad=grad), torch.randn(2, 5, 8)
        with torch.set_grad_enabled(grad):
            out = torch.compile(fn, backend=_rewriting_backend(counts), fullgraph=True)(x, attn)
            results[fn.__name__] = (out, fn(x, attn), counts)
    return results


def test_pass_rewrites_only_what_it_can_compute_the_same():
    [results] = run_distributed(_rewritten_cases, 1)
    for fn, expected_counts in CASES.items():
        out, expected, counts = results[fn.__name__]
        assert (counts["linear_gelu"], counts["linear_of_parts"]) == expected_counts, fn.__name__
        for o, e in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(o, e, rtol=1e-6, atol=1e-5, msg=fn.__name__)


def _models_blocks_rewritten():
    """Each tiny model under Ulysses-2, eager, then with its blocks compiled by the rewriting backend: (relative
    error, rewrites per model)."""
    import fastusp
    from fastusp.testing import flux2_inputs, flux_inputs, qwen_inputs, tiny_flux, tiny_flux2, tiny_qwen

    results = {}
    for name, build, inputs in (("flux", tiny_flux, flux_inputs), ("flux2", tiny_flux2, flux2_inputs),
                                ("qwen", tiny_qwen, qwen_inputs)):
        counts = collections.Counter()
        model, kwargs = fastusp.parallelize(build(), ulysses=2), inputs(batch=1)
        with torch.no_grad():
            eager = model(**kwargs, return_dict=False)[0]
            fastusp.compile_pipeline(model, backend=_rewriting_backend(counts))
            compiled = model(**kwargs, return_dict=False)[0]
        results[name] = (((compiled - eager).norm() / eager.norm()).item(), dict(counts))
    return results


def test_the_models_blocks_have_the_patterns():
    # FLUX: the double-stream blocks' two feed-forwards, the single-stream MLP and its cat before proj_out;
    # FLUX.2: none (SwiGLU feed-forwards, and a SwiGLU output in its single-stream cat); Qwen-Image: its two
    # feed-forwards
    for results in run_distributed(_models_blocks_rewritten, 2):
        assert {name: counts for name, (_, counts) in results.items()} == {
            "flux": {"linear_gelu": 3, "linear_of_parts": 1}, "flux2": {},
            "qwen": {"linear_gelu": 2}}
        for name, (error, _) in results.items():
            assert error < 1e-6, name


def _inductor_traces_the_rewrites():
    """The single-stream tail compiled by Inductor with compile_pipeline's options (caches off: a hit would skip the
    pass): (output, eager output, the rewrites' functions that were traced)."""
    import torch._inductor.config as inductor_config

    from fastusp import gemm_rewrites
    from fastusp.compile import _inductor_options

    inductor_config.force_disable_caches = True
    traced = set()
    for name in ("linear_gelu", "linear_of_parts"):
        def traced_too(*args, _fn=getattr(gemm_rewrites, name), _name=name):
            traced.add(_name)
            return _fn(*args)
        setattr(gemm_rewrites, name, traced_too)
    x, attn = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        out = torch.compile(mlp, fullgraph=True, options=_inductor_options("default", True))(x, attn)
    return out, mlp(x, attn), sorted(traced)


def test_compile_pipelines_inductor_options_run_the_pass():
    [(out, expected, traced)] = run_distributed(_inductor_traces_the_rewrites, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert traced == ["linear_gelu", "linear_of_parts"]


def test_inductor_options_run_the_rewrites_keep_a_users_pass_and_skip_the_peak_memory_reorder():
    import torch._inductor.config as inductor_config

    from fastusp.compile import _inductor_options
    from fastusp.gemm_rewrites import GemmRewrites

    options = _inductor_options("default", True)
    assert isinstance(options["pre_grad_custom_pass"], GemmRewrites)
    assert options["reorder_for_peak_memory"] is False  # it serialized the head chunks' exchanges (compile.py)
    # config.patch, not pytest's monkeypatch: undoing that deletes the setting from Inductor's config for the
    # processes later tests fork
    with inductor_config.patch(pre_grad_custom_pass=print):
        assert "pre_grad_custom_pass" not in _inductor_options("default", True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLASLt's epilogue)")
def test_the_gelu_epilogue_is_the_tanh_gelu_on_cuda():
    from fastusp.gemm_rewrites import linear_gelu

    generator = torch.Generator("cuda").manual_seed(0)
    x, weight, bias = (torch.randn(*shape, device="cuda", generator=generator) for shape in ((2, 300, 256), (512, 256),
                                                                                             (512,)))
    weight /= 16
    up = F.linear(x, weight, bias)  # float32 (torch's default: no TF32)
    out = linear_gelu(x, weight, bias)
    tanh_error = (out - F.gelu(up, approximate="tanh")).abs().max().item()
    assert tanh_error < 1e-5 < (out - F.gelu(up)).abs().max().item()
    x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()  # bf16 as in the models: one rounding less
    expected = F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate="tanh")
    assert ((linear_gelu(x, weight, bias).float() - expected).norm() / expected.norm()).item() < 4e-3
