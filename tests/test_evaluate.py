"""04_evaluate.py end to end on tiny inputs: known answers, baselines, bad input, the LM branch."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lib import ground_truth as G
from lib import metrics as M
from lib import modadd
from lib.common import UserError, load_stage, save_json, save_tensors
from conftest import ROOT, write_acts
from sae import SAE

PY = sys.executable


EVAL = load_stage("04_evaluate.py")
EXTRACT = load_stage("02_extract_activations.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny modular-addition model (p = 17), trained briefly on all pairs so that its clean loss
    is well below zero-ablation's; fourier.json names keys [3, 5]; activations via 02."""
    torch.manual_seed(0)
    p = 17
    cfg = modadd.ModelConfig(p=p, d_model=24, n_heads=2, d_head=12, d_mlp=48)
    model = modadd.Transformer(cfg)
    tokens, labels = modadd.all_pairs(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("run")
    save_tensors(model.state_dict(), run / "model.safetensors")
    save_json({"model": modadd.config_dict(cfg), "data": {"p": p, "train_frac": 0.3, "split_seed": 0}},
              run / "config.json")
    save_json({"p": p, "key_frequencies": [3, 5]}, run / "fourier.json")
    acts = run / "acts" / "resid_post.safetensors"
    EXTRACT.main(["--run", str(run), "--out", str(acts)])
    return {"run": run, "acts": acts, "p": p, "d": cfg.d_model, "model": model.eval()}


def identity_sae(d: int) -> SAE:
    """x_hat = relu(x) - relu(-x) = x exactly: decoder rows +e_i and -e_i."""
    s = SAE(d, 2 * d, "relu")
    I = torch.eye(d)
    with torch.no_grad():
        s.W_dec.copy_(torch.cat([I, -I]))
        s.W_enc.copy_(torch.cat([I, -I]).T)
        s.b_enc.zero_()
        s.b_dec.zero_()
    return s


def evaluate(tmp_path, sae: SAE, acts, *extra) -> dict:
    sdir = tmp_path / "sae"
    sae.save(sdir, metadata={"seed": 7})
    out = tmp_path / "eval" / "eval.json"
    EVAL.main(["--sae", str(sdir), "--acts", str(acts), "--out", str(out), "--quiet", *extra])
    return json.loads(out.read_text())


def test_true_dictionary_scores_ev_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, n_feat = 32, 24
    feats = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:n_feat]          # orthonormal rows
    codes = torch.rand(3000, n_feat, generator=g) * (torch.rand(3000, n_feat, generator=g) < 0.1)
    x = codes @ feats
    acts = write_acts(tmp_path / "acts.safetensors", x)
    s = SAE(d, n_feat, "jumprelu")            # threshold 1e-4 removes the fp noise of x @ feats^T
    with torch.no_grad():
        s.threshold.fill_(1e-4)
        s.W_dec.copy_(feats)
        s.W_enc.copy_(feats.T)
        s.b_enc.zero_()
        s.b_dec.zero_()
    r = evaluate(tmp_path, s, acts)
    rec = r["reconstruction"]
    assert rec["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rec["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert rec["cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert rec["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert r["sparsity"]["l0"] == pytest.approx(float((codes[2700:] > 0).sum(1).double().mean()), abs=1e-9)
    # rows whose planted code is all zero get no latent: the same share, held-out and on all rows
    assert r["sparsity"]["empty_fraction"] == pytest.approx(float((codes[2700:] == 0).all(1).double().mean()))
    assert r["sparsity"]["empty_fraction_all_rows"] == pytest.approx(float((codes == 0).all(1).double().mean()))
    assert r["rows"]["heldout"] == 300 and r["downstream"] is None and r["ground_truth"] is None
    assert r["sae"]["seed"] == 7 and "code_version" in r and r["config"]["sae"] == str(tmp_path / "sae")
    assert Path(r["figures"]["density"]).is_file()


def test_identity_splice_recovers_all_loss_and_ground_truth_beside_chance(tiny_run, tmp_path):
    r = evaluate(tmp_path, identity_sae(tiny_run["d"]), tiny_run["acts"], "--run", str(tiny_run["run"]),
                 "--n-random", "2")
    for split in ("heldout", "all"):
        d = r["downstream"][split]
        assert d["ce_zero"] - d["ce_clean"] > 0.5          # the site matters
        assert d["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert d["kl_sae"] == pytest.approx(0.0, abs=1e-6)
        assert d["kl_recovered"] == pytest.approx(1.0, abs=1e-5)
        assert d["acc_sae"] == d["acc_clean"]
    assert r["downstream"]["all"]["rows"] == tiny_run["p"] ** 2
    assert r["reconstruction"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    g = r["ground_truth"]
    gt = G.load_ground_truth(G.ground_truth_path(tiny_run["acts"]))      # 02 wrote it beside the activations
    assert g["features"] == gt.features and len(g["features"]) >= 1 and g["p"] == tiny_run["p"]
    for name in g["features"]:
        assert g["tables"][name]["share"] == pytest.approx(gt.info["tables"][name]["share"])
        assert set(g["sae"][name]) >= {"mcc", "recovered", "selectivity", "recovered_firing", "plane_share",
                                        "best_cos"}
        assert 0.0 <= g["sae"][name]["recovered_firing"] <= 1.0
        for chance in ("random_isotropic", "random_pca_subspace", "pca_signed"):
            assert {"mcc", "recovered"} <= set(g["chance"][chance][name])
        for chance in ("random_isotropic", "pca_signed"):
            assert 0.0 <= g["chance"][chance][name]["recovered_firing"] <= 1.0
        assert len(g["sae"][name]["best_cos"]) == tiny_run["p"]
    assert r["inputs"]["ground_truth"].endswith(".ground_truth.safetensors")


def test_zero_sae_recovers_no_loss(tiny_run, tmp_path):
    s = identity_sae(tiny_run["d"])
    with torch.no_grad():
        s.W_dec.zero_()                                     # reconstruction = b_dec = 0 = zero ablation
    r = evaluate(tmp_path, s, tiny_run["acts"], "--run", str(tiny_run["run"]), "--n-random", "1")
    assert r["downstream"]["heldout"]["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_rows_with_no_latent_carry_their_share_of_the_kl(tiny_run, tmp_path):
    """Latent 0 of an identity-like SAE fires only where x_0 > c (c: the 30% quantile of x_0), every
    other latent never: the rows at or below c have no latent, and 04 counts exactly those. With no
    latent on any row, all of the KL is theirs."""
    x = load_tensors_(tiny_run["acts"])["activations"]
    c = float(x[:, 0].quantile(0.3))
    s = identity_sae(tiny_run["d"])
    with torch.no_grad():
        s.b_enc.fill_(-1e9)                      # latents 1.. never fire
        s.b_enc[0] = -c                          # latent 0 (decoder row e_0, encoder e_0): fires where x_0 > c
    r = evaluate(tmp_path / "some", s, tiny_run["acts"], "--run", str(tiny_run["run"]), "--n-random", "1")
    dark = x[:, 0] <= c
    assert r["sparsity"]["empty_fraction_all_rows"] == pytest.approx(float(dark.double().mean()))
    d_all = r["downstream"]["all"]
    assert d_all["empty_rows"] == int(dark.sum()) and 0.25 < float(dark.double().mean()) < 0.35
    assert 0.0 < d_all["kl_share_empty_rows"] < 1.0 and d_all["kl_sae"] > 0
    with torch.no_grad():
        s.b_enc[0] = -1e9                        # now no row has a latent
    r = evaluate(tmp_path / "none", s, tiny_run["acts"], "--run", str(tiny_run["run"]), "--n-random", "1")
    assert r["sparsity"]["empty_fraction_all_rows"] == 1.0 and r["sparsity"]["l0"] == 0.0
    for split in ("heldout", "all"):
        assert r["downstream"][split]["kl_share_empty_rows"] == pytest.approx(1.0)
        assert r["downstream"][split]["empty_rows"] == r["downstream"][split]["rows"]


def test_random_decoders_score_at_chance_and_planted_table_rows_score_one(tiny_run, tmp_path):
    t = load_tensors_(tiny_run["acts"])
    x = t["activations"]
    d = tiny_run["d"]
    gt = G.load_ground_truth(G.ground_truth_path(tiny_run["acts"]))
    feats = G.ground_truth_features(gt)
    # A random-decoder SAE, built exactly as the baseline is (another seed): recovers nothing, at chance MCC.
    l0 = 4
    rs = EVAL.random_decoder_sae(SAE(d, 96, "topk", k=l0), x, l0, torch.Generator().manual_seed(123))
    r = evaluate(tmp_path / "rand", rs, tiny_run["acts"], "--run", str(tiny_run["run"]), "--n-random", "5")
    g = r["ground_truth"]
    assert r["sparsity"]["l0"] == pytest.approx(l0)
    for name in g["features"]:
        assert g["sae"][name]["recovered"] == 0.0 and g["chance"]["random_isotropic"][name]["recovered"] == 0.0
        assert abs(g["sae"][name]["mcc"] - g["chance"]["random_isotropic"][name]["mcc"]) < 0.08
        assert g["sae"][name]["recovered_firing"] < 0.1          # its latents fire on no single value's rows
    # Planting the table rows in the decoder recovers every feature, MCC 1, well above chance.
    rows = torch.cat(list(feats.values())).float()
    with torch.no_grad():
        rs.W_dec[: len(rows)] = rows
    r2 = evaluate(tmp_path / "planted", rs, tiny_run["acts"], "--run", str(tiny_run["run"]), "--n-random", "1")
    for name in r2["ground_truth"]["features"]:
        m = r2["ground_truth"]["sae"][name]
        assert m["recovered"] == 1.0 and m["mcc"] == pytest.approx(1.0, abs=1e-5)
        assert m["mcc"] > r2["ground_truth"]["chance"]["random_isotropic"][name]["mcc"] + 0.2


def test_several_saes_in_one_call_are_the_evaluations_of_their_own_calls(tiny_run, tmp_path):
    """04 --sae A B --out a.json b.json: each eval.json is what a call of its own writes (the shared
    ground truth, model and chance levels change nothing); a count mismatch is one line, nothing written."""
    d = tiny_run["d"]
    a = identity_sae(d).save(tmp_path / "A")
    rs = EVAL.random_decoder_sae(SAE(d, 96, "topk", k=4), load_tensors_(tiny_run["acts"])["activations"], 4,
                                 torch.Generator().manual_seed(5))
    b = rs.save(tmp_path / "B")
    common = ["--acts", str(tiny_run["acts"]), "--run", str(tiny_run["run"]), "--n-random", "2", "--quiet"]
    EVAL.main(["--sae", str(a), str(b), "--out", str(tmp_path / "both" / "a.json"), str(tmp_path / "both" / "b.json"),
               *common])
    for name, sdir in (("a", a), ("b", b)):
        EVAL.main(["--sae", str(sdir), "--out", str(tmp_path / "own" / f"{name}.json"), *common])
        one, many = (json.loads((tmp_path / w / f"{name}.json").read_text()) for w in ("own", "both"))
        assert many["config"]["sae"] == str(sdir) and many["config"]["out"].endswith(f"both/{name}.json")
        for key in ("reconstruction", "sparsity", "downstream", "ground_truth", "sae", "inputs"):
            assert many[key] == one[key], key
    res = run_cli("--sae", a, b, "--acts", tiny_run["acts"], "--out", tmp_path / "x.json")
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and "one eval.json per SAE" in lines[0]
    assert not (tmp_path / "x.json").exists()


def load_tensors_(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def run_cli(*args):
    return subprocess.run([PY, str(ROOT / "04_evaluate.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_bad_input_is_one_line(tiny_run, tmp_path):
    d = tiny_run["d"]
    sdir = identity_sae(d + 1).save(tmp_path / "wide")
    res = run_cli("--sae", sdir, "--acts", tiny_run["acts"], "--out", tmp_path / "e.json")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "width" in lines[0], res.stderr
    # A run directory whose weights are not safetensors.
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "config.json").write_bytes((tiny_run["run"] / "config.json").read_bytes())
    (run2 / "model.safetensors").write_text("not safetensors")
    sdir = identity_sae(d).save(tmp_path / "ok")
    with pytest.raises(UserError, match="model.safetensors"):
        EVAL.main(["--sae", str(sdir), "--acts", str(tiny_run["acts"]), "--run", str(run2),
                   "--out", str(tmp_path / "e2.json"), "--quiet"])
    assert not (tmp_path / "e2.json").exists()


def test_lm_branch_uses_lm_module(tmp_path, monkeypatch):
    """An --acts directory with manifest.json gets its held-out rows from the opened shards
    (lib.activations) and its downstream numbers from lib.lm.lm_downstream."""
    from lib import activations, lm
    d = 8
    acts_dir = tmp_path / "lm_acts"
    acts_dir.mkdir()
    (acts_dir / "manifest.json").write_text("{}")
    x = torch.randn(50, d, generator=torch.Generator().manual_seed(0))
    calls = {}

    class FakeShards(activations.Acts):
        def heldout_rows(self, max_rows=None):
            calls["rows"] = (Path(self.path), max_rows)
            return x

    def open_acts(path, split_seed=0):
        return FakeShards("shards", Path(path), d, 500, 450, "fake split", {}, "0" * 64, 0)

    def lm_downstream(sae, path, device, max_contexts):
        calls["down"] = max_contexts
        return {"ce_clean": 2.0, "ce_sae": 2.5, "ce_zero": 7.0,
                "loss_recovered": M.loss_recovered(2.0, 2.5, 7.0), "kl_sae": 0.4, "kl_zero": 5.0}
    monkeypatch.setattr(EVAL, "open_acts", open_acts)
    monkeypatch.setattr(lm, "lm_downstream", lm_downstream)
    r = evaluate(tmp_path, identity_sae(d), acts_dir, "--max-rows", "50", "--max-contexts", "3")
    assert calls["rows"] == (acts_dir, 50) and calls["down"] == 3
    assert r["target"] == "lm" and r["ground_truth"] is None
    assert r["reconstruction"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert r["downstream"]["loss_recovered"] == pytest.approx(0.9)
    # Width mismatch in the LM branch is one UserError too.
    with pytest.raises(UserError, match="width"):
        evaluate(tmp_path / "w", identity_sae(d + 2), acts_dir)
