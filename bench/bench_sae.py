"""Tokens/s of one SAE training step for each architecture, beside a plain dense
PyTorch TopK step and the measured fp32 GEMM rate, in one run, one table.

    .venv/bin/python bench/bench_sae.py                       # 128 -> 1024, k 32, batch 4096
    .venv/bin/python bench/bench_sae.py --d-in 768 --d-sae 24576 --batch-size 4096 --steps 5

A step is what 03_train_sae.py does per batch: forward, backward, decoder-gradient
projection, Adam, decoder renormalisation. "GFLOP/s" counts the FLOPs the step
really performs (the sparse path does far fewer than the dense one); "% GEMM" is that
rate over a large square fp32 matmul measured in the same run. Timings are the median
step, after warm-up; other processes on the machine show up in them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import add_shape_args, dead_latents, make_rows, timed  # noqa: E402
from sae import SAE  # noqa: E402


def gemm_rate(device, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = timed(lambda: a @ b, reps, warmup=2)
    return 2 * n ** 3 / sec


def plain_topk_step(d_in, d_sae, k, lr, device):
    """The straightforward dense version: scatter the top-k into a [B, d_sae] code and
    multiply by W_dec; autograd does the rest (as most SAE code, SAELens's default too)."""
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = torch.nn.Parameter((W_dec / W_dec.norm(dim=1, keepdim=True)).to(device))
    W_enc = torch.nn.Parameter(W_dec.detach().t().contiguous())
    b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
    b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)

    def step(x):
        pre = (x - b_dec) @ W_enc + b_enc
        v, i = pre.topk(k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
        x_hat = acts @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))
    return step


def our_step(sae: SAE, lr: float, dead_mask=None, coeff=None, hold=False):
    """hold: start every step from the SAE as given (a copy of its weights, ~0.1 ms), so a case set
    up at L0 = k stays there; without it relu's free decoder rows let its L0 climb far above k
    within the timed steps (the table's last column; --no-hold), off the sparse path its row names.
    The step's `l0` holds the code's L0 on its latest call."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)   # as 03_train_sae.py
    sae.train()
    start = [p.detach().clone() for p in sae.parameters()] if hold else None

    def step(x):
        if hold:
            with torch.no_grad():
                for p, p0 in zip(sae.parameters(), start):
                    p.copy_(p0)
        out = sae(x, dead_mask=dead_mask, sparsity_coeff=coeff)
        step.l0 = out.l0                  # a tensor: no sync inside the timed step
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.post_step_()
        if out.min_active is not None:
            sae.update_threshold_(out.min_active)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap, steps=5)
    ap.add_argument("--rounds", type=int, default=4, help="rounds over all cases (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--no-hold", action="store_true",
                    help="let the L0 = k cases train on between steps (our_step's hold off), as before 56b5c8a")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    d, D, k, B = args.d_in, args.d_sae, args.k, args.batch_size
    lr = 3e-4
    x = make_rows(B, d, D).to(dev)           # sparse combinations of random unit directions

    mm = 2 * B * d * D                                # one [B,d] x [d,D] matmul
    sp = 2 * B * k * d                                # one k-sparse decode-sized product
    k_aux = d // 2
    dead = dead_latents(D, args.dead_frac).to(dev)
    n_dead = int(dead.sum())
    # AuxK: embedding_bag forward + sampled d code over k_aux latents a row; the two weight
    # gradients over the dead sub-dictionary, as dense matmuls once it is >1/8 full (sae.py)
    ka = min(k_aux, n_dead)
    aux_flops = 2 * 2 * B * ka * d + (2 * 2 * B * n_dead * d if ka * 8 > n_dead else 2 * 2 * B * ka * d)
    # name, step, FLOPs the step performs. Dense: encoder fwd, decoder fwd, decoder bwd
    # (d code, dW_dec), encoder bwd (dW_enc; the plain step also d x_c for b_dec's grad).
    cases = [("plain dense TopK (reference)", plain_topk_step(d, D, k, lr, dev), 6 * mm)]
    for name, kw, dm, flops in [
        ("topk (sparse path)", dict(arch="topk", sparse=True), None, mm + 4 * sp),
        (f"topk + AuxK ({n_dead} dead)", dict(arch="topk", sparse=True), dead, mm + 4 * sp + aux_flops),
        ("topk (dense path)", dict(arch="topk", sparse=False), None, 5 * mm),
        ("batchtopk (sparse path)", dict(arch="batchtopk", sparse=True), None, mm + 4 * sp),
        ("jumprelu (dense, L0 = d_sae/2)", dict(arch="jumprelu"), None, 5 * mm),
        ("jumprelu (dense path, L0 = k)", dict(arch="jumprelu", sparse=False), None, 5 * mm),
        ("jumprelu (sparse path, L0 = k)", dict(arch="jumprelu", sparse=True), None, mm + 4 * sp),
        ("relu / L1 (dense, L0 = d_sae/2)", dict(arch="relu"), None, 5 * mm),
        ("relu / L1 (dense path, L0 = k)", dict(arch="relu", sparse=False), None, 5 * mm),
        ("relu / L1 (sparse path, L0 = k)", dict(arch="relu", sparse=True), None, mm + 4 * sp),
    ]:
        sae = SAE(d, D, k=k, generator=torch.Generator().manual_seed(0), **kw).to(dev)
        sae.init_b_dec_(x[:2048])
        if "L0 = k" in name:           # a trained SAE's code: b_enc set so that ~k latents fire per row
            with torch.no_grad():
                pre = (x[:2048] - sae.b_dec) @ sae.W_enc
                sae.b_enc.copy_(-pre.float().quantile(1 - k / D, dim=0))
        cases.append((name, our_step(sae, lr, dm, coeff=1e-3 if kw["arch"] in ("relu", "jumprelu") else None,
                                     hold="L0 = k" in name and not args.no_hold), flops))

    # interleave the cases over several rounds so that a burst of load elsewhere on the
    # machine hits all of them alike; report each case's median step
    times = {name: [] for name, _, _ in cases}
    gemm_runs = []
    for r in range(args.rounds):
        gemm_runs.append(gemm_rate(dev, 2048 if dev.type == "cpu" else 8192))
        for name, step, _ in cases:
            times[name].append(timed(lambda: step(x), args.steps, warmup=3 if r == 0 else 1))
    gemm = statistics.median(gemm_runs)
    plain_tps = B / statistics.median(times[cases[0][0]])
    rows = [(name, B / statistics.median(times[name]), flops, float(getattr(step, "l0", k))) for name, step, flops in cases]

    where = (f"{torch.get_num_threads()} CPU threads" if dev.type == "cpu"
             else torch.cuda.get_device_name(dev))
    print(f"SAE training step, d_in {d} -> d_sae {D}, k {k}, batch {B}, fp32, {where}, torch {torch.__version__}")
    print(f"measured fp32 GEMM rate ({2048 if dev.type == 'cpu' else 8192}^3): {gemm / 1e9:.1f} GFLOP/s")
    print(f"{'step':34s} {'tokens/s':>10s} {'x plain':>8s} {'GFLOP/s':>8s} {'% GEMM':>7s} {'L0 at end':>9s}")
    for name, tps, flops, l0 in rows:
        rate = flops * tps / B
        print(f"{name:34s} {tps:10,.0f} {tps / plain_tps:8.2f} {rate / 1e9:8.1f} {100 * rate / gemm:6.1f}% {l0:9.1f}")


if __name__ == "__main__":
    main()
