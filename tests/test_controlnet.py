"""Sharded ControlNets: each rank's residuals are its own image tokens' rows of the one-process residuals, for FLUX
ControlNets with a mode token (Union) and with a control-image hint block (XLabs style) as well as plain ones, and
Multi-ControlNet pipelines equal one process. (tests/test_pipelines.py runs the plain FLUX / Qwen-Image ControlNet
pipelines under Ulysses, Ring and cfg=2.)"""
import pytest
import torch

import fastusp
from _dist import run_distributed
from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs
from fastusp.sharding import split_sizes
from fastusp.testing import flux_inputs
from fastusp.testing import randomize_controlnet_outputs, tiny_call_kwargs, tiny_flux_pipeline

VARIANTS = {"plain": {}, "union": {"num_mode": 3}, "hint": {"conditioning_embedding_channels": 16}}
HEIGHT, WIDTH, TEXT = 3, 5, 5  # 15 image tokens and 5 text tokens: uneven over 2 ranks


def tiny_flux_controlnet(variant: str, seed: int = 2):
    """One block of each kind, with random (not zero) output layers so the residuals are not zero. The hint block
    turns an 8x larger control image into one token per latent pixel (tiny_flux: patch size 1, 16 channels)."""
    from diffusers import FluxControlNetModel

    config = dict(tiny_flux_pipeline().transformer.config, num_layers=1, num_single_layers=1, **VARIANTS[variant])
    torch.manual_seed(seed)
    net = FluxControlNetModel.from_config(config)
    randomize_controlnet_outputs(net)
    return net.eval()


def controlnet_inputs(variant: str) -> dict:
    g = torch.Generator().manual_seed(6)
    inputs = flux_inputs(batch=2, height=HEIGHT, width=WIDTH, text_len=TEXT)
    cond = torch.rand(2, 3, 8 * HEIGHT, 8 * WIDTH, generator=g) if variant == "hint" else \
        torch.randn(2, HEIGHT * WIDTH, 16, generator=g)
    mode = torch.tensor([[1], [2]]) if variant == "union" else None
    # distinct text positions (pipelines pass zeros): the Union mode token takes the first one's, so a rank that
    # kept its own copy of the mode token instead of rank 0's would rotate it differently
    txt_ids = torch.arange(TEXT, dtype=torch.float32)[:, None].expand(TEXT, 3).contiguous()
    return dict(inputs, txt_ids=txt_ids, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=0.8,
                return_dict=False)


