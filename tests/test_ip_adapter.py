"""FLUX with an IP-Adapter (diffusers' FluxIPAdapterAttnProcessor in the double-stream blocks): parallel == one
process, at the transformer and through FluxPipeline with true CFG. The adapter's weights are random (nothing can be
downloaded) and loaded through diffusers' own loader, as load_ip_adapter does."""
import pytest
import torch

import fastusp
from _dist import run_distributed
from _fake_graphs import compile_as_on_cuda, fake_cuda_graphs
from fastusp.testing import flux_inputs, random_ip_adapter_state_dict, tiny_flux
from fastusp.testing import prompt_kwargs, tiny_flux_pipeline

CLIP_DIM = 20  # the image encoder's width


def tiny_flux_with_ip_adapter():
    model = tiny_flux()
    model._load_ip_adapter_weights(random_ip_adapter_state_dict(model, CLIP_DIM), low_cpu_mem_usage=False)
    return model


def image_embeds(batch: int = 1, seed: int = 4) -> list[torch.Tensor]:
    """One adapter's image embeddings, [batch, images, CLIP_DIM], as the pipeline passes them."""
    return [torch.randn(batch, 1, CLIP_DIM, generator=torch.Generator().manual_seed(seed))]


def _forward(model, inputs, embeds):
    with torch.no_grad():  # the forward pops the embeds out of joint_attention_kwargs: a fresh dict per call
        return model(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, return_dict=False)[0]


def _parallel_forward(inputs, embeds, degrees):
    model = tiny_flux_with_ip_adapter()
    fastusp.parallelize(model, **degrees)
    return _forward(model, inputs, embeds)


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(ring=2), dict(ulysses=2, ring=2)],
                         ids=["u2", "r2", "u2r2"])
def test_ip_adapter_transformer_matches_one_process(degrees):
    inputs = flux_inputs(batch=2, height=3, width=5, text_len=5)  # 15 image tokens: uneven over 2 and 4 ranks
    embeds = image_embeds(batch=2)
    ref = _forward(tiny_flux_with_ip_adapter(), inputs, embeds)
    # precondition: the adapter changes the output, so a processor that dropped it would fail below
    other = _forward(tiny_flux_with_ip_adapter(), inputs, image_embeds(batch=2, seed=5))
    assert ((other - ref).norm() / ref.norm()).item() > 1e-2
    for out in run_distributed(_parallel_forward, degrees.get("ulysses", 1) * degrees.get("ring", 1), inputs, embeds,
                               degrees):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def ip_pipeline():
    pipe = tiny_flux_pipeline()
    state_dict = random_ip_adapter_state_dict(pipe.transformer, CLIP_DIM)
    pipe.transformer._load_ip_adapter_weights(state_dict, low_cpu_mem_usage=False)
    return pipe


def _generate(pipe, degrees=None):
    if degrees:
        fastusp.parallelize(pipe, **degrees)
    prompts = prompt_kwargs(pipe, text_len=7)
    negative = prompt_kwargs(pipe, text_len=7, seed=1)
    return pipe(**prompts, negative_prompt_embeds=negative["prompt_embeds"],
                negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], true_cfg_scale=3.0,
                ip_adapter_image_embeds=image_embeds(), negative_ip_adapter_image_embeds=image_embeds(seed=6),
                height=32, width=48, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.mark.parametrize("degrees", [dict(ulysses=2), dict(cfg=2)], ids=["u2", "cfg2"])
def test_ip_adapter_pipeline_with_true_cfg_matches_one_process(degrees):
    ref = _generate(ip_pipeline())
    for out in run_distributed(_generate, 2, ip_pipeline(), degrees):
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def _change_processors_after_parallelize():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_flux()
    fastusp.parallelize(model, ulysses=2)
    with pytest.raises(ValueError, match="before calling fastusp.parallelize"):
        model._load_ip_adapter_weights(random_ip_adapter_state_dict(model, CLIP_DIM), low_cpu_mem_usage=False)
    with pytest.raises(ValueError, match="before fastusp.parallelize"):  # what unload_ip_adapter does, and users
        model.set_attn_processor(FluxAttnProcessor())
    return {type(p).__name__ for p in model.attn_processors.values()}


def test_changing_processors_after_parallelize_is_refused_and_changes_nothing():
    for names in run_distributed(_change_processors_after_parallelize, 2):
        assert names == {"FastUSPFluxAttnProcessor"}


def _eager_then_compiled(inputs, embeds):
    model = fastusp.parallelize(tiny_flux_with_ip_adapter(), ulysses=2)
    eager = _forward(model, inputs, embeds)
    fastusp.compile_pipeline(model)  # Inductor on CPU; the IP-Adapter's processor sits inside the compiled blocks
    return eager, _forward(model, inputs, embeds), fastusp.compile_report(model).fell_back


def test_ip_adapter_compiled_matches_one_process():
    inputs, embeds = flux_inputs(batch=2, height=3, width=5, text_len=5), image_embeds(batch=2)
    ref = _forward(tiny_flux_with_ip_adapter(), inputs, embeds)
    for eager, compiled, fell_back in run_distributed(_eager_then_compiled, 2, inputs, embeds, timeout=600):
        assert fell_back == {}
        for out in (eager, compiled):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _ip_scales(model) -> tuple:
    return tuple(tuple(p.scale) for p in model.attn_processors.values() if hasattr(p, "scale"))


def _graphed_then_rescaled(inputs, embeds):
    """Ulysses-2, blocks compiled (Dynamo, backend "eager") inside fake CUDA graphs (tests/_fake_graphs.py, whose
    replays check the IP-Adapter scales they were captured with); outputs at scale 1, then 0.3."""
    pipe = ip_pipeline()
    fastusp.parallelize(pipe, ulysses=2)
    counts = {}
    fake_cuda_graphs(counts, lambda: _ip_scales(pipe.transformer))
    compile_as_on_cuda(pipe.transformer, backend="eager")
    outs = [_forward(pipe.transformer, inputs, embeds)]
    pipe.set_ip_adapter_scale(0.3)
    outs.append(_forward(pipe.transformer, inputs, embeds))
    return outs, counts["captures"]


def test_set_ip_adapter_scale_after_compile_takes_effect():
    # the scale is a Python float inside the processors: a graph captured at scale 1 must not be replayed at 0.3
    inputs, embeds = flux_inputs(batch=1, height=3, width=5, text_len=5), image_embeds()
    pipe = ip_pipeline()
    refs = [_forward(pipe.transformer, inputs, embeds)]
    pipe.set_ip_adapter_scale(0.3)
    refs.append(_forward(pipe.transformer, inputs, embeds))
    assert ((refs[1] - refs[0]).norm() / refs[0].norm()).item() > 1e-2  # precondition: the scale matters
    for outs, captures in run_distributed(_graphed_then_rescaled, 2, inputs, embeds, timeout=300):
        assert captures == 2
        for out, ref in zip(outs, refs):
            assert ((out - ref).norm() / ref.norm()).item() < 1e-4
