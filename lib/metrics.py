"""Every metric the pipeline reports, defined once, each with its formula.

03_train_sae.py logs with these, 04_evaluate.py and 05_overlap.py report with
these, and tests/test_metrics.py checks each on a case whose answer is known.
"""
from __future__ import annotations

import torch


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (SAEBench's definition).

    Pooled over all dimensions, so a dimension with large variance counts for
    more; this is 1 - FVU. It differs from the per-dimension mean of
    1 - mse_d / var_d when dimensions have unequal variance: we use this one everywhere.
    """
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(1.0 - resid / total.clamp_min(1e-30))


def affine_refit(x: torch.Tensor, acts: torch.Tensor, rows: torch.Tensor | None = None) -> tuple:
    """The best affine decoder of x from the code, x_hat = acts @ W + b, W and b by least squares
    over `rows` (a mask; all rows when None). Returns (x_hat on every row, W [m, d], b [d]), float64."""
    x, a = x.double(), acts.double()
    design = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype, device=a.device)], 1)
    fit = slice(None) if rows is None else rows
    coef = torch.linalg.lstsq(design[fit], x[fit], driver="gelsd" if x.device.type == "cpu" else None).solution
    return design @ coef, coef[:-1], coef[-1]


def refit_explained_variance(x: torch.Tensor, acts: torch.Tensor) -> float:
    """EV of the best affine decoder of x from the code (affine_refit), fitted and scored on these
    rows. A diagnostic of shrinkage (Wright & Sharkey 2024): an L1 penalty pulls every active
    value toward 0, which a refit undoes, while a code that chose the wrong latents stays poor.
    The gap to the SAE's own EV is what its magnitudes, not its choices, cost."""
    return explained_variance(x.double(), affine_refit(x, acts)[0])


def l0(acts: torch.Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float((acts != 0).sum(-1).double().mean())


# ----------------------------------------------------------------------------
# Reconstruction (04_evaluate.py). x, x_hat: [N, d]. All pooled in float64.

def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MSE = (1/N) sum_n ||x_n - x_hat_n||^2: squared error summed over the d dimensions,
    averaged over rows (the same quantity 03_train_sae.py logs as `mse`)."""
    return float((x.double() - x_hat.double()).pow(2).sum() / max(len(x), 1))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Normalised MSE (fraction of variance unexplained) FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    = 1 - explained_variance(x, x_hat)."""
    return 1.0 - explained_variance(x, x_hat)


def cosine_similarity(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over rows of cos(x_n, x_hat_n) = <x_n, x_hat_n> / (||x_n|| ||x_hat_n||).
    Rows with x_n = 0 (cosine undefined) are left out; x_hat_n = 0 for x_n != 0 counts 0."""
    x, x_hat = x.double(), x_hat.double()
    keep = x.norm(dim=-1) > eps
    x, x_hat = x[keep], x_hat[keep]
    num = (x * x_hat).sum(-1)
    den = (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(eps)
    return float((num / den).mean()) if len(x) else float("nan")


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over rows of ||x_hat_n|| / ||x_n|| (1 = norms preserved; < 1 = shrinkage).
    Rows with x_n = 0 (ratio undefined) are left out."""
    x, x_hat = x.double(), x_hat.double()
    keep = x.norm(dim=-1) > eps
    if not bool(keep.any()):
        return float("nan")
    return float((x_hat[keep].norm(dim=-1) / x[keep].norm(dim=-1)).mean())


# ----------------------------------------------------------------------------
# Sparsity and health. acts: the dense code [N, d_sae].

def firing_frequency(acts: torch.Tensor) -> torch.Tensor:
    """Per latent: the fraction of rows on which it is non-zero, freq_i = (1/N) sum_n 1[f_ni != 0]. [d_sae]"""
    return (acts != 0).double().mean(0)


def dead_fraction(acts: torch.Tensor) -> float:
    """Fraction of latents that never fire on these rows: mean_i 1[freq_i == 0]."""
    return float((firing_frequency(acts) == 0).double().mean())


def empty_fraction(acts: torch.Tensor) -> float:
    """Fraction of rows on which no latent fires: mean_n 1[f_n == 0]. Such a row is reconstructed
    as b_dec alone. An exact-k code (TopK) has none; a thresholded one (ReLU, JumpReLU, BatchTopK at
    inference) can, and on modular addition those rows lose the answer: they are where JumpReLU's
    KL comes from (README, "Rows with no latent")."""
    return float(((acts != 0).sum(-1) == 0).double().mean())


def dense_fraction(acts: torch.Tensor, threshold: float = 0.1) -> float:
    """Fraction of latents active on more than `threshold` (10%) of rows: mean_i 1[freq_i > 0.1]."""
    return float((firing_frequency(acts) > threshold).double().mean())


# ----------------------------------------------------------------------------
# Downstream (splice the reconstruction into the model). Shared with lm.py.

def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean).

    1 = splicing the SAE in costs nothing; 0 = as bad as zero-ablating the site.
    NaN when CE_zero == CE_clean (the site does not matter, so the ratio is undefined).
    """
    den = ce_zero - ce_clean
    if abs(den) < 1e-12:
        return float("nan")
    return float((ce_zero - ce_sae) / den)


def kl_divergence(logits_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(P_ref || P) = sum_c P_ref(c) (log P_ref(c) - log P(c)),
    P = softmax(logits); P_ref from the clean model."""
    return float(kl_rows(logits_ref, logits).mean())


def kl_rows(logits_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, KL(P_ref || P) as in kl_divergence: [N] (float64)."""
    lp_ref = torch.log_softmax(logits_ref.double(), -1)
    lp = torch.log_softmax(logits.double(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of -log softmax(logits)[label]."""
    return float(torch.nn.functional.cross_entropy(logits.double(), labels))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax logit is the label."""
    return float((logits.argmax(-1) == labels).double().mean())


# ----------------------------------------------------------------------------
# Dictionary overlap (05_overlap.py) and matching. Rows are directions.

def _unit(W: torch.Tensor) -> torch.Tensor:
    W = W.double()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """C[i, j] = cos(A_i, B_j) for row sets A [n, d], B [m, d]."""
    return _unit(A) @ _unit(B).T


def mean_max_abs_cos(A: torch.Tensor, B: torch.Tensor) -> float:
    """Symmetric mean max |cos|: (1/2) [ mean_i max_j |cos(A_i, B_j)| + mean_j max_i |cos(A_i, B_j)| ]."""
    C = cosine_matrix(A, B).abs()
    return float(0.5 * (C.max(1).values.mean() + C.max(0).values.mean()))


def hungarian_match(C: torch.Tensor, maximize: bool = True):
    """One-to-one matching maximising sum C[i, j] (scipy linear_sum_assignment; rectangular
    C matches min(n, m) pairs). Returns (rows, cols) as LongTensors."""
    from scipy.optimize import linear_sum_assignment
    r, c = linear_sum_assignment(C.detach().cpu().numpy(), maximize=maximize)
    return torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)


def hungarian_mcc(A: torch.Tensor, B: torch.Tensor, signed: bool = True) -> float:
    """Hungarian-matched mean cosine (PW-MCC, Song et al. 2025): match rows of A and B one to one
    maximising the total cosine, report the mean matched cosine. signed=True matches on cos
    (for SAE decoders: codes are >= 0, so a flipped row is a different latent); signed=False on |cos|
    (for directions whose sign is arbitrary, e.g. cos/sin ground truth)."""
    C = cosine_matrix(A, B)
    if not signed:
        C = C.abs()
    r, c = hungarian_match(C)
    return float(C[r, c].mean())


def matched_both_fraction(dec_a, dec_b, enc_a, enc_b, threshold: float = 0.7) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Paulo & Belrose 2025: latents matched one to one (Hungarian on signed decoder cosine);
    a latent is shared when its matched partner has cos > 0.7 on the decoder row AND on the
    encoder column. dec_*: [d_sae, d_in] rows; enc_*: [d_sae, d_in] (W_enc transposed).
    Returns (shared fraction of min(n, m) matched pairs, rows, cols)."""
    Cd = cosine_matrix(dec_a, dec_b)
    r, c = hungarian_match(Cd)
    ce = (_unit(enc_a[r]) * _unit(enc_b[c])).sum(1)
    shared = (Cd[r, c] > threshold) & (ce > threshold)
    return float(shared.double().mean()), r, c


def matched_activation_correlation(acts_a: torch.Tensor, acts_b: torch.Tensor, rows, cols) -> float:
    """Mean Pearson correlation over matched pairs (i, j) of latent i of A and latent j of B on the
    same inputs: corr_ij = cov(f_i, g_j) / (std f_i std g_j); pairs where either latent is constant
    on these inputs are skipped (NaN if none is left)."""
    fa, fb = acts_a[:, rows].double(), acts_b[:, cols].double()
    fa = fa - fa.mean(0)
    fb = fb - fb.mean(0)
    sa, sb = fa.norm(dim=0), fb.norm(dim=0)
    ok = (sa > 1e-12) & (sb > 1e-12)
    if not bool(ok.any()):
        return float("nan")
    corr = (fa * fb).sum(0)[ok] / (sa[ok] * sb[ok])
    return float(corr.mean())


def expected_max_abs_cos(n: int, d: int) -> float:
    """Analytic E[max of n |cos|] between a fixed unit vector and n independent uniform unit vectors
    on S^{d-1}. u_1^2 ~ Beta(1/2, (d-1)/2), so P(|u_1| <= t) = I_{t^2}(1/2, (d-1)/2) (regularised
    incomplete beta) and E[max] = int_0^1 (1 - I_{t^2}(1/2, (d-1)/2)^n) dt, integrated numerically."""
    from scipy import integrate, special
    if d <= 1:
        return 1.0
    f = lambda t: 1.0 - special.betainc(0.5, (d - 1) / 2.0, t * t) ** n
    pts = [x for x in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7) if x < 1]
    return float(integrate.quad(f, 0.0, 1.0, limit=400, points=pts)[0])


def analytic_mean_max_abs_cos(n_a: int, n_b: int, d: int) -> float:
    """Expected symmetric mean max |cos| (mean_max_abs_cos) of two independent dictionaries of
    n_a and n_b rows drawn uniformly on S^{d-1}: (E[max of n_b] + E[max of n_a]) / 2. Exact in
    expectation: for a fixed row of A the n_b cosines to B are independent. Random dictionaries
    drawn isotropically inside an r-dimensional subspace use d = r."""
    return 0.5 * (expected_max_abs_cos(n_b, d) + expected_max_abs_cos(n_a, d))


def random_unit_rows(n: int, d: int, generator: torch.Generator, basis: torch.Tensor | None = None) -> torch.Tensor:
    """n unit vectors uniform on the sphere of R^d, or, with basis [r, d] (orthonormal rows),
    uniform on the unit sphere of that r-dimensional subspace."""
    if basis is None:
        return _unit(torch.randn(n, d, generator=generator, dtype=torch.float64))
    z = torch.randn(n, basis.shape[0], generator=generator, dtype=torch.float64)
    return _unit(z @ basis.double())


def pca_basis(x: torch.Tensor, var_frac: float = 0.99) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Principal directions of x (centred): (components [d, d] rows by decreasing variance,
    explained-variance ratios [d], r = smallest number of components holding >= var_frac of the variance)."""
    X = x.double() - x.double().mean(0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    ratio = S.pow(2) / S.pow(2).sum().clamp_min(1e-30)
    r = int((ratio.cumsum(0) < var_frac - 1e-12).sum()) + 1
    return Vh, ratio, min(r, len(ratio))


# ----------------------------------------------------------------------------
# Ground-truth feature recovery (modular addition; lib/ground_truth.py supplies the feature sets).
# gt: [n, d] rows, one per value of a table's variable; dec: [m, d] decoder rows. Signed cosines
# throughout: SAE codes are >= 0, so a latent only ever writes +row; -row is a different feature.

def best_feature_match(gt: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ground-truth row i: (max_j cos(gt_i, dec_j), argmax_j). [n], [n]."""
    if len(dec) == 0:
        return torch.full((len(gt),), float("-inf"), dtype=torch.float64), torch.zeros(len(gt), dtype=torch.long)
    best = cosine_matrix(gt, dec).max(1)
    return best.values, best.indices


def recovery_fraction(gt: torch.Tensor, dec: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of ground-truth rows recovered: (1/n) sum_i 1[max_j cos(gt_i, dec_j) > threshold]."""
    best, _ = best_feature_match(gt, dec)
    return float((best > threshold).double().mean()) if len(gt) else float("nan")


def feature_mcc(gt: torch.Tensor, dec: torch.Tensor) -> float:
    """MCC of a feature table: (1/n) sum_{(i, j) in H} cos(gt_i, dec_j), H the one-to-one (Hungarian)
    matching of the n ground-truth rows to decoder rows maximising the total signed cosine.
    Equals hungarian_mcc(gt, dec) when m >= n; when the decoder has fewer rows (m < n) the n - m
    unmatched ground-truth rows count 0 here (a smaller dictionary cannot hold the whole table)."""
    if len(gt) == 0:
        return float("nan")
    if len(dec) == 0:
        return 0.0
    C = cosine_matrix(gt, dec)
    r, c = hungarian_match(C)
    return float(C[r, c].sum() / len(gt))


def latent_selectivity(acts: torch.Tensor, values: torch.Tensor, p: int) -> torch.Tensor:
    """Per latent l: sel_l = max_v S_lv / sum_n f_nl, with S_lv = sum_{n: v in values_n} f_nl, the
    share of its activation mass on its best value v of the variable. acts [N, L] non-negative codes;
    values [N] (one variable, e.g. c) or [N, k] (a row holds value v when any of its k entries is v,
    counted once; e.g. (a, b) for the operand table). NaN for latents that never fire.
    One value only -> 1; even mass over a single variable on a balanced set of rows -> 1 / p."""
    if bool((acts < 0).any()):
        raise ValueError("latent_selectivity needs non-negative codes")
    if len(values) != len(acts):
        raise ValueError(f"values has {len(values)} rows, acts {len(acts)}")
    S, tot = value_sums(acts, values, p)                # [p, L]; a value twice on a row counts once
    sel = S.max(0).values / tot.clamp_min(1e-300)
    return torch.where(tot > 0, sel, torch.full_like(sel, float("nan")))


def mean_selectivity(acts: torch.Tensor, values: torch.Tensor, p: int) -> float:
    """Mean of latent_selectivity over the latents that fire (NaN if none does)."""
    sel = latent_selectivity(acts, values, p)
    sel = sel[~torch.isnan(sel)]
    return float(sel.mean()) if len(sel) else float("nan")


def value_presence(values: torch.Tensor, p: int) -> torch.Tensor:
    """[N, p] bool: row n holds value v (values [N], or [N, k]: any of its k entries is v)."""
    values = values.long()
    if values.ndim == 1:
        values = values[:, None]
    present = torch.zeros(len(values), p, dtype=torch.bool)
    for j in range(values.shape[1]):
        present[torch.arange(len(values)), values[:, j]] = True
    return present


def value_sums(acts: torch.Tensor, values: torch.Tensor, p: int, count: bool = False):
    """(S [p, L], tot [L]), float64: S = value_presence(values, p).T @ w and tot = w summed per
    latent, with w = acts (count=False) or 1 where acts > 0 (count=True), from the non-zero
    entries only: a code has ~k of L latents on per row, so the dense product is ~L / k times
    the work (04 scores every SAE's code and its chance codes this way)."""
    values = values.long()
    if values.ndim == 1:
        values = values[:, None]
    n, l = (acts > 0).nonzero(as_tuple=True) if count else acts.nonzero(as_tuple=True)
    w = torch.ones(len(n), dtype=torch.float64) if count else acts[n, l].double()
    S = torch.zeros(p, acts.shape[1], dtype=torch.float64)
    for j in range(values.shape[1]):
        v = values[n, j]
        first = torch.ones_like(v, dtype=torch.bool)
        for i in range(j):                              # a value twice on a row counts once
            first &= values[n, i] != v
        S.index_put_((v[first], l[first]), w[first], accumulate=True)
    return S, torch.zeros(acts.shape[1], dtype=torch.float64).index_add_(0, l, w)


def firing_f1(acts: torch.Tensor, values: torch.Tensor, p: int) -> torch.Tensor:
    """Per value v, the best over latents l of the F1 score between "l fires" (acts > 0) and "the
    row holds v" (values as in latent_selectivity): F1 = 2 |fire_l & holds_v| / (|fire_l| + |holds_v|).
    1 when some latent fires on exactly the rows holding v. Read off the code, not the decoder, it
    does not see a direction that every latent shares with b_dec: with exactly k latents active on
    every row, d_l -> d_l + u / f_l, b_dec -> b_dec - k u leaves every reconstruction unchanged (the
    activations f_l are near constant per latent on this grid) but moves every decoder row's cosine
    to the table (bench/offset_gauge.py). Returns [p] float64."""
    if len(values) != len(acts):
        raise ValueError(f"values has {len(values)} rows, acts {len(acts)}")
    inter, n_fire = value_sums(acts, values, p, count=True)                   # [p, L], [L]
    n_value = value_presence(values, p).sum(0, dtype=torch.float64)
    f1 = 2 * inter / (n_value[:, None] + n_fire[None, :]).clamp_min(1e-300)
    return f1.max(1).values if acts.shape[1] else torch.zeros(p, dtype=torch.float64)


def firing_recovery(acts: torch.Tensor, values: torch.Tensor, p: int, threshold: float = 0.9) -> float:
    """Fraction of values recovered by firing: (1/p) sum_v 1[firing_f1(acts, values, p)_v > threshold]."""
    return float((firing_f1(acts, values, p) > threshold).double().mean())


def plane_share(dec: torch.Tensor, planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation-invariant Fourier view. planes [K, 2, d]: orthonormal rows per plane (a zero row for a
    1-D plane; ground_truth.planes builds them). Per decoder row u: share(u) = max_k ||P_k u||^2 / ||u||^2
    = max_k sum_r <q_kr, u>^2 / ||u||^2, the share of its energy inside a single key-frequency plane.
    Returns (share [m], index of the best plane [m]). Chance for an isotropic unit row in R^d: E ||P_k u||^2 = 2 / d."""
    U = _unit(dec)
    if len(planes) == 0:
        return torch.zeros(len(U), dtype=torch.float64), torch.zeros(len(U), dtype=torch.long)
    e = torch.einsum("krd,md->mkr", planes.double(), U).pow(2).sum(-1)     # [m, K]
    best = e.max(1)
    return best.values, best.indices


def seed_agreement(gt: torch.Tensor, decoders, threshold: float = 0.9) -> dict:
    """Do several SAEs (decoders, a list of [m_s, d]) recover the same ground-truth features?
    Decoder s recovers row i when max_j cos(gt_i, dec_s_j) > threshold; its matched latent is that argmax.
    - per pair (s, t): both = (1/n) sum_i 1[recovered by s and by t];
      pw_mcc_gt = mean over the rows both recover of cos(dec_s[match_s(i)], dec_t[match_t(i)])
      (NaN when they share none);
    - every = (1/n) sum_i 1[recovered by every decoder];
    - mean_both, mean_pw_mcc_gt: means over the pairs (pw_mcc_gt over the pairs where it is defined)."""
    rec, idx = [], []
    for D in decoders:
        best, j = best_feature_match(gt, D)
        rec.append(best > threshold)
        idx.append(j)
    n = len(gt)
    pairs = []
    for s in range(len(decoders)):
        for t in range(s + 1, len(decoders)):
            both = rec[s] & rec[t]
            if bool(both.any()):
                us = _unit(decoders[s][idx[s][both]])
                ut = _unit(decoders[t][idx[t][both]])
                pw = float((us * ut).sum(1).mean())
            else:
                pw = float("nan")
            pairs.append({"a": s, "b": t, "both": float(both.double().sum() / max(n, 1)),
                          "n_both": int(both.sum()), "pw_mcc_gt": pw})
    every = torch.stack(rec).all(0) if rec else torch.zeros(n, dtype=torch.bool)
    pw_def = [q["pw_mcc_gt"] for q in pairs if q["pw_mcc_gt"] == q["pw_mcc_gt"]]
    return {"recovered": [float(r.double().mean()) for r in rec], "pairs": pairs,
            "every": float(every.double().mean()) if n else float("nan"),
            "mean_both": sum(q["both"] for q in pairs) / len(pairs) if pairs else float("nan"),
            "mean_pw_mcc_gt": sum(pw_def) / len(pw_def) if pw_def else float("nan"),
            "threshold": threshold}
