"""Ring attention, the LSE merge, the Ulysses all-to-all and the uneven gather, against single-device math."""
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _dist import run_distributed
from fastusp.attention.local import attention_text_keys_apart, attention_with_lse
from fastusp.attention.merge import merge_attention
from fastusp.attention.ring import ring_attention
from fastusp.distributed.gather import gather_seq
from fastusp.distributed import ulysses as a2a
from fastusp.sharding import SeqLayout, split_sizes


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_split_sizes_cover_length_unevenly():
    assert split_sizes(10, 4) == [3, 3, 2, 2]
    assert split_sizes(3, 4) == [1, 1, 1, 0]
    assert sum(split_sizes(4097, 8)) == 4097


def test_attention_with_lse_matches_logsumexp_of_scores():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bias = torch.zeros(2, 7)
    bias[1, 4:] = -1e30
    out, lse = attention_with_lse(q, k, v, bias)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5 + bias[:, None, None, :]
    assert rel_err(lse, torch.logsumexp(scores, -1)) < 1e-6
    assert rel_err(out, torch.softmax(scores, -1) @ v) < 1e-6


def test_merge_of_key_blocks_equals_full_attention():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    out = lse = None
    for start, stop in [(0, 4), (4, 5), (5, 11)]:  # uneven blocks, one of a single key
        out, lse = merge_attention(out, lse, *attention_with_lse(q, k[:, :, start:stop], v[:, :, start:stop]))
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-6


def test_merge_ignores_a_fully_masked_block():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    bias = torch.tensor([[0.0, 0.0, 0.0] + [torch.finfo(torch.float32).min / 2] * 3])
    out, lse = merge_attention(None, None, *attention_with_lse(q, k[:, :, :3], v[:, :, :3]))
    out, lse = merge_attention(out, lse, *attention_with_lse(q, k[:, :, 3:], v[:, :, 3:], bias[:, 3:]))
    assert torch.isfinite(out).all()
    assert rel_err(out, F.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3])) < 1e-6


@pytest.mark.parametrize("text_lens, image_lens", [([2, 3], [5, 4]), ([3, 0, 1, 1], [2, 2, 3, 2])])
def test_text_keys_apart_equals_one_masked_call(text_lens, image_lens):
    # keys [text_0, image_0, text_1, image_1, ...]; batch 1 masks its first text chunk whole and the last text key
    total = sum(text_lens) + sum(image_lens)
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, total, 8), torch.randn(2, 3, total, 8)
    bias = torch.zeros(2, total)
    bias[1, :text_lens[0]] = bias[1, total - image_lens[-1] - 1] = torch.finfo(torch.float32).min / 2
    out = attention_text_keys_apart(q, k, v, bias, text_lens, image_lens)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])) < 1e-6
    assert rel_err(out[1], F.scaled_dot_product_attention(q, k, v)[1]) > 1e-2  # the mask mattered


def test_text_keys_apart_without_text_tokens():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    out = attention_text_keys_apart(q, k, v, torch.zeros(1, 7), [0, 0], [3, 4])
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-6


@pytest.mark.parametrize("dynamic", [False, True])
def test_cudnn_check_traces_without_graph_break(dynamic):
    # compiled Ulysses asks it inside the graph (text keys apart); with symbolic shapes too, as a user's own
    # torch.compile may trace them
    from fastusp.attention.local import _cudnn_usable

    check = torch.compile(lambda q: q * 2 if _cudnn_usable(q, q, q) else q + 1, fullgraph=True, dynamic=dynamic)
    for seq in (5, 9):
        q = torch.randn(1, 2, seq, 16)
        assert torch.equal(check(q), q + 1)  # no cuDNN on CPU


def _ring_worker(q, k, v, text_bias, lens, text_lens):
    rank, starts = dist.get_rank(), [sum(lens[:i]) for i in range(len(lens))]
    mine = slice(starts[rank], starts[rank] + lens[rank])
    kv = torch.stack([k[:, :, mine], v[:, :, mine]]).permute(3, 0, 1, 2, 4).contiguous()  # [S, 2, B, H, D]
    return ring_attention(q[:, :, mine], kv, lens, dist.group.WORLD, text_bias, text_lens)


