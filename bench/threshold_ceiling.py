"""Can one latent with a threshold code a value feature at all? The ceiling of a ReLU / JumpReLU code
(a latent fires where a linear score of x passes a fixed threshold) against a TopK code (a latent fires
where its score is among the row's k largest), on a modular-addition site's own value features.

    .venv/bin/python bench/threshold_ceiling.py                          # resid_mid and resid_post
    .venv/bin/python bench/threshold_ceiling.py --sites resid_mid --sae runs/bench_recipe/mid_k2_d256/*

Per value v of a ground-truth feature set (lib/ground_truth.py: the operand set at resid_mid, a row
holding v when a = v or b = v; the answer set at resid_post, c = v), the F1 of "the detector fires"
against "the row holds v" over all p^2 rows (metrics.firing_f1's score), for three detectors:
  direction, threshold   score (x - mu) . T[v] / |T[v]| (the value's own table row), at the threshold
                         with the best F1: what a ReLU / JumpReLU latent pointed at the feature can do;
  linear, threshold      the best linear score for v (class-balanced logistic regression), at its
                         best threshold: what any single threshold latent can do. Fitted, threshold
                         included, on a random 70% of the rows and scored on the other 30% (seeded),
                         and fitted and scored on every row (in sample);
  direction, top-k       the same direction scores, firing where v's is among the row's k largest
                         (k = values per row: 2 operands, 1 answer): a TopK code over these p latents.
With --sae, each SAE's own code is scored the same way (metrics.firing_f1: best latent per value).
Prints the median F1 over values and how many values reach F1 > 0.9 (metrics' FIRING_F1).
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
from sae import SAE  # noqa: E402

FEATURE = {"resid_mid": "operand", "resid_post": "answer"}


def best_cut(scores: torch.Tensor, holds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores, holds [N, p]: per column, the best F1 over thresholds of "score >= t" against holds,
    and that t. Sorting each column descending, the cut after row i fires on i + 1 rows:
    F1 = 2 TP / (i + 1 + P)."""
    s, order = scores.sort(dim=0, descending=True)
    tp = holds.gather(0, order).double().cumsum(0)                       # [N, p]
    fired = torch.arange(1, len(scores) + 1, dtype=torch.float64)[:, None]
    f1, i = (2 * tp / (fired + holds.sum(0, dtype=torch.float64))).max(0)
    return f1, s.gather(0, i.unsqueeze(0)).squeeze(0)


def best_threshold_f1(scores: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """Per column of scores [N, p], the F1 against holds [N, p] of its best threshold (best_cut)."""
    return best_cut(scores, holds)[0]


def logistic_fit(x: torch.Tensor, holds: torch.Tensor, iters: int = 200):
    """One class-balanced logistic regression per column of holds [N, p] on x [N, d], float64,
    L-BFGS: returns score(x') -> logits [N', p] (x' standardised as x was)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
    xs, y = (x - mean) / std, holds.double()
    pos = y.sum(0)
    W = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    lossf = torch.nn.BCEWithLogitsLoss(pos_weight=(len(y) - pos) / pos)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = lossf(xs @ W + b, y)
        loss.backward()
        return loss
    opt.step(closure)
    W, b = W.detach(), b.detach()
    score = lambda x2: (x2 - mean) / std @ W + b          # noqa: E731
    score.weights = W / std[:, None]                       # [d, p]: each detector's direction in x's own basis
    return score


def heldout_linear_f1(x: torch.Tensor, holds: torch.Tensor, seed: int = 0, frac: float = 0.7) -> torch.Tensor:
    """Per column, the F1 on a held-out 1 - frac of the rows of a logistic detector whose weights and
    threshold (best F1) were fitted on the other rows."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(frac * len(x))], perm[int(frac * len(x)):]
    score = logistic_fit(x[tr], holds[tr])
    _, t = best_cut(score(x[tr]), holds[tr])                               # per column: the best cut
    fire = score(x[te]) >= t
    hits = (fire & holds[te]).sum(0, dtype=torch.float64)
    return 2 * hits / (fire.sum(0, dtype=torch.float64) + holds[te].sum(0, dtype=torch.float64)).clamp_min(1e-300)


def topk_code(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[N, p] 0/1 code: 1 on each row's k largest scores."""
    i = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores).scatter(1, i, 1.0)


def summary(f1: torch.Tensor) -> str:
    return f"{f1.median():.3f}  {int((f1 > G.FIRING_F1).sum()):4d} / {len(f1)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42", help="01's run (02's acts/ in it)")
    ap.add_argument("--sites", nargs="+", default=["resid_mid", "resid_post"], choices=sorted(FEATURE))
    ap.add_argument("--sae", nargs="*", type=Path, default=[], help="SAE dirs to score beside (their site: --sites[0])")
    a = ap.parse_args()
    print(f"{'site':11s} {'feature':8s} {'detector':32s} {'median F1':>9s}  F1 > {G.FIRING_F1}")
    for site in a.sites:
        path = a.run / "acts" / f"{site}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: extract it with 02_extract_activations.py --site {site}")
        acts = open_acts(path)
        gt, _ = G.load_or_fit(acts)
        name = FEATURE[site]
        values = G.feature_values(gt, name, acts.labels["a"], acts.labels["b"])
        holds = M.value_presence(values, gt.p)
        k = 1 if values.ndim == 1 else values.shape[1]
        x = acts.x.double()
        F = G.ground_truth_features(gt, [name])[name]                                         # [p, d] unit
        direction = (x - gt.mu.double()) @ F.T                                                 # [N, p]
        fit = logistic_fit(x, holds)
        rows = [("direction, threshold", best_threshold_f1(direction, holds)),
                ("linear, threshold (held out)", heldout_linear_f1(x, holds)),
                ("linear, threshold (in sample)", best_threshold_f1(fit(x), holds)),
                (f"direction, top-{k}", M.firing_f1(topk_code(direction, k), values, gt.p))]
        if site == a.sites[0]:
            for d in a.sae:
                sae = SAE.load(d)
                codes, _ = encode_all(sae, acts.x)
                rows.append((f"SAE code: {d.name} ({sae.arch})"[:32], M.firing_f1(codes, values, gt.p)))
        for label, f1 in rows:
            print(f"{site:11s} {name:8s} {label:32s} {summary(f1)}")
        cos = torch.nn.functional.cosine_similarity(fit.weights.T, F, dim=1)
        print(f"{site:11s} {name:8s} (in-sample linear detectors: median cosine {cos.median():.2f} with their value's own direction)")


if __name__ == "__main__":
    main()
