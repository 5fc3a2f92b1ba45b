"""Which ground-truth features an SAE misses, and where they went: per SAE, the answer features
with no decoder row at cos > RECOVERY_COS (lib/ground_truth.py), each with its best latent and
the feature that latent serves best; and how the SAE's live latents divide up.

    .venv/bin/python bench/missed_features.py runs/modadd/seed42/sae/resid_post/k2_d256/topk/seed*

Reads the SAEs (sae.py) and the ground truth 02 wrote beside --acts; prints, per SAE:
missed / features, latents matching an answer feature (cos > 0.9), an operand feature, neither
(live), dead (never in the code on any row), then one line per missed feature, and how the
missed divide: taken (their best latent is another value's, at cos > 0.9 with it: two values
share a latent), impure (their best latent is their own, mixed with other directions below 0.9),
neither. Each missed line also says on which rows its best latent fires: the share of its own
value's rows, and the values on half or more of whose rows it fires (a "multi-value" latent
when there are several).
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
from lib.activations import open_acts  # noqa: E402
from sae import SAE  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saes", nargs="+", type=Path, help="SAE directories (03's output)")
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "modadd" / "seed42" / "acts" / "resid_post.safetensors")
    ap.add_argument("--feature", default="answer", help="the feature set to audit (default answer)")
    a = ap.parse_args()
    if not a.acts.is_file():
        raise SystemExit(f"--acts {a.acts} is missing (run_all.sh, or 01 + 02, make it)")
    acts = open_acts(a.acts)
    gt, _ = G.load_or_fit(acts)
    feats = G.ground_truth_features(gt)
    if a.feature not in feats:
        raise SystemExit(f"--feature {a.feature}: this site's ground truth has {', '.join(feats)}")
    x = acts.x.float()                                                    # every row of the p x p grid
    for d in a.saes:
        if not d.is_dir():
            raise SystemExit(f"{d} is not an SAE directory")
        sae = SAE.load(d)
        sae.eval()
        with torch.no_grad():
            code = sae.encode(x)
        active = code > 0                                                     # [rows, d_sae]
        fired = active.any(0)
        values = G.feature_values(gt, a.feature, acts.labels["a"], acts.labels["b"])
        on, _ = M.value_sums(code, values, gt.p, count=True)                # [p, d_sae] rows fired on, per value
        on = on / M.value_presence(values, gt.p).sum(0, dtype=torch.float64)[:, None]   # as a share of the value's rows
        cos = {n: M.cosine_matrix(f, sae.W_dec.detach()) for n, f in feats.items()}    # [n_features, d_sae]
        own = cos[a.feature]
        among = M.cosine_matrix(feats[a.feature], feats[a.feature])          # the features' cosines with each other
        best = own.max(1)
        missed = (best.values <= G.RECOVERY_COS).nonzero().flatten().tolist()
        match = {n: c.max(0).values > G.RECOVERY_COS for n, c in cos.items()}
        neither = fired.clone()
        for m in match.values():
            neither &= ~m
        roles = ", ".join(f"{n} {int(m.sum())}" for n, m in match.items())
        covers = on >= 0.5                                     # [p, d_sae]: j fires on half or more of v's rows
        spread = covers.sum(0)                                 # [d_sae] values each latent covers
        print(f"{d}: missed {len(missed)} / {own.shape[0]} {a.feature} features; latents matching {roles}, "
              f"neither (live) {int(neither.sum())}, dead {int((~fired).sum())} of {sae.d_sae}; latents firing on half "
              f"or more of the rows of several {a.feature} values {int((spread > 1).sum())} (the broadest {int(spread.max())})"
              + budget(active, spread > 1))
        kinds = {"taken": 0, "impure": 0, "neither": 0, "multi-value": 0}
        for f in missed:
            j = int(best.indices[f])
            serves = int(own[:, j].argmax())
            kinds["impure" if serves == f else "taken" if own[serves, j] > G.RECOVERY_COS else "neither"] += 1
            pair = "" if serves == f else f"; the two features' cos {float(among[f, serves]):.3f}"
            many = covers[:, j].nonzero().flatten().tolist()
            kinds["multi-value"] += len(many) > 1
            shown = ", ".join(map(str, many[:6])) + (f", ... ({len(many)} values)" if len(many) > 6 else "")
            print(f"   {a.feature} {f}: best latent {j} (cos {float(best.values[f]):.3f}) serves {a.feature} {serves} "
                  f"(cos {float(own[serves, j]):.3f}{pair}); fires on {100 * float(on[f, j]):.0f}% of {f}'s rows, "
                  f"on half or more of those of {shown or 'none'}")
        if missed:
            print(f"   of the missed: {kinds['taken']} taken by a latent of another {a.feature} value (cos > "
                  f"{G.RECOVERY_COS} with it), {kinds['impure']} with a latent of their own below {G.RECOVERY_COS}, "
                  f"{kinds['neither']} neither; {kinds['multi-value']} of the {len(missed)} best latents fire on half or "
                  f"more of the rows of several values")


def budget(active: torch.Tensor, multi: torch.Tensor) -> str:
    """Where the code spends its latents: mean L0 on the rows where a multi-value latent fires
    and on the rest (a TopK code has k on every row; BatchTopK, ReLU and JumpReLU choose)."""
    if not multi.any():
        return ""
    rows, l0 = active[:, multi].any(1), active.sum(1).double()
    rest = f", {float(l0[~rows].mean()):.2f} elsewhere" if (~rows).any() else ""
    return f"; on the {100 * float(rows.double().mean()):.0f}% of rows where one fires L0 {float(l0[rows].mean()):.2f}{rest}"


if __name__ == "__main__":
    main()
