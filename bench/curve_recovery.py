"""Answer-feature recovery of 03's SAEs against training steps at 03's default lr: what the sweep's
row cap must leave room for (run_all.sh: 1M rows at three times the lr, bench/sweep_lr_rows.py).

    .venv/bin/python bench/curve_recovery.py                                  # TopK k 2 / 512, 5 seeds
    .venv/bin/python bench/curve_recovery.py --arch topk --k 3 --d-sae 384 --steps 6000 --every 1000
    .venv/bin/python bench/curve_recovery.py --k 2 --d-sae 256 --sae-args="--init data"      # decoder from data rows

Runs 03 with its defaults (the plateau schedule, capped at --steps steps) in pieces of --every
steps (--stop-after-steps, then --resume: the same run as an unbroken one, bit for bit) and after
each piece scores every seed's decoder rows, read from the checkpoint, against the site's answer
features (lib/ground_truth.py: recovered = some decoder row at cos > RECOVERY_COS, 0.9). Prints one line per
piece: per-seed recovery, the lowest seed, the share every seed recovers, the held-out EV 03 logged.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib.activations import open_acts  # noqa: E402
from lib import metrics as M  # noqa: E402
from lib.common import load_tensors  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "modadd" / "seed42" / "acts" / "resid_post.safetensors")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--seeds", nargs="+", default=["1", "2", "3", "4", "5"])
    ap.add_argument("--steps", type=int, default=8000, help="cap (the plateau may end the run sooner)")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=1024, help="03's default on modular addition's 11,492 rows")
    ap.add_argument("--lr", type=float, default=None, help="03's --lr (default: 03's default for the width and batch)")
    ap.add_argument("--threads", type=int, default=None, help="03's --threads")
    ap.add_argument("--sae-args", default="", help="more 03 flags, e.g. '--init data'")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "curve_recovery")
    a = ap.parse_args()
    if not a.acts.is_file():
        raise SystemExit(f"{a.acts} is missing (run_all.sh, or 01 + 02, make it)")
    acts = open_acts(a.acts)
    gt, _ = G.load_or_fit(acts)
    base = [sys.executable, str(ROOT / "03_train_sae.py"), "--acts", str(a.acts), "--out", str(a.out), "--arch", a.arch,
            "--k", str(a.k), "--d-sae", str(a.d_sae), "--seed", *a.seeds, "--max-tokens", str(a.steps * a.batch_size),
            "--batch-size", str(a.batch_size), "--quiet"]
    base += ["--lr", str(a.lr)] if a.lr else []
    base += ["--threads", str(a.threads)] if a.threads else []
    base += a.sae_args.split()
    print(f"{a.arch} k {a.k} / {a.d_sae} latents, seeds {' '.join(a.seeds)}, 03 defaults{' + ' + a.sae_args if a.sae_args else ''}, "
          f"cap {a.steps} steps")
    print(f"{'step':>6s} {'answer features recovered per seed (%)':40s} {'lowest':>6s} {'every':>6s} {'EV':>7s} {'s':>6s}")
    step, t0, first = 0, time.perf_counter(), True
    while step < a.steps:
        extra = ["--overwrite"] if first else ["--resume"]
        p = subprocess.run([*base, *extra, "--stop-after-steps", str(a.every)], capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-800:])
        first = False
        dirs = [a.out / f"seed{s}" for s in a.seeds] if len(a.seeds) > 1 else [a.out]
        recs, hits, evs, steps, done = [], [], [], [], True
        for d in dirs:
            ckpt = load_tensors(d / "checkpoint.safetensors", what="checkpoint")
            best, _ = M.best_feature_match(G.ground_truth_features(gt)["answer"], ckpt["sae.W_dec"].double())
            hits.append(best > G.RECOVERY_COS)
            recs.append(float(hits[-1].double().mean()))
            records = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in records if "heldout_ev" in r]
            evs.append(last[-1]["heldout_ev"] if last else float("nan"))
            steps.append(records[-1]["step"])
            done &= (d / "summary.json").is_file()
        step = max(steps)
        every = float(torch.stack(hits).all(0).double().mean())
        print(f"{step:6d} {' '.join(f'{100 * r:5.1f}' for r in recs):40s} {100 * min(recs):6.1f} {100 * every:6.1f} "
              f"{sum(evs) / len(evs):7.4f} {time.perf_counter() - t0:6.0f}", flush=True)
        if done:
            print("every SAE reached its plateau: " + "; ".join(
                json.loads((d / "summary.json").read_text())["stop_reason"] for d in dirs))
            break


if __name__ == "__main__":
    main()
