"""05_overlap.py: overlap 1.0 with itself / a permuted copy, random dictionaries at the computed
baselines, subspace baselines above isotropic ones, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib import metrics as M
from lib.common import UserError, load_stage
from conftest import ROOT, write_acts
from sae import SAE

OVERLAP = load_stage("05_overlap.py")


def make_sae(W_dec: torch.Tensor, seed: int, arch: str = "topk", k: int = 4) -> SAE:
    d_sae, d_in = W_dec.shape
    s = SAE(d_in, d_sae, arch, k=k if arch == "topk" else None)
    with torch.no_grad():
        s.W_dec.copy_(W_dec)
        s.W_enc.copy_(W_dec.T)
    s.metadata["seed"] = seed
    return s


@pytest.fixture()
def acts(tmp_path):
    # Data in a 12-dimensional subspace of R^32 (plus tiny noise): r(99%) must come out ~12.
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 12, generator=g))[0].T
    x = torch.randn(2000, 12, generator=g) @ basis + 1e-4 * torch.randn(2000, 32, generator=g)
    return write_acts(tmp_path / "acts.safetensors", x), basis


def run(tmp_path, saes, acts_path, *extra) -> dict:
    dirs = []
    for i, s in enumerate(saes):
        dirs.append(str(s.save(tmp_path / f"sae{i}")))
    out = tmp_path / "overlap"
    OVERLAP.main(["--saes", *dirs, "--acts", str(acts_path), "--out", str(out), "--quiet", *extra])
    assert (out / "overlap_heatmaps.png").is_file()
    return json.loads((out / "overlap.json").read_text())


def test_self_and_permuted_copy_overlap_one(tmp_path, acts):
    path, _ = acts
    W = M.random_unit_rows(64, 32, torch.Generator().manual_seed(1)).float()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    r = run(tmp_path, [make_sae(W, 1), make_sae(W[perm], 2), make_sae(W, 3)], path, "--n-random", "2")
    assert len(r["pairs"]) == 3
    for p in r["pairs"]:
        assert p["mean_max_abs_cos"] == pytest.approx(1.0, abs=1e-6)
        assert p["pw_mcc"] == pytest.approx(1.0, abs=1e-6)
        assert p["shared_fraction"] == 1.0
        assert p["act_corr"] == pytest.approx(1.0, abs=1e-6)
        assert p["pw_mcc_projected"] == pytest.approx(1.0, abs=1e-6)
        assert p["excess_over_subspace"]["pw_mcc"] == pytest.approx(1.0 - p["baselines"]["subspace"]["pw_mcc"])
    assert r["summary"]["pw_mcc"]["std"] == pytest.approx(0.0, abs=1e-9)
    assert 10 <= r["effective_subspace"]["r"] <= 12
    sub, iso = r["baseline_subspace"], r["baseline_isotropic"]
    assert sub["pw_mcc"]["mean"] > iso["pw_mcc"]["mean"] + 0.05          # chance climbs as r shrinks
    assert sub["mean_max_abs_cos"]["mean"] > iso["mean_max_abs_cos"]["mean"]
    assert r["headline"]["pw_mcc_excess_over_subspace"]["mean"] == pytest.approx(1.0 - sub["pw_mcc"]["mean"])
    assert r["seed"] == 0 and r["sae_seeds"] == [1, 2, 3] and "code_version" in r
    assert r["inputs"]["acts"] == str(path)


def test_random_1024x128_dictionaries_hit_the_analytic_baseline(tmp_path):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(600, 128, generator=g)                 # isotropic data: r(99%) is ~all 128 dims
    path = write_acts(tmp_path / "acts.safetensors", x)
    A = M.random_unit_rows(1024, 128, g).float()
    B = M.random_unit_rows(1024, 128, g).float()
    r = run(tmp_path, [make_sae(A, 1, k=8), make_sae(B, 2, k=8)], path, "--n-random", "1")
    p = r["pairs"][0]
    iso = p["baselines"]["isotropic"]
    assert iso["mean_max_abs_cos"] == pytest.approx(M.analytic_mean_max_abs_cos(1024, 1024, 128))
    assert abs(p["mean_max_abs_cos"] - iso["mean_max_abs_cos"]) < 0.01
    assert abs(iso["mean_max_abs_cos_mc"] - iso["mean_max_abs_cos"]) < 0.01
    assert abs(p["pw_mcc"] - iso["pw_mcc"]) < 0.01 and iso["pw_mcc"] == pytest.approx(0.272, abs=0.01)
    assert abs(p["pw_mcc_abs"] - iso["pw_mcc_abs"]) < 0.01 and iso["pw_mcc_abs"] == pytest.approx(0.289, abs=0.01)
    assert p["shared_fraction"] == 0.0
    assert abs(p["act_corr"]) < 0.1                          # unrelated latents


def test_bad_inputs(tmp_path, acts):
    path, _ = acts
    W = M.random_unit_rows(16, 32, torch.Generator().manual_seed(1)).float()
    d1 = make_sae(W, 1).save(tmp_path / "a")
    d2 = make_sae(M.random_unit_rows(16, 24, torch.Generator().manual_seed(1)).float(), 2).save(tmp_path / "b")
    with pytest.raises(UserError, match="different d_in"):
        OVERLAP.main(["--saes", str(d1), str(d2), "--acts", str(path), "--out", str(tmp_path / "o")])
    wrong = write_acts(tmp_path / "wrong.safetensors", torch.randn(100, 31))
    d3 = make_sae(W, 3).save(tmp_path / "c")
    with pytest.raises(UserError, match="width"):
        OVERLAP.main(["--saes", str(d1), str(d3), "--acts", str(wrong), "--out", str(tmp_path / "o")])
    res = subprocess.run([sys.executable, str(ROOT / "05_overlap.py"), "--saes", str(d1), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "at least 2" in lines[0], res.stderr
    assert not (tmp_path / "o" / "overlap.json").exists()


def test_saes_from_elsewhere_compare_without_activations(tmp_path):
    """Two SAEs with no summary.json and no --acts (e.g. downloaded): decoder and encoder figures
    beside isotropic chance; nothing that needs activations."""
    W = M.random_unit_rows(48, 16, torch.Generator().manual_seed(1)).float()
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(2))
    d1, d2 = make_sae(W, 1).save(tmp_path / "a"), make_sae(W[perm], 2).save(tmp_path / "b")
    OVERLAP.main(["--saes", str(d1), str(d2), "--out", str(tmp_path / "o"), "--quiet", "--n-random", "2"])
    r = json.loads((tmp_path / "o" / "overlap.json").read_text())
    p = r["pairs"][0]
    assert p["pw_mcc"] == pytest.approx(1.0, abs=1e-6) and p["shared_fraction"] == 1.0
    assert r["acts"] is None and r["baseline_subspace"] is None and r["ground_truth"] is None
    assert "act_corr" not in p and r["inputs"]["acts_from"] == "no activations given or found"
    assert 0.2 < r["baseline_isotropic"]["pw_mcc"]["mean"] < 0.6
    assert r["headline"]["pw_mcc_excess_over_isotropic"]["mean"] == pytest.approx(
        1.0 - p["baselines"]["isotropic"]["pw_mcc"])


def test_permuted_saes_agree_on_every_ground_truth_feature(tmp_path):
    """Modular-addition activations planted from known value tables (p = 13): two SAEs whose decoders
    hold the table rows in different orders recover every feature, both and every = 1, PW-MCC on the
    matched latents 1; an SAE of random rows recovers none."""
    from lib import ground_truth as G
    p, d = 13, 24
    g = torch.Generator().manual_seed(5)
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    O, C = torch.randn(p, d, generator=g), 3 * torch.randn(p, d, generator=g)
    O, C = O - O.mean(0), C - C.mean(0)
    x = 2.0 + O[a] + O[b] + C[(a + b) % p] + 0.01 * torch.randn(p * p, d, generator=g)
    path = write_acts(tmp_path / "acts.safetensors", x.float(), extra={"a": a, "b": b, "c": (a + b) % p})
    gt = G.fit_value_tables(x.double(), a, b, p)
    assert gt.features == ["operand", "answer"]
    rows = torch.cat([G.ground_truth_features(gt)[n] for n in gt.features]).float()
    pad = M.random_unit_rows(40 - len(rows), d, g).float()
    W = torch.cat([rows, pad])
    perm = torch.randperm(40, generator=g)
    saes = [make_sae(W, 1), make_sae(W[perm], 2), make_sae(M.random_unit_rows(40, d, g).float(), 3)]
    r = run(tmp_path, saes, path, "--n-random", "1")
    for name in ("operand", "answer"):
        a_ = r["ground_truth"][name]
        assert a_["recovered"][:2] == [1.0, 1.0] and a_["recovered"][2] == 0.0
        assert a_["pairs"][0]["both"] == 1.0 and a_["pairs"][0]["pw_mcc_gt"] == pytest.approx(1.0, abs=1e-6)
        assert a_["every"] == 0.0 and a_["chance_recovered"]["random_isotropic"] == 0.0
