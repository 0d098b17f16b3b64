"""1 GPU: FLUX's pre-attention work at 2-GPU per-rank size (2304 tokens, 24 heads x 128): RMSNorm of q and k, RoPE,
and the pack into Ulysses' send buffers (U=2, 2 head chunks), timed inside CUDA graphs: the torch ops compiled by
Inductor (v0, what fastusp ran before fastusp/processors/norm_rope_pack.py), a pairwise RoPE formulation (v1), a
plain copy (the memory-bound floor), and Triton prototypes (v2: the landed kernel's math for one stream, with 4, 8
or 16 warps; v4: a 3D-block variant, slower; a variant that loads each element's RoPE partner
    separately instead of splitting pairs took 89-96 us). Also the single block's gelu + cat + join kernel.
Results: benchmarks/results/2026-11-28-norm-rope-pack.md.
    PYTHONPATH=<diffusers> python3 benchmarks/norm_rope_pack_prototypes.py    (from the repository root)"""
import sys, os
sys.path.insert(0, os.getcwd())
import torch
import triton
import triton.language as tl

from diffusers.models.embeddings import apply_rotary_emb
from fastusp.distributed.ulysses import pack_head_chunks, join_head_chunks
from graph_timing import graph_time_us

dev = torch.device("cuda")
B, S, H, D, U, C = 1, 2304, 24, 128, 2, 2
bf = torch.bfloat16


def timed(fn):
    return graph_time_us(fn, iters=50, repeats=5)


norm_q = torch.nn.RMSNorm(D, eps=1e-6).to(dev, bf); norm_k = torch.nn.RMSNorm(D, eps=1e-6).to(dev, bf)
with torch.no_grad():
    norm_q.weight.uniform_(0.5, 1.5); norm_k.weight.uniform_(0.5, 1.5)
