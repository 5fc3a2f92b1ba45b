"""Known-answer tests of lib/ground_truth.py and the ground-truth metrics in lib/metrics.py.

Every case is planted by hand (no model, no runs/): activations built from value tables whose
variance shares, ranks and key frequencies are known in closed form.
"""
from __future__ import annotations

import math

import pytest
import torch

from lib import ground_truth as G
from lib import metrics as M
from lib.common import UserError

P, D = 17, 32


def _grid(p):
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    return a, b


def _circle(p, k, u, w, radius):
    v = torch.arange(p, dtype=torch.float64)
    ang = 2 * math.pi * k * v / p
    return radius * (torch.cos(ang)[:, None] * u + torch.sin(ang)[:, None] * w)


def _planted(separate_operands=False, d_scale=1.0, noise=1e-4, seed=0):
    """x = mu + A[a] + B[b] + C[(a+b)%p] + D[(a-b)%p] + noise on the 17 x 17 grid, in a random
    orthonormal frame q_0 .. q_31. Per-value mean energies (mean_v ||T[v]||^2):
      A: circle k=3 radius 1 in (q0, q1)                                  -> 1
      B: 2 A (same directions)  or, separate, circle k=4 radius 2 in (q7, q8) -> 4
      C: sqrt3 circle k=5 in (q2, q3) + sqrt2 circle k=7 in (q4, q5)        -> 3 + 2 = 5
      D: d_scale cos(2 pi 2 v / p) q6 (a line, not a circle)                -> d_scale^2 / 2
    Every table sums to 0 over v, so share(T) = energy(T) / total energy."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    q = Q.T
    A = _circle(P, 3, q[0], q[1], 1.0)
    B = _circle(P, 4, q[7], q[8], 2.0) if separate_operands else 2 * A
    C = _circle(P, 5, q[2], q[3], math.sqrt(3)) + _circle(P, 7, q[4], q[5], math.sqrt(2))
    v = torch.arange(P, dtype=torch.float64)
    Dt = d_scale * torch.cos(2 * math.pi * 2 * v / P)[:, None] * q[6]
    a, b = _grid(P)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    x = mu + A[a] + B[b] + C[(a + b) % P] + Dt[(a - b) % P]
    x = x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, a, b, {"A": A, "B": B, "C": C, "D": Dt, "q": q}


# ----------------------------------------------------------------------------
# Fitting

def test_planted_tables_give_the_hand_computed_shares_ranks_and_keys():
    x, a, b, T = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    t = gt.info["tables"]
    tot = 1 + 4 + 5 + 0.5
    assert t["operand_a"]["share"] == pytest.approx(1 / tot, abs=1e-4)
    assert t["operand_b"]["share"] == pytest.approx(4 / tot, abs=1e-4)
    assert t["answer"]["share"] == pytest.approx(5 / tot, abs=1e-4)
    assert t["difference"]["share"] == pytest.approx(0.5 / tot, abs=1e-4)
    assert gt.info["additive_share"] == pytest.approx(10 / tot, abs=1e-4)
    # O = (A + B) / 2 = 1.5 A: share of O[a] + O[b] = 2 * 2.25 / 10.5; the O-model loses
    # ||A - O||^2 + ||B - O||^2 = 0.25 + 0.25 of the additive fit.
    assert gt.info["operands_merged"] and gt.info["operand_cos"]["median"] == pytest.approx(1.0, abs=1e-6)
    assert t["operand"]["share"] == pytest.approx(4.5 / tot, abs=1e-4)
    assert gt.info["operand_additive_share"] == pytest.approx(9.5 / tot, abs=1e-4)
    torch.testing.assert_close(gt.tables["operand"], 1.5 * T["A"], atol=1e-4, rtol=0)
    torch.testing.assert_close(gt.tables["answer"], T["C"], atol=1e-4, rtol=0)
    # The p + 1 line tables decompose the grid exactly; D is all of the residual.
    assert gt.info["lines_total_share"] == pytest.approx(1.0, abs=1e-9)
    assert gt.info["difference_share_of_residual"] == pytest.approx(1.0, abs=1e-3)
    assert gt.info["other_lines_share"] < 1e-6
    # Ranks (99% of the energy) and key frequencies (share >= 3 / 8; C: 3/5 at k=5, 2/5 at k=7).
    assert [t[n]["rank"] for n in ("operand_a", "operand_b", "answer", "difference", "operand")] == [2, 2, 4, 1, 2]
    assert t["answer"]["key_frequencies"] == [5, 7]
    assert t["answer"]["frequency_shares"][4] == pytest.approx(0.6, abs=1e-4)
    assert t["operand"]["key_frequencies"] == [3] and t["difference"]["key_frequencies"] == [2]
    assert gt.features == ["operand", "answer", "difference"]
    assert gt.info["site_key_frequencies"] == [3, 5, 7, 2]


def test_unaligned_operands_stay_separate_and_small_tables_are_not_material():
    x, a, b, _ = _planted(separate_operands=True, d_scale=0.1)   # D: 0.005 / 10.005 < 2%
    gt = G.fit_value_tables(x, a, b, P)
    assert not gt.info["operands_merged"]
    assert abs(gt.info["operand_cos"]["median"]) < 1e-3
    assert gt.features == ["operand_a", "operand_b", "answer"]
    assert gt.info["tables"]["difference"]["share"] == pytest.approx(0.005 / 10.005, abs=1e-4)
    assert gt.info["tables"]["operand_b"]["key_frequencies"] == [4]


def test_tables_are_the_least_squares_fit_on_the_balanced_grid():
    """Per-value means == lstsq on one-hot designs (fitted values are unique even though the
    design is rank-deficient), for the additive A + B + C model and the tied O[a] + O[b] + C model."""
    p, d = 7, 3
    g = torch.Generator().manual_seed(1)
    a, b = _grid(p)
    c = (a + b) % p
    x = torch.randn(p * p, d, generator=g, dtype=torch.float64) + 3.0
    gt = G.fit_value_tables(x, a, b, p)
    oh = lambda v: torch.nn.functional.one_hot(v, p).double()
    one = torch.ones(p * p, 1, dtype=torch.float64)
    for design, fitted in (
        (torch.cat([one, oh(a), oh(b), oh(c)], 1),
         gt.mu + gt.tables["operand_a"][a] + gt.tables["operand_b"][b] + gt.tables["answer"][c]),
        (torch.cat([one, oh(a) + oh(b), oh(c)], 1),
         gt.mu + gt.tables["operand"][a] + gt.tables["operand"][b] + gt.tables["answer"][c]),
    ):
        ls = design @ (torch.linalg.pinv(design) @ x)
        torch.testing.assert_close(fitted, ls, atol=1e-10, rtol=0)
    # Any data: the p + 1 lines account for all of the variance.
    assert gt.info["lines_total_share"] == pytest.approx(1.0, abs=1e-10)


def test_fit_refuses_a_partial_grid():
    x, a, b, _ = _planted()
    with pytest.raises(UserError, match="full grid"):
        G.fit_value_tables(x[:-1], a[:-1], b[:-1], P)
    b2 = b.clone()
    b2[0] = b2[1]
    with pytest.raises(UserError, match="exactly once"):
        G.fit_value_tables(x, a, b2, P)


def test_feature_values_and_unit_features():
    x, a, b, _ = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    assert torch.equal(G.feature_values(gt, "answer", a, b), (a + b) % P)
    assert torch.equal(G.feature_values(gt, "difference", a, b), (a - b) % P)
    assert torch.equal(G.feature_values(gt, "operand_b", a, b), b)
    assert G.feature_values(gt, "operand", a, b).shape == (P * P, 2)
    F = G.ground_truth_features(gt)
    assert set(F) == {"operand", "answer", "difference"}
    for f in F.values():
        assert f.shape == (P, D)
        torch.testing.assert_close(f.norm(dim=1), torch.ones(P, dtype=torch.float64))


# ----------------------------------------------------------------------------
# Recovery and MCC

def test_table_rows_are_recovered_and_random_decoders_are_not():
    x, a, b, T = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    g = torch.Generator().manual_seed(5)
    planted = torch.cat([T["A"], T["C"], T["D"], torch.randn(40, D, generator=g, dtype=torch.float64)])
    dec = planted[torch.randperm(len(planted), generator=g)]
    s = G.score_decoder(gt, dec)
    for n in ("operand", "answer", "difference"):
        assert s[n]["recovered"] == 1.0
        assert s[n]["mcc"] == pytest.approx(1.0, abs=1e-6)
    # Signed: -C[v] is no row of C (its two circles would have to turn by pi at once), so the
    # negated decoder recovers none of the answer table. (-O[v] lies within pi/p of another row of
    # the single circle O, and the line table D holds its own negatives: those stay recovered.)
    neg = G.score_decoder(gt, -dec)
    assert neg["answer"]["recovered"] == 0.0 and neg["answer"]["mcc"] < 0.9
    # Random decoders: nothing recovered (isotropic rows in R^32; 128 of them).
    decs, r = G.chance_decoders(x, 128, seed=0)
    assert r == 7                                                        # q0..q6 carry the signal
    assert decs["pca_signed"].shape == (2 * D, D)
    torch.testing.assert_close(decs["pca_signed"][D:], -decs["pca_signed"][:D])
    assert decs["random_isotropic"].shape == decs["random_pca_subspace"].shape == (128, D)
    assert G.score_decoder(gt, decs["random_isotropic"])["answer"]["recovered"] == 0.0
    ch = G.chance_levels(gt, x, 128, seeds=(0, 1))
    for n in ("operand", "answer"):
        assert ch["random_isotropic"][n]["recovered"] == 0.0
        assert ch["random_isotropic"][n]["mcc"] < 0.5


def test_feature_mcc_and_recovery_by_hand():
    e = torch.eye(4, dtype=torch.float64)
    gt = e[:2]                                            # two features: e0, e1
    dec = torch.stack([e[1], e[0] + e[2], e[3]])          # e1 exact; e0 at cos 1/sqrt2
    assert M.recovery_fraction(gt, dec) == 0.5
    assert M.feature_mcc(gt, dec) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    # A decoder smaller than the table: unmatched rows count 0.
    assert M.feature_mcc(gt, e[:1]) == pytest.approx(0.5)
    # Signed: -e0 does not recover e0.
    assert M.recovery_fraction(gt[:1], -gt[:1]) == 0.0
    best, idx = M.best_feature_match(gt, dec)
    assert idx.tolist() == [1, 0]


# ----------------------------------------------------------------------------
# Selectivity

def test_selectivity_by_hand():
    p = 5
    a, b = _grid(p)
    c = (a + b) % p
    acts = torch.zeros(p * p, 4)
    acts[:, 0] = (c == 2).float() * torch.linspace(1, 2, p * p)   # one value of c only -> 1
    acts[:, 1] = 1.0                                              # evenly on every value -> 1/p
    acts[:, 3] = ((a == 1) | (b == 1)).float()                    # operand value 1, either slot
    sel = M.latent_selectivity(acts, c, p)
    assert sel[0] == pytest.approx(1.0) and sel[1] == pytest.approx(1 / p)
    assert math.isnan(sel[2])                                     # never fires: left out of the mean
    assert M.mean_selectivity(acts[:, :3], c, p) == pytest.approx((1 + 1 / p) / 2)
    ab = torch.stack([a, b], 1)
    sel_o = M.latent_selectivity(acts, ab, p)
    assert sel_o[3] == pytest.approx(1.0)                         # a = b = 1 counted once
    assert sel_o[1] == pytest.approx((2 * p - 1) / p ** 2)        # even: rows holding v as a or b
    with pytest.raises(ValueError):
        M.latent_selectivity(-acts, c, p)


def test_value_sums_equal_the_dense_product():
    """value_sums (the sparse sums selectivity and firing F1 use) = value_presence(values).T @ acts,
    with a value on both operand slots of a row counted once."""
    g = torch.Generator().manual_seed(0)
    p, N = 7, 400
    acts = (torch.randn(N, 30, generator=g) * (torch.rand(N, 30, generator=g) < 0.1)).relu()
    ab = torch.randint(p, (N, 2), generator=g)
    ab[:50, 1] = ab[:50, 0]                                       # a = b on some rows
    for vals in (ab[:, 0], ab):
        S, tot = M.value_sums(acts, vals, p)
        torch.testing.assert_close(S, M.value_presence(vals, p).double().T @ acts.double())
        torch.testing.assert_close(tot, acts.double().sum(0))
        S, n = M.value_sums(acts, vals, p, count=True)
        torch.testing.assert_close(S, M.value_presence(vals, p).double().T @ (acts > 0).double())
        torch.testing.assert_close(n, (acts > 0).double().sum(0))


def test_score_decoder_selectivity_from_codes():
    x, a, b, T = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    c = (a + b) % P
    codes = torch.nn.functional.one_hot(c, P).double()           # latent v fires when c = v
    s = G.score_decoder(gt, T["C"], acts=codes, a=a, b=b)
    assert s["answer"]["selectivity"] == pytest.approx(1.0)
    # On the p rows with c = v an operand value u occurs twice (a = u, b = v - u and its mirror),
    # or once when 2u = v: the best operand value holds 2 / p of each latent's mass.
    assert s["operand"]["selectivity"] == pytest.approx(2 / P)
    assert s["answer"]["recovered_firing"] == 1.0                  # latent v fires exactly where c = v
    # latent v fires on the p rows with c = v, operand value v holds 2p - 1 rows, they share 2:
    # F1 = 4 / (3p - 1) < 0.9 for every value
    assert s["operand"]["recovered_firing"] == 0.0


def test_shared_offset_moves_cosines_not_firing():
    """The gauge of an exact-k code: decoder rows C[v] + u with b_dec - u reconstruct every row as
    C[v] with b_dec do (one latent active per row, activation 1), yet every row's cosine to C[v]
    falls to |C[v]| / |C[v] + u|; the code, and so recovered_firing, is the same."""
    x, a, b, T = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    c = (a + b) % P
    codes = torch.nn.functional.one_hot(c, P).double()
    u = 3 * T["C"].norm(dim=1).max() * T["q"][10]                 # orthogonal to every table
    b_dec = x.mean(0)
    torch.testing.assert_close(codes @ T["C"] + b_dec, codes @ (T["C"] + u) + (b_dec - u))
    plain, shifted = (G.score_decoder(gt, dec, acts=codes, a=a, b=b)["answer"] for dec in (T["C"], T["C"] + u))
    assert plain["recovered"] == 1.0 and shifted["recovered"] == 0.0
    assert plain["recovered_firing"] == shifted["recovered_firing"] == 1.0


def test_firing_f1_by_hand():
    p = 5
    a, b = _grid(p)
    c = (a + b) % p
    acts = torch.zeros(p * p, 3)
    acts[:, 0] = (c == 2).float() * torch.linspace(1, 2, p * p)   # fires exactly on c = 2 -> F1 1
    acts[:, 1] = ((c == 3) | (c == 4)).float()                    # two values merged: 2p / (2p + p) = 2/3
    f1 = M.firing_f1(acts, c, p)
    torch.testing.assert_close(f1, torch.tensor([0, 0, 1, 2 / 3, 2 / 3], dtype=torch.float64))
    ab = torch.stack([a, b], 1)
    acts[:, 2] = ((a == 1) | (b == 1)).float()                    # operand value 1, either slot
    assert M.firing_f1(acts, ab, p)[1] == pytest.approx(1.0)
    assert M.firing_f1(torch.zeros(p * p, 2), c, p).tolist() == [0.0] * p     # nothing fires
    with pytest.raises(ValueError):
        M.firing_f1(acts[:-1], c, p)


def test_threshold_ceiling_by_hand():
    """bench/threshold_ceiling.py's detectors: the best cut of a score, a top-k code, and a held-out
    logistic detector on a case a threshold separates."""
    from bench.threshold_ceiling import best_threshold_f1, heldout_linear_f1, topk_code
    scores = torch.tensor([[4.0, 4.0], [3.0, 3.0], [2.0, 2.0], [1.0, 1.0]])
    holds = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    # column 0: cut after two rows, F1 1; column 1: its rows score lowest, best is fire on all, 2*2/(4+2)
    torch.testing.assert_close(best_threshold_f1(scores, holds), torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    assert topk_code(torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]]), 2).tolist() == [[0, 1, 1], [1, 0, 1]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    separable = torch.stack([x[:, 0] + x[:, 1] > 1.0, x[:, 2] < -0.5], 1)
    assert heldout_linear_f1(x, separable).min() > 0.95
    noise = torch.rand(2000, 1, generator=g) < 0.2                          # independent of x: no detector
    assert heldout_linear_f1(x, noise).item() < 0.45


def test_idealised_site_keeps_the_material_tables_and_nothing_else():
    """bench/idealised_site.py: x' = mu + the feature sets' tables at each row's values."""
    from bench.idealised_site import idealise
    x, a, b, T = _planted(separate_operands=True, d_scale=0.1)    # D under 2%: not a feature set
    gt = G.fit_value_tables(x, a, b, P)
    want = gt.mu + T["A"][a] + T["B"][b] + T["C"][(a + b) % P]
    torch.testing.assert_close(idealise(x, gt, a, b).double(), want, atol=1e-3, rtol=0)
    x, a, b, T = _planted()                                        # merged operands, D material
    gt = G.fit_value_tables(x, a, b, P)
    O = 1.5 * T["A"]                                               # (A + B) / 2 with B = 2 A
    want = gt.mu + O[a] + O[b] + T["C"][(a + b) % P] + T["D"][(a - b) % P]
    torch.testing.assert_close(idealise(x, gt, a, b).double(), want, atol=1e-3, rtol=0)


