"""Steps-to-grok for a grid of 01 recipes (lr, weight decay, betas, Grokfast), several seeds.

Steps to grok do not depend on the machine, so this sweep can run on any device
(--device cuda for speed); seconds per step are measured separately by
bench/bench_grok.py on the target CPU. Prints one line per config: median and
max first step with held-out accuracy >= 99.5%.

    python bench/sweep_recipe.py --device cuda --workers 4 --out runs/sweep
"""
import argparse
import itertools
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.common import load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use

GRID = [  # lr, weight_decay, beta1, beta2, grokfast_alpha, grokfast_lamb
    (3e-3, 1, .9, .98, .98, 2), (3e-3, 2, .9, .98, .98, 2), (3e-3, 3, .9, .98, .98, 2),
    (5e-3, 1, .9, .98, .98, 2), (5e-3, 2, .9, .98, .98, 2), (5e-3, 3, .9, .98, .98, 2),
    (2e-3, 2, .9, .98, .98, 2), (1e-3, 1, .9, .98, .98, 2), (1e-2, 1, .9, .98, .98, 2),
    (3e-3, 1, .9, .98, .98, 5), (3e-3, 1, .9, .99, .98, 2), (3e-3, 1, .9, .95, .98, 2),
    (3e-3, 1, .8, .98, .98, 2), (3e-3, 2, .9, .98, .9, 2), (3e-3, 1, .9, .98, .95, 2),
    (3e-3, 1, .9, .98, 0, 0), (1e-3, 1, .9, .98, 0, 0), (5e-3, 2, .9, .99, .98, 5),
]


def one(job):
    (lr, wd, b1, b2, ga, gl), seed, device, out = job
    m = load_stage("01_train_transformer.py")
    d = Path(out) / f"lr{lr}_wd{wd}_b{b1}-{b2}_g{ga}-{gl}_s{seed}"
    args = m.parse_args(["--out", str(d), "--overwrite", "--quiet", "--hold", "0", "--cleanup", "0",
                         "--steps", "4000", "--device", device, "--seed", str(seed), "--lr", str(lr),
                         "--weight-decay", str(wd), "--beta1", str(b1), "--beta2", str(b2),
                         "--grokfast-alpha", str(ga), "--grokfast-lamb", str(gl)])
    s = m.train(args)
    return (lr, wd, b1, b2, ga, gl), seed, s["grok_step"] if s["grokked"] else None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", default="42,123,456")
    ap.add_argument("--out", default="runs/sweep")
    a = ap.parse_args()
    jobs = [(g, s, a.device, a.out) for g, s in itertools.product(GRID, map(int, a.seeds.split(",")))]
    res = {}
    with ProcessPoolExecutor(a.workers) as ex:
        for g, s, step in ex.map(one, jobs):
            res.setdefault(g, []).append(step)
            print(g, s, step, flush=True)
    print("\nlr wd beta1 beta2 gf_alpha gf_lamb | grok steps per seed | median")
    rows = sorted(res.items(), key=lambda kv: (None in kv[1], statistics.median([x or 99999 for x in kv[1]])))
    for g, steps in rows:
        print(*g, "|", steps, "|", statistics.median([x or 99999 for x in steps]))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "sweep.json").write_text(json.dumps([[list(g), v] for g, v in rows]))
