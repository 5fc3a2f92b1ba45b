"""Do two seeds' encoders agree where the data lives? 05's "shared" counts latent pairs whose
decoder rows and encoder rows both match at cos > 0.7; for JumpReLU at k 2 / 256 it is ~0 while
its decoders match as well as TopK's. An encoder row has components the data never reaches
(outside the span of the centred activations), which no loss term pins down; this compares the
matched encoder rows in full and inside the principal subspace holding 99% of the variance.

    .venv/bin/python bench/encoder_agreement.py DIR_A DIR_B [DIR_A DIR_B ...] --acts ACTS

Pairs of SAE directories; latents matched by Hungarian on decoder cosine (as 05 does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import metrics as M  # noqa: E402
from lib.activations import open_acts  # noqa: E402
from sae import SAE  # noqa: E402


def matched_cos(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """cos(A_i, B_i) of rows already put in matched order: [n]."""
    return M.cosine_matrix(A, B).diagonal()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saes", nargs="+", type=Path, help="SAE directories, in pairs")
    ap.add_argument("--acts", type=Path, default=ROOT / "runs/modadd/seed42/acts/resid_post.safetensors")
    args = ap.parse_args()
    if len(args.saes) % 2:
        raise SystemExit("give SAE directories in pairs")
    x = open_acts(args.acts).x.double()
    _, S, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    r = int(((S ** 2).cumsum(0) / (S ** 2).sum() < 0.99).sum()) + 1
    P = Vh[:r]                                                   # [r, d_in]: the data's subspace
    print(f"data subspace: {r} of {x.shape[1]} dimensions (99% of the variance of {args.acts})")
    print(f"{'pair':<58} {'dec cos':>8} {'enc cos':>8} {'>0.7':>6} {'enc in subspace':>16} {'>0.7':>6} "
          f"{'enc outside':>12} {'enc norm in subspace':>21}")
    for A_dir, B_dir in zip(args.saes[::2], args.saes[1::2]):
        A, B = SAE.load(A_dir), SAE.load(B_dir)
        C_dec = M.cosine_matrix(A.W_dec.detach(), B.W_dec.detach())
        ia, ib = M.hungarian_match(C_dec)                          # as 05 matches latents
        dec = C_dec[ia, ib]
        E_a, E_b = A.W_enc.detach().double().T[ia], B.W_enc.detach().double().T[ib]    # [d_sae, d_in], matched
        enc = matched_cos(E_a, E_b)
        enc_in = matched_cos(E_a @ P.T, E_b @ P.T)
        enc_out = matched_cos(E_a - E_a @ P.T @ P, E_b - E_b @ P.T @ P)     # the rest
        share_in = ((E_a @ P.T).norm(dim=1) / E_a.norm(dim=1)).median()
        name = "/".join(A_dir.parts[-2:]) + " ~ " + B_dir.name
        print(f"{name[-58:]:<58} {dec.median():8.3f} {enc.median():8.3f} {(enc > 0.7).double().mean():6.3f} "
              f"{enc_in.median():16.3f} {(enc_in > 0.7).double().mean():6.3f} {enc_out.median():12.3f} {share_in:21.3f}")
    print("columns: medians over matched latents (dec / enc cos), the share of them above 0.7, the encoder "
          "rows' components outside the subspace (cos), and the median share of an encoder row's norm inside it")


if __name__ == "__main__":
    main()
