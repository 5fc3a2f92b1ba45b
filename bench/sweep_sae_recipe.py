"""How 03's default lr and batch were chosen: TopK (and any arch) over a grid of --lr x
--batch-size with the plateau schedule, on the seed-42 model's resid_post.

    .venv/bin/python bench/sweep_sae_recipe.py                      # topk k 3 / 384, 3 lrs x 2 batches
    .venv/bin/python bench/sweep_sae_recipe.py --arch relu --lrs 1e-3 4e-3 --batches 1024

Each row is 03 with only --arch --k --d-sae --lr --batch-size set (the plateau schedule decides
the length), scored as bench/bench_recipe.py scores (held-out EV and L0, dead on all rows,
features recovered, steps, seconds on one torch thread, --jobs side by side). The default rule
lr = 6e-4 sqrt(16384 / d_sae) sqrt(batch / 4096) gives 1.96e-3 at 384 latents and batch 1024.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import ROOT, score, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42")
    ap.add_argument("--site", default="post")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--d-sae", type=int, default=384)
    ap.add_argument("--lrs", nargs="+", default=["1e-3", "2e-3", "4e-3"])
    ap.add_argument("--batches", nargs="+", default=["1024", "4096"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_sae_recipe")
    a = ap.parse_args()
    acts = a.run / "acts" / f"resid_{a.site}.safetensors"
    grid = [(lr, b) for b in a.batches for lr in a.lrs]
    outs = {g: a.out / f"{a.arch}_k{a.k}_d{a.d_sae}_lr{g[0]}_b{g[1]}" for g in grid}
    with ThreadPoolExecutor(a.jobs) as pool:
        secs = list(pool.map(lambda g: train(acts, outs[g], a.arch, a.k, a.d_sae,
                                             ["--lr", g[0], "--batch-size", g[1]]), grid))
    print(f"{a.arch} k {a.k} / {a.d_sae} latents at resid_{a.site}; plateau schedule; {a.jobs} jobs, 1 thread each")
    print(f"{'lr':>8s} {'batch':>5s} {'EV':>7s} {'L0':>6s} {'dead':>6s} {'answer':>7s} {'steps':>6s} {'s':>6s}  stop")
    for g, s in zip(grid, secs):
        r = score(acts, outs[g])
        print(f"{g[0]:>8s} {g[1]:>5s} {r['ev']:7.4f} {r['l0']:6.2f} {100 * r['dead']:5.1f}% "
              f"{100 * r.get('rec_answer', float('nan')):6.1f}% {r['steps']:6d} {s:6.0f}  {r['stop']}")


if __name__ == "__main__":
    main()
