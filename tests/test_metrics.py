"""Known-answer tests of metrics.py."""
from __future__ import annotations

import math

import pytest
import torch

from lib import metrics as M


def test_reconstruction_metrics_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) * torch.linspace(0.1, 3, 16) + 2.0
    assert M.explained_variance(x, x) == pytest.approx(1.0, abs=1e-12)
    assert M.fvu(x, x) == pytest.approx(0.0, abs=1e-12)
    assert M.mse(x, x) == 0.0
    assert M.cosine_similarity(x, x) == pytest.approx(1.0)
    assert M.l2_ratio(x, 0.5 * x) == pytest.approx(0.5)
    # Predicting the mean explains nothing: EV 0, FVU 1.
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert M.explained_variance(x, mean) == pytest.approx(0.0, abs=1e-12)
    assert M.fvu(x, mean) == pytest.approx(1.0, abs=1e-12)
    # MSE = mean over rows of the squared error summed over dimensions.
    assert M.mse(x, x + 1.0) == pytest.approx(16.0)
    # EV is pooled (SAEBench), not the per-dimension mean 1 - mse_d/var_d: errors only on the
    # small-variance dimension cost little pooled EV.
    x_hat = x.clone()
    x_hat[:, 0] = x[:, 0].mean()
    pooled = M.explained_variance(x, x_hat)
    var = x.double().var(0, unbiased=False)
    assert pooled == pytest.approx(1 - float(var[0] / var.sum()), abs=1e-9)
    assert pooled > 1 - 1 / 16 + 0.05    # the per-dimension mean would be exactly 1 - 1/16


