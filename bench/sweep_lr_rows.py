"""The sweep's length and learning rate: run_all.sh's TopK sweep trains at three times 03's default
lr for at most 1M rows ("1M x3" below; twice the lr for 2M rows from 48df3ce to 1d26ef4). This
script shows what that trades, on the seed-42 model's resid_post: per (width, recipe), one 03
pass over k 2 and 3 x seeds 1 and 2 (as the sweep trains a width), then each SAE's answer
features recovered at cos > 0.9, held-out EV, dead share (all p^2 rows), steps, and the pass's
wall seconds (one torch thread, --jobs passes side by side).

    .venv/bin/python bench/sweep_lr_rows.py                       # widths 1024 256, ~15 min on 2 cores
    .venv/bin/python bench/sweep_lr_rows.py --widths 512 --ks 2 3 4

Recipes: "4M" = 03's default lr, at most 4M rows (the sweep before); "2M" = the default lr, at most
2M rows; "2M x2" = twice the default lr (--lr-scale 2), at most 2M rows; "1M x2", "1M x3": half
those rows at twice / three times the default lr ("1M x3": the sweep now). --recipes picks which to run.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_recipe import score, train  # noqa: E402

RECIPES = {"4M": ["--max-tokens", "4000000"], "2M": ["--max-tokens", "2000000"],
           "2M x2": ["--max-tokens", "2000000", "--lr-scale", "2"],
           "1M x2": ["--max-tokens", "1000000", "--lr-scale", "2"], "1M x3": ["--max-tokens", "1000000", "--lr-scale", "3"]}


def sae_dir(out: Path, k: int, seed: str, ks: list, seeds: list) -> Path:
    """Where 03 put one SAE of a pass (03_train_sae.plan_runs): OUT/k<K>_seed<S>, or OUT/seed<S> with one k."""
    parts = ([f"k{k}"] if len(ks) > 1 else []) + ([f"seed{seed}"] if len(seeds) > 1 or len(ks) > 1 else [])
    return out / "_".join(parts) if parts else out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "modadd" / "seed42" / "acts" / "resid_post.safetensors")
    ap.add_argument("--widths", nargs="+", type=int, default=[1024, 256])
    ap.add_argument("--ks", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--seeds", nargs="+", default=["1", "2"])
    ap.add_argument("--recipes", nargs="+", default=["4M", "2M", "2M x2"], choices=list(RECIPES))
    ap.add_argument("--jobs", type=int, default=2, help="03 passes side by side (one torch thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_lr_rows")
    a = ap.parse_args()
    if not a.acts.is_file():
        raise SystemExit(f"error: --acts {a.acts} does not exist: run 01 and 02 (or bash run_all.sh) first")
    jobs = [(d, name, a.out / f"d{d}" / name.replace(" ", "")) for d in a.widths for name in a.recipes]
    with ThreadPoolExecutor(a.jobs) as pool:
        secs = list(pool.map(lambda j: train(a.acts, j[2], "topk", a.ks, j[0], ["--seed", *a.seeds, *RECIPES[j[1]]]),
                             jobs))
    print(f"TopK on {a.acts}, k {' '.join(map(str, a.ks))} x seeds {' '.join(a.seeds)} per pass, {a.jobs} passes side by side")
    print(f"{'width':>5s} {'recipe':6s} {'k':>2s} {'answer per seed':>16s} {'EV per seed':>15s} {'dead':>11s} "
          f"{'steps':>11s} {'lr':>8s} {'pass s':>6s}")
    for (d, name, out), s in zip(jobs, secs):
        for k in a.ks:
            r = [score(a.acts, sae_dir(out, k, seed, a.ks, a.seeds)) for seed in a.seeds]
            cols = [" ".join(f"{100 * x['rec_answer']:5.1f}%" for x in r), " ".join(f"{x['ev']:.4f}" for x in r),
                    " ".join(f"{100 * x['dead']:4.1f}%" for x in r), " ".join(f"{x['steps']:5d}" for x in r)]
            print(f"{d:5d} {name:6s} {k:2d} {cols[0]:>16s} {cols[1]:>15s} {cols[2]:>11s} {cols[3]:>11s} "
                  f"{r[0]['lr']:8.2e} {s:6.0f}")


if __name__ == "__main__":
    main()
