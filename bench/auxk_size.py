"""How many dead latents AuxK decodes per row (k_aux), for the two architectures whose latents
fire by clearing a threshold: Gao et al.'s d_in / 2 against d_in / 4, 03's default for
batchtopk since this script (jumprelu kept d_in / 2: at d_in / 4 one study seed of five lost 40%
of the answer features, README "Training an SAE").

    .venv/bin/python bench/auxk_size.py                 # batchtopk, jumprelu at k 3 / 384; batchtopk at k 2 / 256
    .venv/bin/python bench/auxk_size.py --archs batchtopk --configs post:3:384 --k-aux 64 32 16 8 --seeds 0 1

Each row is `03_train_sae.py --acts ACTS --arch A --k K --d-sae D --seed S --k-aux N` and nothing
else (bench_recipe.train), scored as bench/bench_recipe.py scores: held-out EV and L0, dead =
never active on any of the site's 12,769 rows, answer features recovered at cos > 0.9. A run
whose summary.json exists is scored, not trained again (so a killed run picks up). On the seed-42
model's resid_post (d_in 128: k_aux 64 and 32).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import ROOT, parse_configs, score, train  # noqa: E402

PLAN = {"batchtopk": ["post:3:384", "post:2:256"], "jumprelu": ["post:3:384"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42")
    ap.add_argument("--archs", nargs="+", default=list(PLAN))
    ap.add_argument("--configs", nargs="+", default=None, help="site:k:d_sae (default: PLAN per arch)")
    ap.add_argument("--k-aux", nargs="+", type=int, default=[64, 32])
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side (one torch thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "auxk_size")
    a = ap.parse_args()
    jobs = []
    for arch in a.archs:
        for cfg, site, k, d, acts in parse_configs(a.run, a.configs or PLAN.get(arch, ["post:3:384"])):
            for ka in a.k_aux:
                for s in a.seeds:
                    if cfg == "post:2:256" and s == "0" and a.configs is None:
                        continue                          # the study's configuration: seeds 1, 2
                    jobs.append((cfg, arch, ka, s, acts, a.out / f"{site}_k{k}_d{d}" / arch / f"kaux{ka}_seed{s}", k, d))

    def run(j):
        cfg, arch, ka, s, acts, out, k, d = j
        if not (out / "summary.json").is_file():
            train(acts, out, arch, k, d, ["--seed", s, "--k-aux", str(ka)])
        return score(acts, out)

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(run, jobs))
    print(f"{'config':12s} {'arch':10s} {'k_aux':>5s} {'seed':>4s} {'EV':>7s} {'L0':>5s} {'dead':>6s} {'answer':>7s} {'steps':>6s}")
    for j, r in zip(jobs, rows):
        print(f"{j[0]:12s} {j[1]:10s} {j[2]:5d} {j[3]:>4s} {r['ev']:7.4f} {r['l0']:5.2f} {100 * r['dead']:5.1f}% "
              f"{100 * r.get('rec_answer', float('nan')):6.1f}% {r['steps']:6d}")
    print("\nper (config, arch, k_aux): dead % per seed; mean held-out EV; mean answer features recovered")
    groups = {}
    for j, r in zip(jobs, rows):
        groups.setdefault(j[:3], []).append(r)
    for (cfg, arch, ka), rs in groups.items():
        dead = " ".join(f"{100 * r['dead']:4.1f}" for r in rs)
        print(f"{cfg:12s} {arch:10s} k_aux {ka:3d}: dead {dead:16s}  EV {statistics.mean(r['ev'] for r in rs):.4f}  "
              f"answer {100 * statistics.mean(r.get('rec_answer', float('nan')) for r in rs):5.1f}%")


if __name__ == "__main__":
    main()
