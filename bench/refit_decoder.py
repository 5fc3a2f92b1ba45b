"""How much of an SAE's reconstruction gap is shrinkage a decoder refit undoes, measured on held-out rows.

    .venv/bin/python bench/refit_decoder.py --acts runs/modadd/seed42/acts/resid_post.safetensors SAE_DIR...

Per SAE: its code on every row (encoder untouched, so L0 and the latents' choices stay), a new
affine decoder x_hat = code @ W + b fitted by least squares on the SAE-train rows only (Wright &
Sharkey 2024's remedy for the L1 penalty's shrinkage, in closed form), and the held-out EV before
and after; then the feature sets recovered (cos > 0.9, lib/ground_truth.py) by the old decoder rows
and by the refitted ones (metrics.affine_refit). metrics.refit_explained_variance (bench_recipe.py's "refit") fits and
scores on all rows alike, so it reads higher than the held-out figure here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib import metrics as M  # noqa: E402
from lib.activations import encode_all, open_acts  # noqa: E402
from lib.common import run_main  # noqa: E402
from sae import SAE  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, required=True, help="a modular-addition site (02's file)")
    ap.add_argument("saes", nargs="+", type=Path, help="03 output directories")
    a = ap.parse_args()
    acts = open_acts(a.acts)
    gt, _ = G.load_or_fit(acts)
    x, held = acts.x.double(), ~acts.train
    for d in a.saes:
        sae = SAE.load(d)
        codes, x_hat = encode_all(sae, acts.x)
        x_refit, W, _ = M.affine_refit(x, codes, rows=acts.train)
        ev0 = M.explained_variance(x[held], x_hat.double()[held])
        ev1 = M.explained_variance(x[held], x_refit[held])
        W = torch.where(W.norm(dim=1, keepdim=True) > 0, W, sae.W_dec.detach().double())   # a dead latent keeps its row
        lab = {"a": acts.labels["a"], "b": acts.labels["b"]}
        r0 = G.score_decoder(gt, sae.W_dec.detach().double(), acts=codes, **lab)
        r1 = G.score_decoder(gt, W, acts=codes, **lab)
        rec = ", ".join(f"{n} {100 * r0[n]['recovered']:.1f}% -> {100 * r1[n]['recovered']:.1f}%" for n in r0)
        print(f"{d}: L0 {M.l0(codes):.2f}, held-out EV {ev0:.4f} -> {ev1:.4f} refitted; recovered {rec}")


if __name__ == "__main__":
    run_main(main)
