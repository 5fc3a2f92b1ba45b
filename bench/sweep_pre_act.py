"""How 03's default --pre-act-coeff (JumpReLU's dead-latent remedy) was chosen: JumpReLU at
the configurations of bench/bench_recipe.py, over a few coefficients and several SAE seeds.

    .venv/bin/python bench/sweep_pre_act.py                         # 3 coeffs x 3 configs x seeds 1 2 3
    .venv/bin/python bench/sweep_pre_act.py --coeffs 0 3e-3 --configs post:3:384 --seeds 1

Each cell is one `03_train_sae.py --arch jumprelu --k K --d-sae D --pre-act-coeff C --seed S...`
(the seeds train in one pass, everything else 03's defaults), scored per seed as
bench_recipe.py scores a row: held-out EV and L0, dead = never active on any of the site's
rows, answer / operand features recovered at cos > 0.9, steps. One seed per row can mislead
here (at 1e-3, seeds 1-3 leave 11-15% dead at resid_post k 3 / 384 and 36-57% at mid), hence the seeds.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import CONFIGS, ROOT, parse_configs, score, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42")
    ap.add_argument("--coeffs", nargs="+", default=["1e-3", "3e-3", "1e-2"])
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="site:k:d_sae (site post or mid)")
    ap.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    ap.add_argument("--jobs", type=int, default=2, help="03 runs side by side (one torch thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_pre_act")
    a = ap.parse_args()
    cells = [(cfg, c, acts, a.out / f"{site}_k{k}_d{d}_pa{c}", k, d)
             for cfg, site, k, d, acts in parse_configs(a.run, a.configs) for c in a.coeffs]
    with ThreadPoolExecutor(a.jobs) as pool:
        secs = list(pool.map(lambda c: train(c[2], c[3], "jumprelu", c[4], c[5],
                                             ["--pre-act-coeff", c[1], "--seed", *a.seeds]), cells))
    print(f"jumprelu, 03 defaults but --pre-act-coeff, seeds {' '.join(a.seeds)} in one pass per cell; "
          f"{a.jobs} cells side by side, 1 torch thread each")
    print(f"{'config':14s} {'coeff':>6s} {'seed':>4s} {'EV':>7s} {'L0':>6s} {'dead':>6s} {'answer':>7s} "
          f"{'operand':>7s} {'steps':>6s} {'cell s':>6s}")
    for (cfg, c, acts, out, _, _), s in zip(cells, secs):
        for seed in a.seeds:
            r = score(acts, out / f"seed{seed}" if len(a.seeds) > 1 else out)    # 03's layout for one seed
            print(f"{cfg:14s} {c:>6s} {seed:>4s} {r['ev']:7.4f} {r['l0']:6.2f} {100 * r['dead']:5.1f}% "
                  f"{100 * r.get('rec_answer', float('nan')):6.1f}% {100 * r.get('rec_operand', float('nan')):6.1f}% "
                  f"{r['steps']:6d} {s:6.0f}")


if __name__ == "__main__":
    main()
