"""The lab scripts (benchmarks/lab/): the arithmetic their one-question measurements rest on."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "lab"))


def _kernel(name, start_us, dur_us):
    return {"cat": "kernel", "name": name, "ts": start_us, "dur": dur_us}


def test_graph_gemm_gaps_pairs_each_kernel_with_the_gap_before_it():
    from graph_gemm_gaps import gaps_by_kernel
    # one stream: norm 0-10, gemm 19-79 (gap 9), gemm 80-140 (gap 1), gelu 140-150 (gap 0); host events ignored
    trace = {"traceEvents": [_kernel("triton_norm", 0, 10), _kernel("nvjet_coopA", 80, 60),
                             _kernel("nvjet_coopA", 19, 60), _kernel("triton_gelu", 140, 10),
                             {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]}
    assert gaps_by_kernel(trace) == {"nvjet_coopA": [(9, 60), (1, 60)], "triton_gelu": [(0, 10)]}


def test_masked_attention_benchmark_agrees_with_the_biased_call():
    # the masked-attention micro-benchmark on CPU, eager, tiny: every variant but "unmasked" equals the biased call
    from masked_attention import main

    records = main(["--tokens", "40", "--text", "8", "--head-dim", "16", "--cases", "2:2", "1:4", "--no-compile",
                    "--device", "cpu"])
    assert {(r["kind"], r["ranks"]) for r in records} == {(k, n) for k in ("biased", "text_keys_apart", "unmasked")
                                                          for n in (2, 4)}
    for r in records:
        assert r["us"] > 0
        assert (r["rel_err_vs_biased"] < 1e-5) == (r["kind"] != "unmasked")


def test_modulation_cost_shares_are_every_blocks_modulation_once():
    # modulation_cost.py times "share W rank r" as what rank r computes under shared modulation: over the ranks of a
    # world, those shares must be every block's modulation, each once, in the order the all-gather lays them out
    import torch
    from diffusers import QwenImageTransformer2DModel
    from modulation_cost import fake_context, streams_of

    from fastusp.modulation import _STREAM_KINDS, SharedModulation

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(num_layers=5, attention_head_dim=16, num_attention_heads=4,
                                        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    temb = torch.randn(2, 64)
    with torch.no_grad():
        every = {id(m): _STREAM_KINDS[type(m)][1](m, temb) for block in model.transformer_blocks
                 for m in (block.img_mod, block.txt_mod)}
        for world in (1, 2, 4):
            shared = SharedModulation(model, streams_of(model), fake_context(world))
            order = [m for indices in shared.owned for i in indices for m in shared.blocks[i][1]]
            assert sorted(map(id, order)) == sorted(every)
            gathered = torch.cat([shared.local(temb, rank) for rank in range(world)])
            torch.testing.assert_close(gathered, torch.cat([every[id(m)].reshape(-1) for m in order]))


def test_text_stream_estimate_moves_image_tokens_only_when_text_rows_cost_a_floor():
    # text_stream_cost.py's estimate: all text on rank 0 pays off when a stream's layers cost a floor however few
    # rows they get (reading the weights), and not when their time is proportional to the rows
    from text_stream_cost import estimate

    rows = [0, 32, 64, 128, 1024, 2048, 3072]
    linear = {m: float(m) for m in rows}
    floor = {m: (100.0 + m if m else 0.0) for m in rows}
    proportional = estimate(linear, blocks=60, text=128, image=4096, world=2)
    assert proportional["text_on_rank0_ms"] == proportional["even_ms"] == 60 * (64 + 2048) / 1000
    with_floor = estimate(floor, blocks=60, text=128, image=4096, world=2)
    assert with_floor["even_ms"] == 60 * (164 + 2148) / 1000
    assert with_floor["image_moved"] == 112 and with_floor["text_on_rank0_ms"] == 60 * (228 + 2148 - 112) / 1000
