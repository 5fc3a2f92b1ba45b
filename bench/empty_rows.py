"""Where a thresholded code loses the answer: rows on which no latent fires.

    .venv/bin/python bench/empty_rows.py SAE_DIR [SAE_DIR ...]
    .venv/bin/python bench/empty_rows.py runs/modadd/seed42/sae/resid_post/k2_d256/{topk,batchtopk,relu,jumprelu}/seed42

A TopK code has exactly k latents on every row. ReLU, JumpReLU and BatchTopK (at inference, through
its threshold) fire a varying number, and on some rows none: the row is reconstructed as b_dec alone
and, at resid_post (which the unembedding reads directly), the model's answer is lost. For each SAE
over all p^2 rows of the grid (--acts) with the model spliced (--run): the rows by their L0, their
FVU (per-row squared error over the mean per-row variance), how many get the wrong answer, and the
share of the mean KL(clean || spliced) that comes from rows with no latent. For JumpReLU, how far
below threshold those rows' largest pre-activation sits (max_i pre_i / theta_i): near 1 means the
answer latent missed its threshold by a little, out of reach of the straight-through estimator's
kernel (the threshold's gradient only sees pre-activations within --bandwidth of it).
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
from lib.common import load_tensors  # noqa: E402
from lib.modadd import load_run  # noqa: E402
from sae import SAE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saes", nargs="+", type=Path, help="SAE directories (03's output)")
    ap.add_argument("--acts", type=Path, default=ROOT / "runs/modadd/seed42/acts/resid_post.safetensors")
    ap.add_argument("--run", type=Path, default=ROOT / "runs/modadd/seed42", help="the model the SAEs read")
    ap.add_argument("--max-l0", type=int, default=4, help="rows by L0 0 .. this (the last bin holds more too)")
    args = ap.parse_args()

    x = open_acts(args.acts).x.float()
    c = load_tensors(args.acts)["c"]
    model, cfg = load_run(args.run)
    assert cfg["model"]["n_layers"] == 1 and "resid_post" in str(args.acts), "resid_post of a one-layer model only"
    W_U = model.W_U.detach().float()
    logits_clean = x @ W_U
    var = ((x - x.mean(0)) ** 2).sum(1).mean()
    m = args.max_l0
    print(f"{len(x)} rows of {args.acts}; L0 bins 0..{m} ({m} holds more too)")
    print(f"{'SAE':<60} {'rows by L0':<34} {'FVU by L0':<34} {'wrong by L0':<26} KL   KL share L0=0")
    for d in args.saes:
        sae = SAE.load(d)
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
            logits = x_hat @ W_U
        l0 = (f > 0).sum(1).clamp(max=m)
        fvu = ((x - x_hat) ** 2).sum(1) / var
        wrong = logits.argmax(1) != c
        kl = M.kl_rows(logits_clean, logits)                   # the per-row KL 04 averages
        rows = [int((l0 == i).sum()) for i in range(m + 1)]
        fvus = [f"{fvu[l0 == i].mean():.3f}" if rows[i] else "-" for i in range(m + 1)]
        wr = [int((wrong & (l0 == i)).sum()) for i in range(m + 1)]
        share = float(kl[l0 == 0].sum() / kl.sum())
        name = "/".join(d.parts[-3:])[-60:]              # e.g. k2_d256/jumprelu/seed42
        print(f"{name:<60} {' '.join(map(str, rows)):<34} {' '.join(fvus):<34} {' '.join(map(str, wr)):<26} "
              f"{kl.mean():.4f} {share:.2f}")
        if sae.arch == "jumprelu" and rows[0]:
            with torch.no_grad():
                pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
            ratio = (pre / sae.threshold).max(1).values[l0 == 0]
            q = torch.quantile(ratio, torch.tensor([0.1, 0.5, 0.9])).tolist()
            print(f"{'':<60} rows with no latent: max_i pre_i / theta_i, quantiles 10/50/90%: "
                  + " ".join(f"{v:.2f}" for v in q))


if __name__ == "__main__":
    main()
