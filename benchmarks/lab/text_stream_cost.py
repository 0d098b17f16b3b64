"""Would a rank do less work if the text tokens sat on one rank instead of being split over all of them? Timed on
one GPU from the GEMMs of one stream of a double-stream block.

python benchmarks/lab/text_stream_cost.py [--rows 0,32,64,128,256,512,1024,1536,2048,2304,2560] [--reps 50]

A FLUX / Qwen-Image double-stream block has the same linear layers for its text stream and its image stream: q, k, v
and out (3072 -> 3072), the MLP (3072 -> 12288 with tanh GELU, 12288 -> 3072). fastusp splits both streams' tokens
evenly over the ranks, so with Qwen-Image's 128 text tokens each of 2 ranks runs those layers on 64 rows, which
reads all of the text stream's weights for little arithmetic. t(M) is one stream's layers on M rows (bf16, CUDA
graph replays, median), in microseconds per block; M = 0 launches nothing, as on a rank that holds no text.
The estimate (Qwen-Image, 60 double-stream blocks): per-rank time of the blocks' linear layers now (text and image split evenly) against
text on rank 0 with the image tokens moved so the slowest rank is fastest. Attention is left out (after the
all-to-all every rank attends all tokens with its heads either way), as are the norms and elementwise kernels, and
the all-to-alls, whose sizes would follow the uneven token counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modulation_cost import replay_ms  # noqa: E402

DIM, MLP = 3072, 12288
# model -> (double-stream blocks, text tokens, image tokens at 1024x1024). Qwen-Image only: FLUX's 38 single-stream
# blocks take text and image rows alike, so moving image tokens against text would unbalance them.
MODELS = {"qwen-image": (60, 128, 4096)}


def stream_layers(device):
    g = torch.Generator(device=device).manual_seed(0)
    w = lambda out, inp: torch.randn(out, inp, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    b = lambda out: torch.zeros(out, device=device, dtype=torch.bfloat16)
    return dict(qkv=[(w(DIM, DIM), b(DIM)) for _ in range(3)], out=(w(DIM, DIM), b(DIM)),
                up=(w(MLP, DIM), b(MLP)), down=(w(DIM, MLP), b(DIM)))


def one_stream(x, layers):
    for weight, bias in layers["qkv"]:
        F.linear(x, weight, bias)
    F.linear(x, *layers["out"])
    h = F.gelu(F.linear(x, *layers["up"]), approximate="tanh")
    return F.linear(h, *layers["down"])


def stream_us(rows: int, layers, reps: int, device) -> float:
    if rows == 0:
        return 0.0
    x = torch.randn(rows, DIM, device=device, dtype=torch.bfloat16)
    # ten blocks' worth per replay: launch gaps as inside a whole-step graph
    return replay_ms(lambda: [one_stream(x, layers) for _ in range(10)], reps) * 1000 / 10


def interpolate(table: dict[int, float], rows: float) -> float:
    if rows <= 0:
        return 0.0
    points = sorted(table.items())
    for (m0, t0), (m1, t1) in zip(points, points[1:]):
        if m0 <= rows <= m1:
            return t0 + (t1 - t0) * (rows - m0) / (m1 - m0)
    raise ValueError(f"{rows} rows is outside the timed range {points[0][0]}..{points[-1][0]}")


def estimate(table: dict[int, float], blocks: int, text: int, image: int, world: int) -> dict:
    """ms per step of the double-stream blocks' linear layers on the slowest rank: now, and with all text on rank 0
    and rank 0's image tokens cut by `moved` (spread over the others)."""
    even = blocks * (interpolate(table, text / world) + interpolate(table, image / world)) / 1000
    best, most = None, max(table)
    for moved in range(0, image // world, 8):
        if image / world + moved / (world - 1) > most:
            break
        rank0 = interpolate(table, text) + interpolate(table, image / world - moved)
        others = interpolate(table, image / world + moved / (world - 1))
        slowest = blocks * max(rank0, others) / 1000
        if best is None or slowest < best[0]:
            best = (slowest, moved)
    return dict(world=world, even_ms=round(even, 3), text_on_rank0_ms=round(best[0], 3), image_moved=best[1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="0,32,64,128,256,512,1024,1536,1792,2048,2304,2560,3072")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    device = torch.device("cuda")
    layers = stream_layers(device)
    card = torch.cuda.get_device_name(device)
    table = {m: stream_us(m, layers, a.reps, device) for m in (int(r) for r in a.rows.split(","))}
    print(json.dumps(dict(card=card, torch=torch.__version__, us_per_block_stream=table)), flush=True)
    for name, (blocks, text, image) in MODELS.items():
        for world in (2, 4):
            print(json.dumps(dict(card=card, model=name, **estimate(table, blocks, text, image, world))), flush=True)


if __name__ == "__main__":
    main()
