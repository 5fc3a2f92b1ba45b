"""What AuxK must cost per step, op by op, against the budget "AuxK takes <= 25% of the speed".

    .venv/bin/python bench/auxk_floor.py              # bench_sae.py's shape: 128 -> 1024, k 32, batch 4096

AuxK (Gao et al. 2024) adds to each TopK step, with n dead latents and k_aux = d_in / 2, on
the sparse route (lib/kernels.py's while n > k_aux):
  1. the dead latents' pre-activations, gathered out of the step's pre [B, d_sae];
  2. the k_aux largest of them per row (torch.topk: the selection);
  3. e_hat = their code decoded (embedding_bag over B * k_aux rows of W_dec);
  4. the gradient of that code (sampled_addmm at the B * k_aux entries);
  5. the two weight gradients of the dead sub-dictionary, W_enc's and W_dec's columns / rows:
     [n, B] x [B, d_in] each, as a dense GEMM or a CSR product, whichever is faster here.
On the dense route (lib/stacked.py's once k_aux is a quarter of n or more): 1 and 2, then
four [B, n] x [n, d_in]-sized GEMMs (6: the encoder's weight gradient, the decode, its code
gradient, the decoder's weight gradient); with no more dead latents than k_aux every one is
decoded, and lib/kernels.py drops 1 and 2 and computes the encode as a fifth GEMM.
For the selection, torch.topk on int32 keys (kernels.topk_relu) is the fastest stock op we
found; the script times float topk, sort and kthvalue beside it.

The script times each op alone and the whole step with and without AuxK (sae.py's sparse
path; the rows, SAE and dead latents of bench/bench_sae.py), interleaved over --rounds
rounds, medians. A 25% cost allows AuxK a third of the step without it: if the cheaper
route's ops alone add up to more, the goal is out of reach with these ops on this machine,
whatever the code around them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_sae import our_step  # noqa: E402
from bench.harness import add_shape_args, dead_latents, make_rows, timed  # noqa: E402
from lib.kernels import SparsePattern, topk_relu  # noqa: E402
from sae import SAE  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap, steps=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, D, B = args.d_in, args.d_sae, args.batch_size
    x, dead_mask = make_rows(B, d, D), dead_latents(D, args.dead_frac)
    dead = dead_mask.nonzero().squeeze(1)
    n, k_aux = len(dead), min(d // 2, int(dead_mask.sum()))

    steps = {}                                 # 03's step on two copies of one SAE: without / with AuxK
    for name, mask in (("step", None), ("step + AuxK", dead_mask)):
        sae = SAE(d, D, k=args.k, arch="topk", generator=torch.Generator().manual_seed(0))
        sae.init_b_dec_(x[:2048])
        steps[name] = our_step(sae, 3e-4, dead_mask=mask)

    with torch.no_grad():                      # the inputs of each op, as the step has them
        x_c = x - sae.b_dec
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        sub = pre.index_select(1, dead)
        v, j = topk_relu(sub, k_aux)
        pat = SparsePattern.from_topk(j, n)
        W_dec = sae.W_dec.index_select(0, dead)
        g = torch.randn(B, d)
        S = torch.zeros(B, n).scatter_(1, j, v)
        csr_t = pat.csr_t(v.reshape(-1))
    ops = {
        "1 gather the dead pre-activations": lambda: pre.index_select(1, dead),
        "2 select k_aux per row (topk)": lambda: topk_relu(sub, k_aux),
        "3 decode (embedding_bag)": lambda: F.embedding_bag(pat.col, W_dec, pat.offsets, mode="sum",
                                                            per_sample_weights=v.reshape(-1)),
        "4 code gradient (sampled_addmm)": lambda: torch.sparse.sampled_addmm(pat.csr(torch.zeros_like(v.reshape(-1))),
                                                                               g, W_dec.t(), beta=0.0),
        "5a one weight gradient, dense GEMM": lambda: S.t() @ g,
        "5b one weight gradient, CSR product": lambda: csr_t @ g,
        "6 one [B, n] x [n, d_in] GEMM (dense route)": lambda: S @ W_dec,
        "  (2 by float topk)": lambda: sub.topk(k_aux, dim=-1, sorted=False),
        "  (2 by sort)": lambda: sub.relu().view(torch.int32).sort(dim=-1),
        "  (2 by kthvalue)": lambda: sub.kthvalue(n - k_aux + 1, dim=-1),
    }
    times = {name: [] for name in ["step", "step + AuxK", *ops]}
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(lambda: step(x), args.steps, warmup=3 if r == 0 else 1))
        for name, f in ops.items():
            times[name].append(timed(f, args.steps, warmup=2))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    print(f"AuxK at d_in {d} -> d_sae {D}, k {args.k}, batch {B}, {n} dead latents, k_aux {k_aux}, "
          f"{args.threads} CPU threads, torch {torch.__version__}; median ms of {args.rounds} rounds x {args.steps}")
    base, aux = ms["step"], ms["step + AuxK"]
    print(f"{'step without AuxK':44s} {base:8.2f}")
    print(f"{'step with AuxK':44s} {aux:8.2f}   AuxK adds {aux - base:.2f} ms: cost {100 * (1 - base / aux):.1f}% of the speed")
    for name in ops:
        print(f"  {name:42s} {ms[name]:8.2f}")
    grad = min(ms["5a one weight gradient, dense GEMM"], ms["5b one weight gradient, CSR product"])
    sparse_route = sum(ms[name] for name in list(ops)[:4]) + 2 * grad
    gemm = ms["6 one [B, n] x [n, d_in] GEMM (dense route)"]
    # k_aux < n: the dead pre-activations gathered and selected, then 4 GEMMs; k_aux = n (every
    # dead latent decoded, lib/kernels.py's dense case): no selection, the encode is a 5th GEMM
    dense_route = ms[list(ops)[0]] + ms[list(ops)[1]] + 4 * gemm if k_aux < n else 5 * gemm
    floor = min(sparse_route, dense_route)
    print(f"{'sparse route: 1-4 + 2 x the faster of 5a / 5b':44s} {sparse_route:8.2f}")
    print(f"{'dense route: ' + ('1, 2 + 4 x 6' if k_aux < n else '5 x 6 (k_aux = n)'):44s} {dense_route:8.2f}")
    print(f"{'floor: the cheaper route':44s} {floor:8.2f}   (AuxK's own work, nothing around it)")
    print(f"{'budget for a 25% cost: step / 3':44s} {base / 3:8.2f}   floor / budget = {floor / (base / 3):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
