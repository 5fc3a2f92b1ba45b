"""Where a saved SAE's dead latents sit: can AuxK still reach them?

    .venv/bin/python bench/dead_pre.py --acts runs/modadd/seed42/acts/resid_post.safetensors SAE_DIR...

Dead = never in the SAE's code on any row of --acts (its inference code). For each SAE: how many
dead latents have a pre-activation <= 0 on *every* row, and how the best pre-activation of the
others compares with that of the live latents. AuxK (Gao et al. 2024) decodes the k_aux largest
dead pre-activations ReLU'd, as openai/sparse_autoencoder and sparsify do (03's default for the
TopK family): a latent below zero on every row gets no gradient from it, nor from the main loss,
so it stays dead whatever the length of the run. `03 --auxk-input raw` decodes raw values, which
reach it (sae.py, "AuxK").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.activations import encode_all, open_acts  # noqa: E402
from sae import SAE  # noqa: E402


@torch.no_grad()
def dead_pre(sae: SAE, x: torch.Tensor, chunk: int = 4096) -> dict:
    """Dead latents of `sae` on rows x and the largest pre-activation of every latent."""
    codes, _ = encode_all(sae, x, chunk)
    dead = (codes == 0).all(0)
    best = torch.full((sae.d_sae,), -torch.inf)
    for i in range(0, len(x), chunk):
        xc = x[i:i + chunk] - (sae.b_dec if sae.apply_b_dec_to_input else 0)
        best = torch.maximum(best, (xc @ sae.W_enc + sae.b_enc).amax(0))
    below = dead & (best <= 0)
    live_best = float(best[~dead].median()) if (~dead).any() else float("nan")
    others = best[dead & ~below]
    return {"dead": int(dead.sum()), "below_zero": int(below.sum()),
            "others_best_vs_live": float(others.median()) / live_best if len(others) else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, required=True, help="activations file the SAEs were trained on")
    ap.add_argument("saes", type=Path, nargs="+", help="SAE directories (sae_weights.safetensors + cfg.json)")
    a = ap.parse_args()
    x = open_acts(a.acts).x
    print(f"{'SAE':44s} {'arch':>9s} {'k':>3s} {'d_sae':>5s} {'dead':>6s} {'dead, pre <= 0 on every row':>28s}"
          f" {'other dead: best pre / live best pre (medians)':>47s}")
    for d in a.saes:
        sae = SAE.load(d)
        r = dead_pre(sae, x)
        share = f"{r['below_zero']} ({100 * r['below_zero'] / max(r['dead'], 1):.0f}%)"
        print(f"{str(d)[-44:]:44s} {sae.arch:>9s} {sae.k or 0:3d} {sae.d_sae:5d} "
              f"{100 * r['dead'] / sae.d_sae:5.1f}% {share:>28s} {r['others_best_vs_live']:47.2f}")


if __name__ == "__main__":
    main()
