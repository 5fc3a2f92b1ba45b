"""Why a decoder's cosine to the ground truth can mislead at resid_mid: the gauge of an exact-k code.

    .venv/bin/python bench/offset_gauge.py                          # trains, then scores (~10 min, 2 cores)
    .venv/bin/python bench/offset_gauge.py --score DIR [DIR ...]    # score SAE directories only

resid_mid is ~98% one operand table: x ~ mu + O[a] + O[b]. A TopK SAE with k = 2 codes a row with
exactly two latents, and on this grid each latent's activation f_l is near constant, so decoder rows
f_l d_l -> f_l d_l + u with b_dec -> b_dec - 2u reconstruct every row the same: the loss cannot see u,
but every decoder row's cosine to its table row O[v] moves with it. Which u a run ends at is a matter
of its trajectory (longer training drifts further). Three views of one SAE's recovery, per table:

  cos        the fraction of table rows with a decoder row at cos > 0.9 (lib/ground_truth.py's
             `recovered`, the headline of 04 and REPORT.md);
  centred    the same after the common offset is removed: alive latents' vectors f_l d_l (f_l their
             mean activation when firing), minus their mean, against the table rows (which sum to 0
             over values, so a code with one latent per value gets u back exactly);
  firing     the fraction of values on whose rows some latent fires at F1 > 0.9
             (metrics.firing_f1; `recovered_firing` in 04), read off the code alone.

By default it trains TopK, k 2 / 256 latents, seeds 1-5 at resid_mid twice in one 03 pass each:
03's plateau window (10 evaluations) and a 3x longer one, and prints the three views for each SAE.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib import metrics as M  # noqa: E402
from lib.activations import encode_all, open_acts  # noqa: E402
from sae import SAE  # noqa: E402


def views(sae: SAE, acts, gt, a, b) -> dict:
    """Per ground-truth table: (cos, centred, firing) recovery, and |u| / mean |f_l d_l|."""
    codes, _ = encode_all(sae, acts.x)
    W = sae.W_dec.detach().double()
    alive = (codes > 0).any(0)
    f_mean = torch.where(codes > 0, codes, torch.nan).nanmean(0).double()
    V = W[alive] * f_mean[alive, None]                    # the vector each alive latent writes
    u = V.mean(0)
    Vc = V - u
    out = {"alive": int(alive.sum()), "offset": float(u.norm() / V.norm(dim=1).mean())}
    for n, F in G.ground_truth_features(gt).items():
        out[n] = [M.recovery_fraction(F, W, G.RECOVERY_COS), M.recovery_fraction(F, Vc, G.RECOVERY_COS),
                  M.firing_recovery(codes, G.feature_values(gt, n, a, b), gt.p, G.FIRING_F1)]
    return out


def score(acts_path: Path, dirs: list[Path], label: str = "") -> None:
    acts = open_acts(acts_path)
    gt, _ = G.load_or_fit(acts)
    a, b = acts.labels["a"], acts.labels["b"]
    names = list(G.ground_truth_features(gt))
    print(f"{'run':<24}{'EV':>8}{'steps':>7}{'alive':>7}{'|u|/|fd|':>10}"
          + "".join(f"{n + ': cos / centred / firing':>38}" for n in names))
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        v = views(SAE.load(d), acts, gt, a, b)
        cells = "".join(f"{'{:.1%} / {:.1%} / {:.1%}'.format(*v[n]):>38}" for n in names)
        print(f"{(label + d.name):<24}{s['heldout']['ev']:>8.4f}{s['steps']:>7}{v['alive']:>7}{v['offset']:>10.3f}{cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, default=ROOT / "runs/modadd/seed42/acts/resid_mid.safetensors")
    ap.add_argument("--score", type=Path, nargs="+", default=None, help="SAE directories to score (no training)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/offset_gauge"))
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--seeds", nargs="+", default=["1", "2", "3", "4", "5"])
    ap.add_argument("--windows", type=int, nargs="+", default=[10, 30], help="03 --plateau-window values")
    args = ap.parse_args()
    if args.score:
        return score(args.acts, args.score)

    def train(w: int) -> Path:
        out = args.out / f"window{w}"
        if not all((out / f"seed{s}" / "summary.json").is_file() for s in args.seeds):
            subprocess.run([sys.executable, str(ROOT / "03_train_sae.py"), "--acts", str(args.acts), "--out", str(out),
                            "--arch", "topk", "--k", str(args.k), "--d-sae", str(args.d_sae), "--seed", *args.seeds,
                            "--plateau-window", str(w), "--threads", "1", "--quiet", "--overwrite"], check=True)
        return out

    with ThreadPoolExecutor(2) as ex:
        outs = list(ex.map(train, args.windows))
    print(f"TopK k {args.k} / {args.d_sae} latents at {args.acts}, seeds {' '.join(args.seeds)}; "
          f"recovery at cos > {G.RECOVERY_COS}, firing at F1 > {G.FIRING_F1}")
    for w, out in zip(args.windows, outs):
        score(args.acts, [out / f"seed{s}" for s in args.seeds], label=f"window {w} ")


if __name__ == "__main__":
    main()