q_raw, k_raw, v_raw = (torch.randn(B, S, H * D, device=dev, dtype=bf) for _ in range(3))
pos = torch.arange(S, device=dev, dtype=torch.float32)[:, None] * torch.logspace(0, -4, D // 2, device=dev)[None]
cos = pos.cos().repeat_interleave(2, -1).contiguous(); sin = pos.sin().repeat_interleave(2, -1).contiguous()


def v0(q, k, v):  # main's math (processors/flux.py joint_usp_attention + usp_attention's pack)
    q = norm_q(q.unflatten(-1, (-1, D))); k = norm_k(k.unflatten(-1, (-1, D))); v = v.unflatten(-1, (-1, D))
    q = apply_rotary_emb(q, (cos, sin), sequence_dim=1); k = apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    return pack_head_chunks([q, k, v], U, C)


def rope_pairs(x, cos, sin):
    e, o = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    ce, co = cos.unflatten(-1, (-1, 2)).unbind(-1); se, so = sin.unflatten(-1, (-1, 2)).unbind(-1)
    ce, co, se, so = (t[None, :, None, :] for t in (ce, co, se, so))
    return torch.stack([e * ce - o * se, o * co + e * so], -1).flatten(-2).to(x.dtype)


def v1(q, k, v):  # RoPE over pairs, no rotated copy
    q = norm_q(q.unflatten(-1, (-1, D))); k = norm_k(k.unflatten(-1, (-1, D))); v = v.unflatten(-1, (-1, D))
    return pack_head_chunks([rope_pairs(q, cos, sin), rope_pairs(k, cos, sin), v], U, C)


def copy_only(q, k, v):
    return pack_head_chunks([t.unflatten(-1, (-1, D)) for t in (q, k, v)], U, C)


@triton.jit
def _norm_rope_pack(q, k, v, wq, wk, cos, sin, out, eps, seq, heads, hc, chunks,
                    x_b, x_s, o_c, o_u, o_s, o_n, o_b, c_s,
                    BLOCK_H: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1)  # 0 q, 1 k, 2 v
    b = pid // seq
    s = pid % seq
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    mask = h < heads
    src = q
    w = wq
    if t == 1:
        src = k
        w = wk
    if t == 2:
        src = v
    x = tl.load(src + b * x_b + s * x_s + h * D + d, mask=mask, other=0.0).to(tl.float32)
    if t < 2:
        ms = tl.sum(x * x, axis=1) / D
        x = x * tl.rsqrt(ms + eps)[:, None] * tl.load(w + d).to(tl.float32)
        x = x.to(out.dtype.element_ty).to(tl.float32)  # the norm's output dtype, as eager
        e, o = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
        dd = tl.arange(0, D)
        ce, co = tl.split(tl.reshape(tl.load(cos + s * c_s + dd), (D // 2, 2)))
        se, so = tl.split(tl.reshape(tl.load(sin + s * c_s + dd), (D // 2, 2)))
        x = tl.reshape(tl.join(e * ce[None, :] - o * se[None, :], o * co[None, :] + e * so[None, :]), (BLOCK_H, D))
    j = (h // hc) % chunks
    u = h // (hc * chunks)
    i = h % hc
    dst = out + j * o_c + u * o_u + s * o_s + t * o_n + b * o_b + i * D + d
    tl.store(dst, x.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_pack4(q, k, v, wq, wk, cos, sin, out, eps, seq, heads, hc, chunks,
                     x_b, x_s, o_c, o_u, o_s, o_n, o_b, c_s,
                     BLOCK_H: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1)  # 0 q, 1 k, 2 v
    b = pid // seq
    s = pid % seq
    h = tl.arange(0, BLOCK_H)[:, None, None]
    p = tl.arange(0, D // 2)[None, :, None]
    e = tl.arange(0, 2)[None, None, :]
    d = p * 2 + e
    mask = h < heads
    src = q
    w = wq
    if t == 1:
        src = k
        w = wk
    if t == 2:
        src = v
    x = tl.load(src + b * x_b + s * x_s + h * D + d, mask=mask, other=0.0).to(tl.float32)
    if t < 2:
        rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / D + eps)[:, None, None]
        x = (x * rstd * tl.load(w + d).to(tl.float32)).to(out.dtype.element_ty).to(tl.float32)
        xe, xo = tl.split(x)
        ce, co = tl.split(tl.load(cos + s * c_s + d))
        se, so = tl.split(tl.load(sin + s * c_s + d))
        x = tl.join(xe * ce - xo * se, xo * co + xe * so)
    j = (h // hc) % chunks
    u = h // (hc * chunks)
    i = h % hc
    dst = out + j * o_c + u * o_u + s * o_s + t * o_n + b * o_b + i * D + d
    tl.store(dst, x.to(out.dtype.element_ty), mask=mask)


def make_v(kernel, warps):
    def run(q, k, v):
        hc = H // (U * C)
        out = torch.empty(C, U, S, 3, B, hc, D, device=dev, dtype=bf)
        kernel[(B * S, 3)](q, k, v, norm_q.weight, norm_k.weight, cos, sin, out, 1e-6, S, H, hc, C,
                           q.stride(0), q.stride(1), *out.stride()[:5], cos.stride(0),
                           BLOCK_H=triton.next_power_of_2(H), D=D, num_warps=warps)
        return list(out.unbind(0))
    return run


@torch.no_grad()
def main():
    print(torch.__version__, torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    eager = v0(q_raw, k_raw, v_raw)
    results = {}
    for name, fn in (("v0 main compiled", torch.compile(v0, fullgraph=True)),
                     ("v1 rope pairs compiled", torch.compile(v1, fullgraph=True)),
                     ("copy only compiled", torch.compile(copy_only, fullgraph=True)),
                     ("v2 triton", make_v(_norm_rope_pack, 8)), ("v2 w4", make_v(_norm_rope_pack, 4)),
                     ("v2 w16", make_v(_norm_rope_pack, 16)),
                     ("v4 w2", make_v(_norm_rope_pack4, 2)), ("v4 w4", make_v(_norm_rope_pack4, 4)),
                     ("v4 w8", make_v(_norm_rope_pack4, 8)), ("v0 eager", v0)):
        try:
            out = fn(q_raw, k_raw, v_raw)
        except Exception as ex:  # noqa: BLE001
            print(name, "failed:", type(ex).__name__, str(ex)[:1500], flush=True)
            continue
        err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(out, eager))
        us = timed(lambda: fn(q_raw, k_raw, v_raw))
        results[name] = us
        print(f"{name:26s} {us:7.1f} us  max rel err vs eager {err:.2e}  ({3 * 2 * B * S * H * D * 2 / us / 1e6:.2f} TB/s)",
              flush=True)

    # the single block's cat([attention output joined, gelu(mlp)]) feeding proj_out
    mlp = torch.randn(B, S, 4 * H * D, device=dev, dtype=bf)
    received = [torch.randn(U * S * B * (H // (U * C)) * D, device=dev, dtype=bf) for _ in range(C)]
    act = torch.nn.GELU(approximate="tanh")

    def cat_gelu(mlp, r0, r1):
        attn = join_head_chunks([r0, r1], B, S, U, D, bf).flatten(2, 3)
        return torch.cat([attn, act(mlp)], dim=2)

    def gelu_only(mlp):
        return act(mlp)
    fn = torch.compile(cat_gelu, fullgraph=True)
    us = timed(lambda: fn(mlp, *received))
    mb = (mlp.numel() * 2 + sum(r.numel() for r in received)) * 2 / 1e6
    print(f"cat+gelu+join compiled      {us:7.1f} us ({mb / us:.2f} TB/s)")
    fn = torch.compile(gelu_only, fullgraph=True)
    us = timed(lambda: fn(mlp))
    print(f"gelu only compiled          {us:7.1f} us ({mlp.numel() * 4 / us / 1e6:.2f} TB/s)")
    x = torch.empty_like(mlp)
    us = timed(lambda: x.copy_(mlp))
    print(f"copy_ of mlp                {us:7.1f} us ({mlp.numel() * 4 / us / 1e6:.2f} TB/s)")


main()