def test_refit_decoder_undoes_shrinkage_by_hand():
    """metrics.affine_refit (bench/refit_decoder.py): a code shrunk by half (and offset by b) refits to
    twice the decoder, on the train rows alone."""
    g = torch.Generator().manual_seed(0)
    code = torch.rand(200, 5, generator=g, dtype=torch.float64) * (torch.rand(200, 5, generator=g) < 0.3)
    D, b = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    x = code @ D + b
    train = torch.arange(200) < 150
    _, W, b_fit = M.affine_refit(x, 0.5 * code, rows=train)
    torch.testing.assert_close(W, 2 * D)
    torch.testing.assert_close(b_fit, b)


# ----------------------------------------------------------------------------
# Fourier planes

def test_plane_share_by_hand():
    e = torch.eye(6, dtype=torch.float64)
    planes = torch.stack([e[0:2], e[2:4]])                        # two planes
    dec = torch.stack([e[0] + 2 * e[1], e[0] + e[2], e[4]])
    share, k = M.plane_share(dec, planes)
    torch.testing.assert_close(share, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert k[:2].tolist() == [0, 0] or k[:2].tolist() == [0, 1]


def test_planes_of_planted_tables():
    x, a, b, T = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    # A single-circle table: each row lies in its one plane.
    Pa, keys = G.planes(T["A"], P)
    assert keys == [3]
    share, _ = M.plane_share(T["A"], Pa)
    torch.testing.assert_close(share, torch.ones(P, dtype=torch.float64))
    # C: radius^2 3 at k=5 and 2 at k=7, so every row has 3/5 of its energy in its best plane.
    Pc, keys = G.table_planes(gt, "answer", keys=[5, 7])
    share, k = M.plane_share(T["C"], Pc)
    torch.testing.assert_close(share, torch.full((P,), 0.6, dtype=torch.float64), atol=1e-4, rtol=0)
    assert (k == 0).all()
    # The planes are orthonormal and span the planted ones.
    proj = Pc.reshape(-1, D) @ T["q"][2:6].T
    torch.testing.assert_close(proj.pow(2).sum(), torch.tensor(4.0, dtype=torch.float64), atol=1e-4, rtol=0)
    # A line table gives a 1-D plane (zero second row), still with share 1 for its rows.
    Pd, _ = G.planes(T["D"], P, [2])
    assert Pd[0, 1].abs().max() == 0 and Pd[0, 0].norm() == pytest.approx(1.0)
    share, _ = M.plane_share(T["D"][1:], Pd)
    torch.testing.assert_close(share, torch.ones(P - 1, dtype=torch.float64))


# ----------------------------------------------------------------------------
# Seed agreement

def test_seed_agreement_permuted_decoders_agree_on_everything():
    x, a, b, T = _planted()
    F = G.ground_truth_features(G.fit_value_tables(x, a, b, P))["answer"]
    g = torch.Generator().manual_seed(3)
    dec1 = torch.cat([T["C"], torch.randn(20, D, generator=g, dtype=torch.float64)])
    dec2 = dec1[torch.randperm(len(dec1), generator=g)]
    out = M.seed_agreement(F, [dec1, dec2])
    assert out["pairs"][0]["both"] == 1.0 and out["every"] == 1.0
    assert out["mean_pw_mcc_gt"] == pytest.approx(1.0)
    # A third SAE that holds only the first 8 answer rows: every = 8 / 17.
    dec3 = torch.cat([T["C"][:8], torch.randn(20, D, generator=g, dtype=torch.float64)])
    out = M.seed_agreement(F, [dec1, dec2, dec3])
    assert out["recovered"] == pytest.approx([1.0, 1.0, 8 / P])
    assert out["every"] == pytest.approx(8 / P)
    assert [q["both"] for q in out["pairs"]] == pytest.approx([1.0, 8 / P, 8 / P])
    # Nothing shared: PW-MCC over GT-matched latents is undefined for that pair.
    out = M.seed_agreement(F, [dec1, -dec1])
    assert out["pairs"][0]["n_both"] == 0 and math.isnan(out["pairs"][0]["pw_mcc_gt"])


# ----------------------------------------------------------------------------
# Files

def test_save_load_round_trip_and_acts_file(tmp_path):
    from safetensors.torch import save_file
    x, a, b, _ = _planted()
    acts = tmp_path / "acts" / "resid_post.safetensors"
    acts.parent.mkdir()
    save_file({"activations": x.float(), "a": a, "b": b, "c": (a + b) % P}, str(acts))
    gt = G.fit_acts_file(acts)
    assert gt.p == P and gt.info["source"] == str(acts)
    path = G.ground_truth_path(acts)
    assert path.name == "resid_post.ground_truth.safetensors"
    st, js = G.save_ground_truth(gt, path)
    assert js.name == "resid_post.ground_truth.json" and st.is_file() and js.is_file()
    for p_ in (st, js):
        back = G.load_ground_truth(p_)
        assert back.p == P and back.features == gt.features
        assert back.info["tables"]["answer"]["share"] == gt.info["tables"]["answer"]["share"]
        for n in gt.tables:
            assert torch.equal(back.tables[n], gt.tables[n])
        assert torch.equal(back.mu, gt.mu)


def test_bad_or_missing_ground_truth_files_give_one_line_errors(tmp_path):
    x, a, b, _ = _planted()
    gt = G.fit_value_tables(x, a, b, P)
    with pytest.raises(UserError, match="does not exist"):
        G.load_ground_truth(tmp_path / "nope.ground_truth.safetensors")
    st, js = G.save_ground_truth(gt, tmp_path / "s.ground_truth.safetensors")
    st.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=str(st.name)):
        G.load_ground_truth(st)
    st, js = G.save_ground_truth(gt, tmp_path / "s.ground_truth.safetensors")
    js.write_text("{not json")
    with pytest.raises(UserError, match=str(js.name)):
        G.load_ground_truth(st)
    js.write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a modadd-ground-truth"):
        G.load_ground_truth(st)
    # A table listed in the JSON but missing from the tensors.
    from lib.common import save_tensors
    G.save_ground_truth(gt, st)
    save_tensors({"mu": gt.mu}, st)
    with pytest.raises(UserError, match="table.answer"):
        G.load_ground_truth(st)
    # An activations file that is not a modular-addition site.
    from safetensors.torch import save_file
    bad = tmp_path / "lm.safetensors"
    save_file({"activations": torch.zeros(4, 3)}, str(bad))
    with pytest.raises(UserError, match="no 'a' tensor"):
        G.fit_acts_file(bad)


def test_non_prime_p_skips_the_line_check():
    p = 9
    a, b = _grid(p)
    x = torch.randn(p * p, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gt = G.fit_value_tables(x, a, b, p)
    assert gt.info["other_lines_share"] is None and gt.info["lines_total_share"] is None
    s = gt.info["tables"]
    assert s["operand_a"]["share"] + s["operand_b"]["share"] + s["answer"]["share"] == pytest.approx(gt.info["additive_share"])