def test_refit_ev_undoes_shrinkage_and_not_wrong_choices():
    """x = f @ D + b exactly, f sparse and non-negative. A code shrunk by a constant (every active
    value minus 40%, as an L1 penalty does) decodes through D to EV < 1, yet its refit EV is 1:
    the choices were right. A code with the right magnitudes on the wrong latents refits poorly."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2000, 40, generator=g) * (torch.rand(2000, 40, generator=g) < 0.1)
    D, b = torch.randn(40, 16, generator=g), torch.randn(16, generator=g)
    x = f @ D + b
    shrunk = 0.6 * f
    assert M.explained_variance(x, shrunk @ D + b) < 0.9
    assert M.refit_explained_variance(x, shrunk) == pytest.approx(1.0, abs=1e-9)
    wrong = f[torch.randperm(2000, generator=g)]              # each row's code is another row's
    assert M.refit_explained_variance(x, wrong) < 0.1


def test_sparsity_metrics():
    acts = torch.zeros(10, 4)
    acts[:, 0] = 1.0           # dense: fires on every row
    acts[0, 1] = 2.0           # fires on 10%: not dense (> 10% is)
    acts[:5, 2] = 0.5          # 50%
    assert M.firing_frequency(acts).tolist() == pytest.approx([1.0, 0.1, 0.5, 0.0])
    assert M.dead_fraction(acts) == 0.25
    assert M.dense_fraction(acts) == 0.5
    assert M.l0(acts) == pytest.approx(1.6)
    assert M.empty_fraction(acts) == 0.0          # latent 0 fires on every row
    acts[3:, 0] = 0.0                             # rows 5-9 now have no latent at all (rows 3, 4 keep latent 2)
    assert M.empty_fraction(acts) == 0.5


def test_loss_recovered_and_kl():
    assert M.loss_recovered(1.0, 1.0, 5.0) == 1.0
    assert M.loss_recovered(1.0, 5.0, 5.0) == 0.0
    assert M.loss_recovered(1.0, 2.0, 5.0) == pytest.approx(0.75)
    assert math.isnan(M.loss_recovered(1.0, 1.0, 1.0))
    lg = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    assert M.kl_divergence(lg, lg) == pytest.approx(0.0, abs=1e-12)
    # per row, by hand: P_ref = (1/2, 1/2), P = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    two = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    rows = M.kl_rows(two[[0, 0]], two[[0, 1]])
    assert rows.tolist() == pytest.approx([0.0, 0.5 * math.log(2) + 0.5 * math.log(2 / 3)])
    assert M.kl_divergence(two[[0, 0]], two[[0, 1]]) == pytest.approx(float(rows.mean()))
    assert M.kl_divergence(lg, lg + 3.0) == pytest.approx(0.0, abs=1e-12)   # softmax shift-invariant
    uniform = torch.zeros_like(lg)
    p = torch.softmax(lg.double(), -1)
    want = float((p * (p.log() + math.log(5))).sum(-1).mean())
    assert M.kl_divergence(lg, uniform) == pytest.approx(want)
    labels = lg.argmax(-1)
    assert M.accuracy(lg, labels) == 1.0


def test_overlap_of_a_dictionary_with_itself_and_a_permuted_copy():
    g = torch.Generator().manual_seed(3)
    D = M.random_unit_rows(256, 32, g)
    perm = torch.randperm(256, generator=g)
    for other in (D, D[perm]):
        assert M.mean_max_abs_cos(D, other) == pytest.approx(1.0)
        assert M.hungarian_mcc(D, other) == pytest.approx(1.0)
        frac, r, c = M.matched_both_fraction(D, other, D, other)
        assert frac == 1.0
    _, r, c = M.matched_both_fraction(D, D[perm], D, D[perm])
    assert torch.equal(perm[c], r)             # the matching undoes the permutation
    # A sign-flipped copy: |cos| overlap stays 1, the signed PW-MCC becomes -1.
    assert M.mean_max_abs_cos(D, -D) == pytest.approx(1.0)
    assert M.hungarian_mcc(D, -D, signed=False) == pytest.approx(1.0)
    # Signed matching: -D's rows are anti-parallel, so the best signed assignment pairs
    # unrelated rows and scores far below 1 (a flipped decoder row is a different latent).
    assert M.hungarian_mcc(D, -D) < 0.6


def test_analytic_random_baseline_matches_known_values_and_monte_carlo():
    # For 1024 x 128 the expected mean-max |cos| is ~0.299 (the reference value).
    ana = M.analytic_mean_max_abs_cos(1024, 1024, 128)
    assert ana == pytest.approx(0.299, abs=0.002)
    # d = 2: |u_1| = |cos(theta)|, theta uniform; with n = 1, E|cos| = 2 / pi.
    assert M.expected_max_abs_cos(1, 2) == pytest.approx(2 / math.pi, abs=1e-6)
    # d = 3: |u_1| is uniform on [0, 1], so E[max of n] = n / (n + 1).
    assert M.expected_max_abs_cos(4, 3) == pytest.approx(0.8, abs=1e-6)
    # Two independent random 1024 x 128 dictionaries score the analytic value within 0.01.
    g = torch.Generator().manual_seed(7)
    A, B = M.random_unit_rows(1024, 128, g), M.random_unit_rows(1024, 128, g)
    assert abs(M.mean_max_abs_cos(A, B) - ana) < 0.01
    # Hungarian on |cos| and on signed cosine: the issue's ~0.289 and ~0.272.
    assert M.hungarian_mcc(A, B, signed=False) == pytest.approx(0.289, abs=0.01)
    assert M.hungarian_mcc(A, B, signed=True) == pytest.approx(0.272, abs=0.01)
    # Inside a small subspace chance overlap is much higher, and the analytic value uses d = r.
    basis = torch.linalg.qr(torch.randn(128, 10, generator=g, dtype=torch.float64))[0].T
    As, Bs = M.random_unit_rows(1024, 128, g, basis), M.random_unit_rows(1024, 128, g, basis)
    sub = M.analytic_mean_max_abs_cos(1024, 1024, 10)
    assert sub > 0.8
    assert abs(M.mean_max_abs_cos(As, Bs) - sub) < 0.01


def test_activation_correlation_and_pca():
    g = torch.Generator().manual_seed(4)
    f = torch.rand(300, 6, generator=g)
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    rows, cols = torch.arange(6), torch.argsort(perm)
    assert M.matched_activation_correlation(f, f[:, perm], rows, cols) == pytest.approx(1.0)
    f2 = f.clone()
    f2[:, 0] = 0.0                              # a constant latent is skipped
    assert M.matched_activation_correlation(f, f2, rows, rows) == pytest.approx(1.0)
    x = torch.randn(2000, 8, generator=g) * torch.tensor([10.0, 5.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    comps, ratio, r = M.pca_basis(x, 0.99)
    assert r == 2 and ratio[:2].sum() > 0.99
    assert abs(comps[0, 0]) > 0.99


