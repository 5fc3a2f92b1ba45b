"""Issue 4: the modular-addition model, its Fourier ground truth, the leak guard,
stages 01 and 02 end to end on a tiny config, and their bad-input handling."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_stage
from lib import modadd
from lib.common import load_stage, load_tensors

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def run(*args, check=True):
    r = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed:\n{r.stdout}\n{r.stderr}")
    return r


def assert_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------- Fourier

@pytest.mark.parametrize("p", [113, 10, 3])
def test_fourier_basis_is_orthonormal(p):
    Fb, names, freqs = modadd.fourier_basis(p)
    assert Fb.shape == (p, p)
    torch.testing.assert_close(Fb @ Fb.T, torch.eye(p, dtype=torch.float64), atol=1e-10, rtol=0)
    assert names[0] == "const" and freqs.count(0) == 1 and max(freqs) == p // 2


def test_hand_built_embedding_has_exactly_its_frequencies():
    p, d = 113, 128
    x = torch.arange(p, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(p + 1, d, dtype=torch.float64)
    for k in (5, 17):
        w = 2 * math.pi * k / p
        W[:p] += torch.cos(w * x)[:, None] * torch.randn(d, generator=g) + torch.sin(w * x)[:, None] * torch.randn(d, generator=g)
    W[:p] += 3.0  # a constant offset is not a frequency
    keys, share = modadd.key_frequencies_from_embedding(W, p)
    assert keys == [5, 17]
    assert float(share[[4, 16]].sum()) == pytest.approx(1.0, abs=1e-9)


def test_grid_purity_of_pure_and_mixed_functions():
    p = 23
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    w = 2 * math.pi / p
    pure = torch.cos(w * 5 * (a + b))
    lin = torch.sin(w * 3 * a) + 0 * b
    mixed = torch.cos(w * 5 * (a + b)) + torch.cos(w * 7 * (a - b))
    pur, k = modadd.grid_frequency_purity(torch.stack([pure, lin, mixed]), p)
    assert pur[0] == pytest.approx(1.0) and k[0] == 5
    assert pur[1] == pytest.approx(1.0) and k[1] == 3
    assert pur[2] == pytest.approx(0.5)


# ---------------------------------------------------------------- the answer never leaks

def test_real_training_batches_hold_no_answer():
    p = 113
    tokens, labels = modadd.all_pairs(p)
    tr, te = modadd.train_test_split(p, 0.3, 42)
    assert len(tr) == round(0.3 * p * p) and len(set(tr.tolist()) & set(te.tolist())) == 0
    for idx in (tr, te):
        x, y = tokens[idx], labels[idx]
        modadd.check_no_answer_leak(x, y, p)     # passes on the real batch
        assert x.shape[1] == 3 and bool((x[:, 2] == p).all())
        # c sits in an input slot only where it must by arithmetic (b = 0 or a = 0): ~1/p of rows
        assert float((x[:, 0] == y).float().mean()) < 2.0 / p + 0.01
        assert float((x[:, 1] == y).float().mean()) < 2.0 / p + 0.01
    # The model reads the loss at `=` only: one logit row per sequence.
    model = modadd.Transformer(modadd.ModelConfig(p=p))
    assert model(tokens[:7]).shape == (7, p)


@pytest.mark.parametrize("make_leak", [
    lambda t, y, p: torch.stack([t[:, 0], t[:, 1], y], 1),                   # c in place of `=`
    lambda t, y, p: torch.cat([t, y[:, None]], 1),                           # c appended after `=`
    lambda t, y, p: torch.stack([t[:, 0], y, t[:, 2]], 1),                   # c in place of b
])
def test_a_leaking_batch_is_caught(make_leak):
    p = 23
    t, y = modadd.all_pairs(p)
    leaky = make_leak(t, y, p)
    with pytest.raises(ValueError, match="answer leak"):
        modadd.check_no_answer_leak(leaky, y, p)


def test_the_training_script_checks_its_own_batch(monkeypatch):
    """01 must call the guard on the batch it trains on: a leaking batch builder fails the run."""
    mod = load_stage("01_train_transformer.py")

    orig = modadd.all_pairs

    def leaky_pairs(p):          # the bug the public attempt had: c as the last input token
        t, y = orig(p)
        return torch.stack([t[:, 0], t[:, 1], y], 1), y
    monkeypatch.setattr(modadd, "all_pairs", leaky_pairs)
    with pytest.raises(ValueError, match="answer leak"):
        mod.main(["--p", "11", "--steps", "2", "--out", "/tmp/_leak_test_should_not_exist"])


# ---------------------------------------------------------------- the model

def test_table_forward_equals_generic_forward_and_gradients():
    torch.manual_seed(0)
    model = modadd.Transformer(modadd.ModelConfig(p=23, d_model=32, n_heads=4, d_head=8, d_mlp=64))
    t, y = modadd.all_pairs(23)
    fast = model(t)
    slow = model(t, hook=lambda *a: None)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad(F.cross_entropy(model(t), y), list(model.parameters()))
    g_slow = torch.autograd.grad(F.cross_entropy(model(t, hook=lambda *a: None), y), list(model.parameters()))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- stages 01 and 02

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    run("01_train_transformer.py", "--p", 23, "--d-model", 32, "--n-heads", 4, "--d-mlp", 64,
        "--steps", 150, "--lr", 1e-2, "--seed", 3, "--out", out, "--quiet")
    return out


def test_train_writes_a_complete_run(tiny_run):
    for f in ("model.safetensors", "config.json", "metrics.jsonl", "fourier.json", "fourier.png"):
        assert (tiny_run / f).is_file(), f
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["seed"] == 3 and cfg["code_version"] and cfg["model"]["p"] == 23
    recs = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] * 0.5
    four = json.loads((tiny_run / "fourier.json").read_text())
    assert set(four) >= {"key_frequencies", "key_energy_fraction", "restricted_loss", "excluded_loss"} or \
        four["key_frequencies"] == []


def test_same_seed_same_weights(tiny_run, tmp_path):
    out = tmp_path / "again"
    run("01_train_transformer.py", "--p", 23, "--d-model", 32, "--n-heads", 4, "--d-mlp", 64,
        "--steps", 150, "--lr", 1e-2, "--seed", 3, "--out", out, "--quiet")
    a, b = load_tensors(tiny_run / "model.safetensors"), load_tensors(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_pins_its_cpu_kernels_and_records_them(tmp_path):
    """01 as a script, with no ATEN_CPU_CAPABILITY set, trains on torch's AVX2 kernels where the CPU
    has them, the same weights as under an explicit avx2, and records them in config.json
    (lib.common.pin_cpu_kernels: on AVX-512 kernels seed 42 groks into another model); a
    capability the user sets wins."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    got = {}
    for cap in (None, "avx2", "default"):
        out = tmp_path / str(cap)
        e = env if cap is None else {**env, "ATEN_CPU_CAPABILITY": cap}
        r = subprocess.run([PY, "01_train_transformer.py", "--p", "23", "--d-model", "32", "--n-heads", "4",
                            "--d-mlp", "64", "--steps", "60", "--lr", "1e-2", "--seed", "3", "--out", str(out),
                            "--quiet"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        got[cap] = (json.loads((out / "config.json").read_text())["cpu_kernels"], load_tensors(out / "model.safetensors"))
    assert got["default"][0] == "DEFAULT"
    if torch.cpu._is_avx2_supported():
        assert got[None][0] == got["avx2"][0] == "AVX2"
        assert all(torch.equal(got[None][1][k], got["avx2"][1][k]) for k in got[None][1])


@pytest.mark.parametrize("site", modadd.SITES)
def test_extracted_rows_equal_a_fresh_forward_pass(tiny_run, tmp_path, site):
    out = tmp_path / f"{site}.safetensors"
    run("02_extract_activations.py", "--run", tiny_run, "--site", site, "--out", out)
    got = load_tensors(out)
    model, _ = modadd.load_run(tiny_run)
    t, y = modadd.all_pairs(23)
    seen = {}

    def hook(s, layer, x):
        seen[s] = x.clone()
    logits = model(t, hook=hook)
    torch.testing.assert_close(got["activations"], seen[site])
    assert got["activations"].shape == (23 * 23, 64 if site == "mlp_post" else 32)
    assert torch.equal(got["a"], t[:, 0]) and torch.equal(got["b"], t[:, 1]) and torch.equal(got["c"], y)
    assert got["train_mask"].dtype == torch.bool and 0 < int((~got["train_mask"]).sum()) < 23 * 23 // 5
    if site == "resid_post":   # independent check: the unembedding of these rows is the fast-path logits
        torch.testing.assert_close(got["activations"] @ model.W_U, model(t), atol=1e-4, rtol=1e-4)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["site"] == site and side["layer"] == 0 and side["shape"] == list(got["activations"].shape)
    assert side["code_version"] and side["split_seed"] == 0


def test_split_is_deterministic(tiny_run, tmp_path):
    a, b = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    run("02_extract_activations.py", "--run", tiny_run, "--out", a)
    run("02_extract_activations.py", "--run", tiny_run, "--out", b)
    assert torch.equal(load_tensors(a)["train_mask"], load_tensors(b)["train_mask"])


# ---------------------------------------------------------------- bad input

def test_bad_input_to_01(tmp_path, capsys):
    out = tmp_path / "r"
    assert_one_line_error(run("01_train_transformer.py", "--p", 2, "--out", out, check=False), "--p")
    for frac in ("0", "1", "1.5", "-0.1"):
        assert_one_line_error(run_stage(capsys, "01_train_transformer.py", "--train-frac", frac, "--out", out),
                              "--train-frac")
    assert_one_line_error(run_stage(capsys, "01_train_transformer.py", "--steps", "abc", "--out", out),
                          "--steps")
    assert not out.exists()


def test_finished_run_is_not_overwritten(tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    r = run("01_train_transformer.py", "--p", 23, "--steps", 5, "--out", tiny_run, check=False)
    assert_one_line_error(r, "--out", "--overwrite")
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_bad_input_to_02(tiny_run, tmp_path, capsys):
    out = tmp_path / "acts.safetensors"
    out.write_bytes(b"earlier result")
    assert_one_line_error(run("02_extract_activations.py", "--run", tmp_path / "nope", "--out", out, check=False),
                          "--run")
    assert_one_line_error(run_stage(capsys, "02_extract_activations.py", "--run", tiny_run, "--site", "resid_mad",
                                         "--out", out), "--site")
    assert_one_line_error(run_stage(capsys, "02_extract_activations.py", "--run", tiny_run, "--layer", 5,
                                         "--out", out), "--layer")
    assert_one_line_error(run_stage(capsys, "02_extract_activations.py", "--run", tiny_run, "--out", out),
                          "--overwrite")
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_run / "config.json").read_text())
    (bad / "model.safetensors").write_text("this is not safetensors")
    assert_one_line_error(run_stage(capsys, "02_extract_activations.py", "--run", bad,
                                         "--out", tmp_path / "z.safetensors"), "model.safetensors", "safetensors")
    assert out.read_bytes() == b"earlier result"
    assert not (tmp_path / "z.safetensors").exists()
