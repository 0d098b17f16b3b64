"""1 GPU: FLUX's single-stream block tail (the join of Ulysses' received head chunks, gelu(proj_mlp), cat, proj_out,
gate, residual) and the double-stream feed-forward at 2- and 4-GPU per-rank sizes, compiled by Inductor and timed
in CUDA graphs: diffusers' math (t0) against the GELU in cuBLASLt's epilogue (t1), plus proj_out split over the
cat's parts (t2: what fastusp/gemm_rewrites.py does; t2b accumulates the second GEMM into the first), and an eager
variant that writes the GEMM's output straight into the cat's buffer (t3); then the GEMMs alone.
Results: benchmarks/results/2026-11-28-gemm-rewrites.md.
    python3 benchmarks/mlp_tail_variants.py    (torch only)"""
import torch
import torch.nn.functional as F

from graph_timing import graph_time_us as timed
dev = torch.device("cuda"); bf = torch.bfloat16
torch.manual_seed(0)

Hd, MLP, D = 3072, 12288, 128
for world in (2, 4):
    S = 4608 // world
    U, C = world, 2
    hc = 24 // world // C
    parts = [torch.randn(U, S, 1, hc, D, device=dev, dtype=bf) for _ in range(C)]
    x = torch.randn(1, S, Hd, device=dev, dtype=bf)
    res = torch.randn(1, S, Hd, device=dev, dtype=bf)
    gate = torch.randn(1, Hd, device=dev, dtype=bf)
    Wm = torch.randn(MLP, Hd, device=dev, dtype=bf) * 0.02; bm = torch.randn(MLP, device=dev, dtype=bf) * 0.02
    Wo = torch.randn(Hd, Hd + MLP, device=dev, dtype=bf) * 0.02; bo = torch.randn(Hd, device=dev, dtype=bf) * 0.02
    Wo_a, Wo_m = Wo[:, :Hd], Wo[:, Hd:]

    def join(parts):
        return torch.stack([p.permute(2, 1, 0, 3, 4) for p in parts], 3).reshape(1, S, Hd)

    def t0(parts, x):  # diffusers' math
        a = join(parts)
        m = F.gelu(F.linear(x, Wm, bm), approximate="tanh")
        return res + gate.unsqueeze(1) * F.linear(torch.cat([a, m], 2), Wo, bo)

    def t1(parts, x):  # gelu in the GEMM epilogue, cat kept
        a = join(parts)
        m = torch._addmm_activation(bm, x.view(S, Hd), Wm.t(), use_gelu=True).view(1, S, MLP)
        return res + gate.unsqueeze(1) * F.linear(torch.cat([a, m], 2), Wo, bo)

    def t2(parts, x):  # epilogue gelu, proj_out split in two GEMMs (no cat)
        a = join(parts).view(S, Hd)
        m = torch._addmm_activation(bm, x.view(S, Hd), Wm.t(), use_gelu=True)
        o = torch.addmm(bo, a, Wo_a.t()) + torch.mm(m, Wo_m.t())
        return res + gate.unsqueeze(1) * o.view(1, S, Hd)

    def t2b(parts, x):  # as t2, second GEMM accumulates into the first (beta=1)
        a = join(parts).view(S, Hd)
        m = torch._addmm_activation(bm, x.view(S, Hd), Wm.t(), use_gelu=True)
        o = torch.addmm(torch.addmm(bo, a, Wo_a.t()), m, Wo_m.t())
        return res + gate.unsqueeze(1) * o.view(1, S, Hd)

    buf = torch.empty(S, Hd + MLP, device=dev, dtype=bf)
    epi = torch.compile(lambda o: res + gate.unsqueeze(1) * o.view(1, S, Hd))
    def t3(parts, x):  # eager: GEMM+gelu straight into the cat buffer, join copied into it, one proj_out
        torch._addmm_activation(bm, x.view(S, Hd), Wm.t(), use_gelu=True, out=buf[:, Hd:])
        buf[:, :Hd].view(S, U, C, hc, D).copy_(torch.stack([p[:, :, 0] for p in parts], 2).transpose(0, 1))
        return epi(torch.addmm(bo, buf, Wo.t()))

    ref = t0(parts, x).float()
    for name, fn in (("t0 diffusers", t0), ("t1 epilogue+cat", t1), ("t2 epilogue+split", t2),
                     ("t2b epilogue+split beta1", t2b), ("t3 into-cat eager", t3)):
        f = fn if name.startswith("t3") else torch.compile(fn)
        with torch.no_grad():
            out = f(parts, x).float()
            err = ((out - ref).norm() / ref.norm()).item()
            us = timed(lambda: f(parts, x))
        print(f"world {world} S {S} {name:28s} {us:8.1f} us  rel err {err:.2e}", flush=True)
    # pieces
    x2 = x.view(S, Hd)
    gelu_mm = torch._addmm_activation
    with torch.no_grad():
        for name, fn in (("mlp addmm", lambda: torch.addmm(bm, x2, Wm.t())),
                         ("mlp addmm+gelu epilogue", lambda: gelu_mm(bm, x2, Wm.t(), use_gelu=True)),
                         ("mlp epilogue into slice", lambda: gelu_mm(bm, x2, Wm.t(), use_gelu=True, out=buf[:, Hd:])),
                         ("proj_out K=15360", lambda: torch.addmm(bo, buf, Wo.t())),
                         ("proj_out a K=3072", lambda: torch.addmm(bo, buf[:, :Hd], Wo_a.t())),
                         ("proj_out m K=12288", lambda: torch.mm(buf[:, Hd:], Wo_m.t())),
                         ):
            print(f"world {world}   piece {name:28s} {timed(fn):8.1f} us", flush=True)
    # double-block FF (image tokens 4096/world, text 512/world)
    for T in (4096 // world, 512 // world):
        xf = torch.randn(1, T, Hd, device=dev, dtype=bf)
        W1 = torch.randn(MLP, Hd, device=dev, dtype=bf) * 0.02; b1 = torch.randn(MLP, device=dev, dtype=bf) * 0.02
        W2 = torch.randn(Hd, MLP, device=dev, dtype=bf) * 0.02; b2 = torch.randn(Hd, device=dev, dtype=bf) * 0.02
        def ff0(xf): return F.linear(F.gelu(F.linear(xf, W1, b1), approximate="tanh"), W2, b2)
        def ff1(xf):
            up = torch._addmm_activation(b1, xf.view(T, Hd), W1.t(), use_gelu=True)
            return F.linear(up.view(1, T, MLP), W2, b2)
        with torch.no_grad():
            r = ff0(xf).float()
            for name, fn in (("ff0 diffusers", ff0), ("ff1 epilogue", ff1)):
                f = torch.compile(fn)
                out = f(xf).float()
                err = ((out - r).norm() / r.norm()).item()
                print(f"world {world} FF T {T} {name:20s} {timed(lambda: f(xf)):8.1f} us  rel err {err:.2e}", flush=True)