@pytest.mark.parametrize("lens, text_lens", [([4, 4], [2, 1]), ([5, 3, 4], [0, 2, 1]), ([3, 1, 2, 2], [2, 0, 1, 1])])
@pytest.mark.parametrize("masked", [False, True])
def test_ring_attention_equals_full_attention(lens, text_lens, masked):
    """Every chunk's keys are [its text keys | its image keys]; with a mask only text keys are masked."""
    total = sum(lens)
    q, k, v = torch.randn(2, 3, total, 8), torch.randn(2, 3, total, 8), torch.randn(2, 3, total, 8)
    text_bias = key_bias = None
    if masked:  # batch 1 masks the first text key and a whole chunk's text: the last chunk's
        text_bias = torch.zeros(2, sum(text_lens))
        text_bias[1, 0] = text_bias[1, -text_lens[-1]:] = torch.finfo(torch.float32).min / 2
        starts = [sum(lens[:r]) for r in range(len(lens))]
        text_keys = [key for start, t in zip(starts, text_lens) for key in range(start, start + t)]
        key_bias = torch.zeros(2, total).index_copy(1, torch.tensor(text_keys), text_bias)
    outs = run_distributed(_ring_worker, len(lens), q, k, v, text_bias, lens, text_lens)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_bias is None else key_bias[:, None, None, :])
    assert rel_err(torch.cat(outs, dim=2), ref) < 1e-5
    if masked:  # the mask mattered
        assert rel_err(torch.cat(outs, dim=2), F.scaled_dot_product_attention(q, k, v)) > 1e-2


def seq_to_head(tensors, lens, chunks, fp8=False):
    """Every head chunk's [S, n, B, hc, D] after the q/k/v all-to-all over the world group."""
    sends = a2a.pack_head_chunks(tensors, dist.get_world_size(), chunks)
    in_flight = [a2a.start_seq_to_head(s, lens, dist.group.WORLD, fp8) for s in sends]
    return [a2a.finish_seq_to_head(a2a.wait(x), s, tensors[0].dtype, fp8) for s, x in zip(sends, in_flight)]


def _all_to_all_worker(xs_per_rank, lens, chunks):
    rank = dist.get_rank()
    q, k = xs_per_rank[0][rank], xs_per_rank[1][rank]
    received = seq_to_head([q, k], lens, chunks)
    returning = [a2a.start_head_to_seq(r[:, 1].permute(1, 2, 0, 3), lens, rank, dist.group.WORLD) for r in received]
    back = a2a.join_head_chunks([a2a.wait(x) for x in returning], q.shape[0], q.shape[1], len(lens), q.shape[3],
                                q.dtype)
    return received, back


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("grad", [True, False])  # no grad: the calls below torch's autograd wrapper
def test_ulysses_all_to_all_round_trip_with_uneven_chunks(chunks, grad):
    lens, heads = [3, 2, 2, 1], 8
    q_full, k_full = torch.randn(2, sum(lens), heads, 4), torch.randn(2, sum(lens), heads, 4)
    split = lambda x: list(x.split(lens, dim=1))
    with torch.set_grad_enabled(grad):  # forked workers inherit the grad mode
        outs = run_distributed(_all_to_all_worker, 4, (split(q_full), split(k_full)), lens, chunks)
    hc = heads // 4 // chunks
    for rank, (received, back) in enumerate(outs):
        assert len(received) == chunks
        for j, packed in enumerate(received):
            heads_of_chunk = slice(2 * rank + j * hc, 2 * rank + (j + 1) * hc)
            # seq -> head shard: every token, this rank's heads of chunk j, sequence-major [S, n, B, hc, D]
            assert torch.equal(packed[:, 0], q_full[:, :, heads_of_chunk].permute(1, 0, 2, 3))
            assert torch.equal(packed[:, 1], k_full[:, :, heads_of_chunk].permute(1, 0, 2, 3))
        # head -> seq shard returns this rank's tokens with all heads, in order
        assert torch.equal(back, split(k_full)[rank])


def _python_autograd_frames_worker(x):
    """Frames of torch's Python autograd wrappers entered by one eager exchange under no_grad."""
    entered = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(("_library/autograd.py", "_library\\autograd.py")):
            entered.append(frame.f_code.co_name)

    with torch.no_grad():
        sys.setprofile(watch)
        try:
            a2a.wait(a2a.start_seq_to_head(a2a.pack_head_chunks([x, x], 2, 1)[0], [3, 3], dist.group.WORLD))
        finally:
            sys.setprofile(None)
    return entered


def test_eager_inference_exchange_skips_pythons_autograd_wrapper():
    # torch 2.13 registers the functional collectives' autograd in Python: host time on two calls per layer
    assert run_distributed(_python_autograd_frames_worker, 2, torch.randn(1, 3, 4, 2)) == [[], []]


def _gather_worker(parts):
    return gather_seq(parts[dist.get_rank()], [p.shape[1] for p in parts], dist.group.WORLD, dim=1)


def test_gather_seq_uneven():
    full = torch.randn(2, 7, 3)
    parts = list(full.split([3, 2, 2], dim=1))
    for out in run_distributed(_gather_worker, 3, parts):
        assert torch.equal(out, full)


def test_key_bias_follows_the_global_key_order():
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    layout = SeqLayout.even(text_len=5, image_len=4, world=2).with_text_mask(mask, torch.float32)  # text [3, 2]
    # rank 0: text 0..2 (kept), image x2; rank 1: text 3..4 (padding), image x2
    assert (layout.key_bias[0] == 0).tolist() == [True, True, True, True, True, False, False, True, True]
    assert (layout.text_bias[0] == 0).tolist() == [True, True, True, False, False]  # the text keys alone