def _residuals(variant: str, degrees: dict | None):
    from diffusers import FluxControlNetPipeline

    pipe = FluxControlNetPipeline.from_pipe(tiny_flux_pipeline(), controlnet=tiny_flux_controlnet(variant))
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    with torch.no_grad():
        double, single = pipe.controlnet(**controlnet_inputs(variant))
    return list(double) + list(single)


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2)], ids=["ulysses2", "ring2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_sharded_controlnet_gives_each_rank_its_rows_of_the_residuals(variant, degrees):
    expected = _residuals(variant, None)
    for rank, residuals in enumerate(run_distributed(_residuals, 2, variant, degrees)):
        sizes = split_sizes(HEIGHT * WIDTH, 2)
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        assert len(residuals) == len(expected) == 2
        for got, full in zip(residuals, expected):
            assert got.shape[1] == sizes[rank]  # sharded: only this rank's image tokens were computed
            assert ((got - full[:, rows]).norm() / full[:, rows].norm()).item() < 1e-4


def _multi_controlnet_pipeline(one_net_twice: bool = False):
    """A Multi-ControlNet of a plain and a Union net, or of one Union net used with two control images."""
    from diffusers import FluxControlNetPipeline

    union = tiny_flux_controlnet("union", seed=3)
    nets = [union, union] if one_net_twice else [tiny_flux_controlnet("plain", seed=2), union]
    return FluxControlNetPipeline.from_pipe(tiny_flux_pipeline(), controlnet=nets)


def _multi_call(pipe, scales=(1.0, 0.7), one_net_twice: bool = False) -> torch.Tensor:
    images = [torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    return pipe(**tiny_call_kwargs(pipe), control_image=images, control_mode=[2 if one_net_twice else None, 1],
                controlnet_conditioning_scale=list(scales), height=32, width=48, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def _generate_multi(degrees: dict | None = None, scales=(1.0, 0.7), one_net_twice: bool = False) -> torch.Tensor:
    pipe = _multi_controlnet_pipeline(one_net_twice)
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    return _multi_call(pipe, scales, one_net_twice)


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2)], ids=["ulysses2", "ring2"])
def test_multi_controlnet_pipeline_matches_one_process(degrees):
    expected = _generate_multi()
    # precondition: the second (Union) ControlNet moves the result, so it must be sharded right too
    assert ((_generate_multi(scales=(1.0, 0.0)) - expected).norm() / expected.norm()).item() > 1e-2
    for out in run_distributed(_generate_multi, 2, degrees):
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def _from_pipe_controlnet(degrees: dict | None = None) -> torch.Tensor:
    from diffusers import FluxControlNetPipeline

    base = tiny_flux_pipeline()
    if degrees:
        fastusp.parallelize(base, **degrees)
    pipe = FluxControlNetPipeline.from_pipe(base, controlnet=tiny_flux_controlnet("plain"))
    if degrees:  # the transformer is parallelized already: only the pipeline's parts, its ControlNet among them
        fastusp.parallelize(pipe, **degrees)
        assert pipe.controlnet._fastusp_config is pipe.transformer._fastusp_config
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    return pipe(**tiny_call_kwargs(pipe), control_image=image, height=32, width=48, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_a_controlnet_pipeline_made_with_from_pipe_shards_its_controlnet():
    expected = _from_pipe_controlnet()
    for out in run_distributed(_from_pipe_controlnet, 2, dict(ulysses=2)):
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def test_a_controlnet_whose_heads_ulysses_cannot_split_is_refused_before_anything_changes():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base = tiny_flux_pipeline()
    net = FluxControlNetModel.from_config(dict(base.transformer.config, num_layers=1, num_single_layers=1,
                                               num_attention_heads=3))
    pipe = FluxControlNetPipeline.from_pipe(base, controlnet=net)
    with pytest.raises(ValueError, match=r"ulysses \(2\) must divide the number of attention heads \(3\)"):
        fastusp.parallelize(pipe, ulysses=2)  # raised before any process group is needed
    assert getattr(pipe.transformer, "_fastusp_config", None) is None


def _compiled_union_pipeline(degrees: dict | None):
    from diffusers import FluxControlNetPipeline

    pipe = FluxControlNetPipeline.from_pipe(tiny_flux_pipeline(), controlnet=tiny_flux_controlnet("union"))
    if degrees:
        fastusp.parallelize(pipe, **degrees)
        # Dynamo traces every block, the ControlNet's too (fullgraph); aot_eager keeps CI fast (Inductor on this
        # pipeline takes a minute of CPU; it matched to 8e-8 when run by hand)
        fastusp.compile_pipeline(pipe, backend="aot_eager")
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    out = pipe(**tiny_call_kwargs(pipe), control_image=image, control_mode=1, height=32, width=48,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    return out, fastusp.compile_report(pipe) if degrees else None


def test_compile_pipeline_compiles_the_controlnet_blocks_too():
    expected, _ = _compiled_union_pipeline(None)
    for out, report in run_distributed(_compiled_union_pipeline, 2, dict(ulysses=2)):
        assert "FluxControlNetModel blocks" in report.compiled and not report.fell_back
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def _graphed_multi_controlnet(degrees: dict, one_net_twice: bool):
    """_generate_multi with every forward under fastusp's CUDA-graph wrappers, capture replaced as in
    tests/_fake_graphs.py. Returns the latents and the (captures, replays) counts."""
    from fastusp import compile as fastusp_compile

    counts = {}
    fake_cuda_graphs(counts)
    pipe = _multi_controlnet_pipeline(one_net_twice)
    fastusp.parallelize(pipe, **degrees)
    report = compile_as_on_cuda(pipe.transformer)
    fastusp_compile.compile_controlnets(fastusp_compile.controlnets(pipe), pipe.transformer, report,
                                        reorder_comm=True, backend=None)
    with torch.no_grad():
        out = _multi_call(pipe, one_net_twice=one_net_twice)
    return out, counts


@pytest.mark.parametrize("one_net_twice", [False, True], ids=["two_nets", "one_net_twice"])
def test_cuda_graphs_capture_each_controlnet_and_replay_it_with_new_inputs(one_net_twice):
    # two steps: the transformer and each ControlNet are captured in the first, and every call replays them (a
    # capture is followed by its first replay), with that call's latents, timestep and control image copied in; the
    # residuals leave each ControlNet's graph as lists of tensors. One net used for two control images is wrapped
    # once (wrapped twice, its graph's replay would run inside the outer graph's capture: 5 captures here); its two
    # conditioning scales are two Python values, hence two graphs of it.
    expected = _generate_multi(one_net_twice=one_net_twice)
    for out, counts in run_distributed(_graphed_multi_controlnet, 2, dict(ulysses=2), one_net_twice):
        assert counts == {"captures": 3, "replays": 6}
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4


def _controlnet_pipeline_from_a_compiled_one(degrees: dict | None):
    """A FluxPipeline (parallelized with degrees, if any) compiled, then a ControlNet pipeline made from it with
    from_pipe, parallelized and compiled the same way. Returns its latents and what compile_pipeline did."""
    from diffusers import FluxControlNetPipeline

    base = tiny_flux_pipeline()
    if degrees:
        fastusp.parallelize(base, **degrees)
    from fastusp._forward import own_forward

    fastusp.compile_pipeline(base, backend="aot_eager")
    compiled_blocks = own_forward(base.transformer.transformer_blocks[0])
    pipe = FluxControlNetPipeline.from_pipe(base, controlnet=tiny_flux_controlnet("union"))
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    fastusp.compile_pipeline(pipe, backend="aot_eager")
    try:  # nothing new now
        fastusp.compile_pipeline(pipe, backend="aot_eager")
        refused = False
    except ValueError as e:
        refused = "already applied" in str(e)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    out = pipe(**tiny_call_kwargs(pipe), control_image=image, control_mode=1, height=32, width=48,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    net_block = pipe.controlnet.transformer_blocks[0]
    net_compiled = getattr(own_forward(net_block), "__func__", None) is not type(net_block).forward  # not the class's
    return out, dict(controlnet_compiled=net_compiled,
                     transformer_kept=own_forward(base.transformer.transformer_blocks[0]) is compiled_blocks,
                     reported="FluxControlNetModel blocks" in fastusp.compile_report(pipe).compiled,
                     refused_again=refused)


def test_compile_pipeline_on_a_controlnet_pipeline_made_from_a_compiled_one_compiles_its_controlnet():
    # from_pipe shares the compiled transformer: compile_pipeline on the new pipeline compiles the ControlNet it
    # brings (before, it raised "already applied" and the ControlNet stayed eager), and only that
    expected, _ = _compiled_union_pipeline(None)  # the same Union ControlNet and call, one process, not compiled
    done = dict(controlnet_compiled=True, transformer_kept=True, reported=True, refused_again=True)
    out, what = _controlnet_pipeline_from_a_compiled_one(None)
    assert what == done
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    for out, what in run_distributed(_controlnet_pipeline_from_a_compiled_one, 2, dict(ulysses=2)):
        assert what == done
        assert ((out - expected).norm() / expected.norm()).item() < 1e-4
