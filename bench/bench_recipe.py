"""Every architecture trained with 03's defaults at the study's low-L0 configurations: the
table of the issue "Every architecture trained right at low L0".

    .venv/bin/python bench/bench_recipe.py                     # 4 archs x 3 configs, 2 jobs at a time
    .venv/bin/python bench/bench_recipe.py --archs topk relu --configs post:3:384 --jobs 1

Each row is `03_train_sae.py --acts ACTS --arch A --k K --d-sae D` and nothing else (defaults for
lr, batch, length, AuxK, schedule), then: held-out EV and L0 (summary.json), dead = never active
on any of the site's rows (train and held-out, all p^2 inputs), steps, why it stopped, wall
seconds (one torch thread per job; --jobs run side by side), answer / operand features recovered
at cos > 0.9 (lib/ground_truth.py), "firing": answer / operand values some latent fires on at
F1 > 0.9 (the code's view, which a decoder offset shared with b_dec cannot move: bench/offset_gauge.py;
at resid_mid it is the operand column to read), and "refit": the EV of the best affine decoder of the site
from the SAE's code (metrics.refit_explained_variance, over all rows), which undoes shrinkage:
where it is near TopK's EV and the SAE's own EV is not, the code picked the right latents and
lost only in their magnitudes; "empty": rows (all p^2) on which no latent fires, reconstructed as b_dec
alone (bench/empty_rows.py: at resid_post they lose the model's answer). Goals: dead <= 10% (TopK <= 5%), EV within 0.03 of TopK at
the same config, L0 within 10% of k. Needs the seed-42 model's activations (run_all.sh makes them,
or: 01 --seed 42 --out runs/modadd/seed42; 02 --run runs/modadd/seed42 --site S --out ...).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib import metrics as M  # noqa: E402
from lib.activations import encode_all, open_acts  # noqa: E402
from sae import SAE  # noqa: E402

CONFIGS = ["post:3:384", "post:32:1024", "mid:2:256"]
ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]


def train(acts: Path, out: Path, arch: str, k: int | list[int], d_sae: int, extra: list) -> float:
    """One 03 run (several k: one pass, 03's layout); its wall seconds."""
    ks = k if isinstance(k, list) else [k]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "03_train_sae.py"), "--acts", str(acts), "--out", str(out),
                        "--arch", arch, "--k", *map(str, ks), "--d-sae", str(d_sae), "--threads", "1", "--quiet",
                        "--overwrite", *extra], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"03 failed for {arch} k {k} d_sae {d_sae}: {p.stderr.strip()[-500:]}")
    return time.perf_counter() - t0


def score(acts_path: Path, out: Path) -> dict:
    acts = open_acts(acts_path)
    sae = SAE.load(out)
    codes, _ = encode_all(sae, acts.x)
    s = json.loads((out / "summary.json").read_text())
    gt, _ = G.load_or_fit(acts)
    rec = G.score_decoder(gt, sae.W_dec.detach().double(), acts=codes, a=acts.labels["a"], b=acts.labels["b"])
    return {"ev": s["heldout"]["ev"], "l0": s["heldout"]["l0"], "dead": M.dead_fraction(codes), "steps": s["steps"],
            "empty": M.empty_fraction(codes),
            "refit": M.refit_explained_variance(acts.x, codes),
            "stop": s["stop_reason"], "lr": s["lr"], "batch": s["config"]["batch_size"],
            **{f"rec_{n}": v["recovered"] for n, v in rec.items()},
            **{f"fire_{n}": v["recovered_firing"] for n, v in rec.items()}}


def parse_configs(run: Path, configs: list[str]) -> list[tuple]:
    """"site:k:d_sae" strings -> (config, site, k, d_sae, activations file of the model run)."""
    out = []
    for cfg in configs:
        site, k, d = cfg.split(":")
        acts = run / "acts" / f"resid_{site}.safetensors"
        if not acts.is_file():
            raise SystemExit(f"{acts} is missing: extract it with 02_extract_activations.py --site resid_{site}")
        out.append((cfg, site, int(k), int(d), acts))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42")
    ap.add_argument("--archs", nargs="+", default=ARCHS)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="site:k:d_sae (site post or mid)")
    ap.add_argument("--jobs", type=int, default=2, help="trainings side by side (one torch thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipe")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more 03 flags for every run")
    a = ap.parse_args()
    jobs = [(cfg, arch, acts, a.out / f"{site}_k{k}_d{d}" / arch, k, d)
            for cfg, site, k, d, acts in parse_configs(a.run, a.configs) for arch in a.archs]
    with ThreadPoolExecutor(a.jobs) as pool:
        secs = list(pool.map(lambda j: train(j[2], j[3], j[1], j[4], j[5], a.extra), jobs))
    rows = [(j, s, score(j[2], j[3])) for j, s in zip(jobs, secs)]
    print(f"03 defaults, {len(rows)} runs, {a.jobs} side by side, 1 torch thread each")
    print(f"{'config':16s} {'arch':10s} {'EV':>7s} {'dTopK':>6s} {'refit':>6s} {'L0':>6s} {'dead':>6s} {'empty':>6s} {'answer':>7s} "
          f"{'operand':>7s} {'firing':>9s} {'steps':>6s} {'batch':>5s} {'lr':>8s} {'s':>6s}  stop")
    topk_ev = {j[0]: r["ev"] for j, _, r in rows if j[1] == "topk"}
    for j, s, r in rows:
        d_ev = r["ev"] - topk_ev.get(j[0], float("nan"))
        print(f"{j[0]:16s} {j[1]:10s} {r['ev']:7.4f} {d_ev:+6.3f} {r['refit']:6.3f} {r['l0']:6.2f} {100 * r['dead']:5.1f}% {100 * r['empty']:5.2f}% "
              f"{100 * r.get('rec_answer', float('nan')):6.1f}% {100 * r.get('rec_operand', float('nan')):6.1f}% "
              f"{100 * r.get('fire_answer', float('nan')):4.0f}/{100 * r.get('fire_operand', float('nan')):3.0f}% "
              f"{r['steps']:6d} {r['batch']:5d} {r['lr']:8.2e} {s:6.0f}  {r['stop']}")


if __name__ == "__main__":
    main()
