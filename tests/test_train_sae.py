"""03_train_sae.py end to end: known answers on a known sparse dictionary, resume, DDP,
determinism, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib.common import load_stage, load_tensor_metadata
from conftest import ROOT, run_stage, sparse_dictionary_data, write_acts
from sae import SAE

SCRIPT = ROOT / "03_train_sae.py"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# small and quick: 256 features in 64 dims, 2 active per row; batch 512
BASE = ["--k", "2", "--batch-size", "512", "--log-every", "25", "--quiet"]


def run(*args, check=True, timeout=300):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def k2(tmp_path_factory):
    """(dir with activations.safetensors, true features): 20k rows, 90% SAE-train."""
    x, feats = sparse_dictionary_data(n=20000, active=2)
    d = tmp_path_factory.mktemp("k2")
    write_acts(d / "activations.safetensors", x)
    return d, feats


@pytest.fixture(scope="session")
def trainer():
    return load_stage("03_train_sae.py")


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(Path(out) / "sae_weights.safetensors"))


def assert_unit_rows(out):
    norms = weights(out)["W_dec"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


# ----------------------------------------------------------------------------
# known answers

def test_help():
    p = run("--help")
    assert "--acts" in p.stdout and "--resume" in p.stdout and "torchrun" not in p.stderr


def test_topk_recovers_the_true_features(k2, tmp_path):
    acts, feats = k2
    out = tmp_path / "topk"
    run("--acts", acts, "--out", out, "--arch", "topk", "--expansion", "8", "--lr", "3e-3", "--tokens", 256000, *BASE)
    sae = SAE.load(out)
    max_cos = (feats @ sae.W_dec.detach().t()).max(1).values
    assert (max_cos > 0.9).float().mean() >= 0.9, f"recovered {(max_cos > 0.9).float().mean():.2f}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout"]["ev"] > 0.95 and summary["heldout"]["l0"] == pytest.approx(2.0)
    assert summary["n_heldout"] == 2000 and summary["split"] == "train_mask"
    assert {"config", "seed", "code_version"} <= summary.keys()
    m = metrics(out)
    assert m[-1]["mse"] < 0.2 * m[0]["mse"] and m[-1]["step"] == 500
    assert {"loss", "mse", "auxk_loss", "ev", "l0", "dead_frac", "tokens_per_s", "heldout_ev"} <= m[-1].keys()
    assert_unit_rows(out)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 2 and cfg["d_in"] == 64 and cfg["d_sae"] == 512
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["seed"] == 0
    assert cfg["metadata"]["input_scale_folded"] == pytest.approx(summary["input_scale"])


@pytest.mark.parametrize("arch,extra", [("batchtopk", []), ("relu", ["--l1-coeff", "0.05"]),
                                        ("jumprelu", ["--l0-coeff", "0.003"]), ("relu", ["--steer-gain", "0.02"]),
                                        ("jumprelu", []), ("jumprelu", ["--sparsity-loss", "tanh"])],
                         ids=["batchtopk", "relu", "jumprelu", "relu-steered", "jumprelu-steered", "jumprelu-tanh"])
def test_each_architecture_trains(arch, extra, k2, tmp_path):
    acts, _ = k2
    out = tmp_path / arch
    run("--acts", acts, "--out", out, "--arch", arch, "--expansion", "8", "--lr", "3e-3", "--tokens", 256000,
        *extra, *BASE)
    m = metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert_unit_rows(out)
    l0 = [r["l0"] for r in m]
    steered = arch in ("relu", "jumprelu") and not {"--l1-coeff", "--l0-coeff"} & set(extra)
    if not steered:                                       # fixed coefficients: the loss falls
        assert m[-1]["loss"] < 0.5 * m[0]["loss"] and m[-1]["mse"] < 0.5 * m[0]["mse"]
    if arch == "batchtopk":      # the threshold at inference keeps L0 near the training L0 (= k)
        assert summary["final_train_l0"] == pytest.approx(2.0)
        assert abs(summary["heldout"]["l0"] - 2.0) < 0.1 * 2.0
        assert SAE.load(out).arch == "batchtopk"
        assert json.loads((out / "cfg.json").read_text())["architecture"] == "jumprelu"
    if steered:                                           # lambda steered: L0 -> k = 2
        assert l0[0] > 10 and abs(l0[-1] - 2) < 0.5 and abs(summary["heldout"]["l0"] - 2) < 0.5
        assert m[-1]["lambda"] > 10 * m[0]["lambda"]
    if arch == "jumprelu":       # theta moves (stored directly; see sae.py), it does not sit at its init
        assert l0[-1] < 0.5 * l0[0]
        assert float(SAE.load(out).threshold.detach().mean()) > 10 * 1e-3 / summary["input_scale"]
        details = json.loads((out / "cfg.json").read_text())["metadata"]["training_architecture_details"]
        assert details["sparsity_loss"] == ("tanh" if "tanh" in extra else "step")


def test_auxk_revives_latents_that_die_without_it(k2, tmp_path):
    """A high lr kills latents early; AuxK (Gao et al. 2024) brings them back."""
    acts, _ = k2
    args = ["--acts", acts, "--arch", "topk", "--expansion", "4", "--lr", "1e-2", "--tokens", 128000, *BASE]
    run(*args, "--out", tmp_path / "auxk")
    run(*args, "--out", tmp_path / "plain", "--no-auxk")
    with_, without = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("auxk", "plain"))
    assert without["dead_frac"] > 0.1
    assert with_["dead_frac"] < 0.5 * without["dead_frac"]
    assert with_["heldout"]["ev"] > without["heldout"]["ev"]
    assert any(r["auxk_loss"] > 0 for r in metrics(tmp_path / "auxk"))


def test_data_init_keeps_latents_alive_on_low_rank_data(tmp_path):
    """On data of low rank (64 features in a 12-dim subspace of 64 dims, as modular addition's sites
    are), random decoder directions (--init tied) mostly point outside the data and die; rows drawn
    from the data (--init data) start inside it: far fewer dead latents, better reconstruction and
    more of the true features recovered, on the same budget."""
    x, feats = sparse_dictionary_data(n=12000, d=12, n_feat=64, active=2)
    g = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(64, 12, generator=g))[0]                  # [64, 12] orthonormal
    x, feats = x @ basis.t(), feats @ basis.t()
    acts = write_acts(tmp_path / "lowrank" / "activations.safetensors", x)
    args = ["--acts", acts, "--arch", "topk", "--k", "2", "--d-sae", "128", "--tokens", 512 * 150,
            "--batch-size", "512", "--quiet"]
    run(*args, "--out", tmp_path / "data", "--init", "data")
    run(*args, "--out", tmp_path / "tied")                       # the default: --init tied
    data, tied = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("data", "tied"))
    assert data["init"] == "data" and tied["init"] == "tied"
    assert tied["heldout"]["never_fired_frac"] > 0.3 and data["heldout"]["never_fired_frac"] < 0.5 * tied["heldout"]["never_fired_frac"]
    assert data["heldout"]["ev"] > tied["heldout"]["ev"]
    rec = {d: float(((feats @ SAE.load(tmp_path / d).W_dec.detach().t()).max(1).values > 0.9).float().mean())
           for d in ("data", "tied")}
    assert rec["data"] > rec["tied"], rec


@pytest.mark.parametrize("arch,lr,gain,margin,ev_slack", [("relu", "3e-2", "0.02", 0.1, 0.1),
                                                          ("jumprelu", "1e-2", "0.05", 0.05, 0.0)])
def test_auxk_revives_relu_and_jumprelu_latents(arch, lr, gain, margin, ev_slack, k2, tmp_path):
    """The dead-latent remedy of ReLU and JumpReLU: AuxK on the dead latents' raw pre-activations
    (sae.py). A high lr and fast lambda steering kill latents; the same run with AuxK leaves fewer
    dead (JumpReLU's revival is the weaker one: a latent must cross theta) and JumpReLU
    reconstructs better. ReLU, with its free decoder rows, pays a little EV for the revival in
    this short run at 12x 03's lr (0.30 against 0.37, with 2% dead against 17%)."""
    acts, _ = k2
    args = ["--acts", acts, "--arch", arch, "--k", "2", "--expansion", "8", "--lr", lr, "--steer-gain", gain,
            "--tokens", 512 * 400, "--batch-size", "512", "--quiet",
            "--max-grad-norm", "0"]       # the clip off: at 12x the lr it cost the AuxK run 0.17 of EV
    run(*args, "--out", tmp_path / "auxk")
    run(*args, "--out", tmp_path / "plain", "--no-auxk")
    with_, without = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("auxk", "plain"))
    assert with_["dead_frac"] < without["dead_frac"] - margin
    assert with_["heldout"]["ev"] > without["heldout"]["ev"] - ev_slack
    assert any(r.get("auxk_loss", 0) > 0 for r in metrics(tmp_path / "auxk"))
    assert all("auxk_loss" not in r for r in metrics(tmp_path / "plain"))


def test_resampling_resets_exactly_the_dead_latents_toward_data():
    """bench/resample_dead.py (Bricken et al. 2023), which README cites for resampling making
    JumpReLU's dead share worse: each dead latent's decoder row becomes a unit data direction
    (a batch row minus b_dec), its encoder column that direction times 0.2 x the live columns'
    mean norm, b_enc 0, Adam's moments 0, its dead count 0; live latents are untouched."""
    from types import SimpleNamespace
    from bench.resample_dead import resample_
    g = torch.Generator().manual_seed(0)
    sae = SAE(8, 16, "jumprelu", 2, generator=g)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 8, generator=g)
    sae(x).loss.backward()
    opt.step()                                                    # Adam has moments for every parameter
    sae.post_step_()                                              # unit decoder rows, as 03 keeps them
    since = torch.zeros(16, dtype=torch.long)
    since[[1, 5, 9]] = 100                                        # dead after 50 tokens
    run = SimpleNamespace(sae=sae, opt=opt, since_fired=since)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    live = torch.ones(16, dtype=torch.bool)
    live[[1, 5, 9]] = False
    enc_norm = float(before["W_enc"][:, live].norm(dim=0).mean())
    assert resample_(run, x, 50, None) == 3
    dirs = (x - sae.b_dec.detach()) / (x - sae.b_dec.detach()).norm(dim=1, keepdim=True)
    for i in (1, 5, 9):
        row = sae.W_dec.detach()[i]
        assert (dirs @ row).max() == pytest.approx(1.0, abs=1e-5)              # a data direction, unit norm
        torch.testing.assert_close(sae.W_enc.detach()[:, i], 0.2 * enc_norm * row)
        assert sae.b_enc.detach()[i] == 0
        assert opt.state[sae.W_dec]["exp_avg"][i].abs().max() == 0 and opt.state[sae.W_enc]["exp_avg_sq"][:, i].abs().max() == 0
    torch.testing.assert_close(sae.W_dec.detach()[live], before["W_dec"][live])
    torch.testing.assert_close(sae.threshold.detach(), before["threshold"])
    assert opt.state[sae.W_dec]["exp_avg"][live].abs().min() > 0
    assert run.since_fired.tolist() == [0] * 16
    assert resample_(run, x, 50, None) == 0                      # nothing dead: nothing touched


def test_schedule_stops_a_converged_run_and_not_a_falling_one():
    """The plateau rule (Schedule): a flat held-out loss starts the final decay after 2W evaluations
    and the run ends decay_frac later; a loss still falling 3% an evaluation never triggers it, so
    that run decays only at the cap; nor does a flat loss while dead latents are still reviving."""
    sched = load_stage("03_train_sae.py").Schedule
    flat = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    for i in range(1, 30):
        flat.update(100 * i, 0.05, 0.01, True)
    assert flat.decay_start == 2000 and flat.end == 2400 and "plateau at step 2000" in flat.reason
    assert flat.lr(1999) == 1e-3 and flat.lr(2200) == pytest.approx(0.5e-3) and flat.lr(2399) > 0
    falling = sched(1e-3, 20_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    fvu = 1.0
    for i in range(1, 200):
        fvu *= 0.97
        falling.update(100 * i, fvu, 0.0, True)
    assert falling.decay_start == 16_000 and falling.end == 20_000 and "maximum length" in falling.reason
    reviving = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    for i in range(1, 30):
        reviving.update(100 * i, 0.05, 0.5 - 0.01 * i, True)           # loss flat, dead fraction still falling
    assert reviving.decay_start is None
    # a low FVU inside the lr warmup (a data-initialised SAE before the full lr moves it away) is
    # no bar: the run goes on while its FVU falls 3% an evaluation, and stops once it is flat (the
    # first evaluation whose window improves on the best before it by less than tol = 2%)
    transient = sched(1e-3, 100_000, 300, 0.2, fixed=False, window=10, tol=0.02)
    transient.update(100, 0.06, 0.0, True)
    transient.update(200, 0.09, 0.0, True)
    fvu = 0.12
    for i in range(3, 30):
        fvu *= 0.97
        transient.update(100 * i, fvu, 0.0, True)
    assert transient.decay_start is None
    for i in range(30, 50):
        transient.update(100 * i, fvu, 0.0, True)
    assert transient.decay_start == 3900 and "plateau at step 3900" in transient.reason
    steering = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    for i in range(1, 30):
        steering.update(100 * i, 0.05, 0.0, False)                     # L0 not yet near k
    assert steering.decay_start is None
    # relu / jumprelu: a dense start has the lowest FVU of the run; once L0 reaches k the FVU is
    # higher but falls. Only evaluations since L0 reached k count, so the run goes on while it
    # falls and stops 2W flat evaluations after it stopped falling.
    sparsifying = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    for i in range(1, 11):
        sparsifying.update(100 * i, 0.001, 0.0, False)                  # dense: FVU 0.001, L0 >> k
    fvu = 0.5
    for i in range(11, 41):
        fvu *= 0.95
        sparsifying.update(100 * i, fvu, 0.0, True)                     # sparse and still improving
    assert sparsifying.decay_start is None
    for i in range(41, 61):
        sparsifying.update(100 * i, fvu, 0.0, True)                     # sparse and flat
    assert sparsifying.decay_start == 5000 and "plateau at step 5000" in sparsifying.reason
    # The held-out L0 of a steered run wanders either side of 10% off k (ReLU at k 2: 2.02-2.27): an
    # evaluation outside is left out, not a restart of the count; nor does a dense excursion's low
    # FVU become the bar the sparse evaluations must beat.
    wandering = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    for i in range(1, 40):
        wandering.update(100 * i, 0.05, 0.0, i % 3 != 0)
    assert wandering.decay_start == 2900 and "plateau at step 2900" in wandering.reason    # the 20th in-band one
    excursion = sched(1e-3, 100_000, 100, 0.2, fixed=False, window=10, tol=0.02)
    fvu = 0.5
    for i in range(1, 60):
        fvu *= 0.99
        dense = 20 <= i < 25                                            # L0 15% above k for a while
        excursion.update(100 * i, 0.5 * fvu if dense else fvu, 0.0, not dense)
    assert excursion.decay_start is None


def test_default_run_stops_at_its_plateau_and_says_why(k2, tmp_path):
    acts, _ = k2
    run("--acts", acts, "--out", tmp_path, "--arch", "topk", "--k", "2", "--expansion", "8", "--eval-every", "20",
        "--plateau-window", "5", "--quiet")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stop_reason"].startswith("held-out loss plateau at step") and s["steps"] < s["max_steps"]
    assert s["config"]["batch_size"] == 2048 and s["lr"] == pytest.approx(6e-4 * (16384 / 512) ** 0.5 * (2048 / 4096) ** 0.5)
    assert s["heldout"]["ev"] > 0.9 and len(s["heldout_fvu_history"]) >= 10
    m = metrics(tmp_path)
    assert m[-1]["step"] == s["steps"] and m[-1]["lr"] < 0.1 * m[len(m) // 2]["lr"]     # it ended on the decay


def test_lr_scale_multiplies_the_default_lr(k2, tmp_path):
    acts, _ = k2
    for scale, out in ((1, tmp_path / "a"), (2.5, tmp_path / "b")):
        run("--acts", acts, "--out", out, "--arch", "topk", "--k", "2", "--d-sae", "64", "--tokens", 8192,
            "--lr-scale", scale, "--quiet")
    lr_a, lr_b = (json.loads((tmp_path / n / "summary.json").read_text())["lr"] for n in "ab")
    assert lr_a == pytest.approx(6e-4 * (16384 / 64) ** 0.5 * (2048 / 4096) ** 0.5) and lr_b == pytest.approx(2.5 * lr_a)


def test_batch_size_max_is_the_largest_power_of_two_in_the_train_rows(k2, tmp_path):
    acts, _ = k2                                            # 18,000 SAE-train rows -> 16,384
    run("--acts", acts, "--out", tmp_path, "--arch", "topk", "--k", "2", "--d-sae", "64", "--tokens", 2 * 16384,
        "--batch-size", "max", "--quiet")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["config"]["batch_size"] == 16384 and s["steps"] == 2
    assert s["lr"] == pytest.approx(6e-4 * (16384 / 64) ** 0.5 * (16384 / 4096) ** 0.5)


# ----------------------------------------------------------------------------
# determinism, resume, multi-process

def _same_run(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]   # noqa: E731
    assert strip(metrics(a)) == strip(metrics(b))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_deterministic_and_resume_is_bit_identical(arch, k2, tmp_path, trainer, capsys):
    """In-process runs (same code path as the CLI, without the interpreter start-up)."""
    acts, _ = k2
    # lr 1e-2 kills latents, so AuxK and its dead-latent counters are live across the resume;
    # batchtopk carries its threshold, jumprelu its lambda and theta
    args = ["--acts", acts, "--arch", arch, "--expansion", "4", "--lr", "1e-2", "--tokens", 40960,
            "--ckpt-every", 15, *BASE]
    for name, extra in (("a", []), ("b", []), ("c", ["--stop-after-steps", 37]), ("c", ["--resume"])):
        trainer.main([str(a) for a in (*args, "--out", tmp_path / name, *extra)])
        if extra and extra[0] == "--stop-after-steps":
            assert not (tmp_path / "c" / "summary.json").exists()
            state = json.loads(load_tensor_metadata(tmp_path / "c" / "checkpoint.safetensors")["state"])
            assert state["step"] == 37
    _same_run(tmp_path / "a", tmp_path / "b")                      # same command, same weights
    _same_run(tmp_path / "a", tmp_path / "c")                      # stopped at 37 and resumed: the same


@pytest.mark.parametrize("arch,flags,clipped", [("relu", [], 1.0), ("relu", ["--max-grad-norm", "0"], None),
                                                 ("topk", [], None), ("topk", ["--max-grad-norm", "0.5"], 0.5)])
def test_gradient_clipping_is_relus_default(arch, flags, clipped, k2, tmp_path, trainer, monkeypatch):
    """relu clips at norm 1 every step (Conerly et al. 2024), the others not unless asked;
    --max-grad-norm 0 turns it off (the clipping maths: test_stacked / sae.SAE.clip_grad_norm_)."""
    calls = []
    monkeypatch.setattr(SAE, "clip_grad_norm_", lambda self, max_norm: calls.append(max_norm))
    trainer.main([str(a) for a in ("--acts", k2[0], "--out", tmp_path / "run", "--arch", arch, "--expansion", "2",
                                   "--tokens", 5120, "--stack", "off", *BASE, *flags)])
    assert calls == ([] if clipped is None else [clipped] * 10)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(k2, tmp_path):
    acts, _ = k2
    args = ["--acts", acts, "--arch", "topk", "--expansion", "4", "--lr", "1e-2", "--tokens", 512 * 600,
            "--ckpt-every", 20, *BASE]
    run(*args, "--out", tmp_path / "ref")
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args), "--out", str(out)], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if ck.exists() and (out / "metrics.jsonl").exists() and len(metrics(out)) >= 4:   # mid-run
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "summary.json").exists()
    assert run(*args, "--out", out, check=False).returncode == 2  # unfinished: needs --resume
    run(*args, "--out", out, "--resume")
    _same_run(tmp_path / "ref", out)


@pytest.mark.slow
def test_two_processes_match_one(k2, tmp_path):
    acts, _ = k2
    args = ["--acts", acts, "--arch", "topk", "--expansion", "4", "--lr", "1e-2", "--tokens", 512 * 100, *BASE]
    run(*args, "--out", tmp_path / "one")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(SCRIPT), *map(str, args), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(ma) == len(mb) and any(r["auxk_loss"] > 0 for r in ma)     # AuxK live in both
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 * max(1.0, x["loss"]) for x, y in zip(ma, mb))


# ----------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written or overwritten

def call(capsys, *args):
    r = run_stage(capsys, "03_train_sae.py", *args)
    return r.returncode, r.stderr


@pytest.fixture(scope="session")
def finished(k2, tmp_path_factory):
    """A finished run whose files must survive every bad command pointed at it."""
    acts, _ = k2
    out = tmp_path_factory.mktemp("finished") / "run"
    run("--acts", acts, "--out", out, "--arch", "topk", "--expansion", "2", "--tokens", 512 * 30, *BASE)
    return out


def _snapshot(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def _bad_files(d: Path, k2dir: Path):
    x = sparse_dictionary_data(n=300, active=2)[0]
    files = {}
    files["missing"] = d / "nope.safetensors"
    (d / "emptydir").mkdir()
    files["dir without file"] = d / "emptydir"
    (d / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    files["garbage"] = d / "garbage.safetensors"
    save_file({"x": x}, str(d / "nokey.safetensors"))
    files["missing key"] = d / "nokey.safetensors"
    save_file({"activations": x[:, 0].contiguous()}, str(d / "1d.safetensors"))
    files["1-D"] = d / "1d.safetensors"
    save_file({"activations": (x * 10).long()}, str(d / "int.safetensors"))
    files["int"] = d / "int.safetensors"
    xn = x.clone()
    xn[7, 3] = float("nan")
    xn[9, 0] = float("inf")
    save_file({"activations": xn}, str(d / "nan.safetensors"))
    files["nan"] = d / "nan.safetensors"
    save_file({"activations": x, "train_mask": torch.ones(5, dtype=torch.bool)}, str(d / "mask.safetensors"))
    files["mask shape"] = d / "mask.safetensors"
    (d / "sidecar").mkdir()
    write_acts(d / "sidecar" / "activations.safetensors", x)
    (d / "sidecar" / "activations.json").write_text(json.dumps({"d_in": 32, "hook_name": "h"}))
    files["mismatched d_in"] = d / "sidecar"
    return files


BAD = {   # name: (which --acts, extra flags, expected text)
    "missing": ("missing", [], "does not exist"),
    "dir without file": ("dir without file", [], "directory without activations.safetensors"),
    "garbage": ("garbage", [], "not a readable safetensors file"),
    "missing key": ("missing key", [], "no tensor named 'activations' (found: x)"),
    "1-D": ("1-D", [], "must be a 2-D float tensor"),
    "int": ("int", [], "must be a 2-D float tensor"),
    "nan": ("nan", [], "2 row(s) of 'activations' hold NaN/inf (first: row 7)"),
    "mask shape": ("mask shape", [], "'train_mask' has shape [5], expected [300]"),
    "mismatched d_in": ("mismatched d_in", [], "mismatched d_in: activations.json says d_in=32"),
    "k > d_sae": ("good", ["--k", "600"], "--k 600 exceeds the number of latents d_sae=512"),
    "batch > rows": ("good", ["--batch-size", "100000"], "--batch-size 100000 exceeds"),
    "batch not a number": ("good", ["--batch-size", "all"], "expected a number of rows or 'max', got 'all'"),
    "lr zero": ("good", ["--lr", "0"], "--lr must be > 0"),
    "lr scale zero": ("good", ["--lr-scale", "0"], "--lr-scale must be > 0 (got 0.0)"),
    "lr and lr scale": ("good", ["--lr", "1e-3", "--lr-scale", "2"], "give --lr or --lr-scale, not both"),
    "max grad norm": ("good", ["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0 (got -1.0)"),
    "lr negative": ("good", ["--lr", "-0.001"], "--lr must be > 0"),
    "unknown arch": ("good", ["--arch", "gated"], "invalid choice: 'gated'"),
    "bad int": ("good", ["--k", "three"], "invalid int value"),
    "tanh stacked": ("good", ["--arch", "jumprelu", "--sparsity-loss", "tanh", "--stack", "on"],
                     "--sparsity-loss tanh trains each SAE on its own plain path: drop --stack on"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_and_nothing_overwritten(case, capsys, finished, k2, tmp_path):
    files = _bad_files(tmp_path, k2[0])
    files["good"] = k2[0]
    which, extra, text = BAD[case]
    before = _snapshot(finished)
    code, err = call(capsys, "--acts", files[which], "--out", finished, "--overwrite", "--quiet",
                     "--tokens", 5120, *extra)
    assert code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and text in err, err
    assert _snapshot(finished) == before


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    p = run("--acts", tmp_path / "nope", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: --acts") and not (tmp_path / "o").exists()
    p = run("--acts", tmp_path / "nope", "--out", tmp_path / "o", "--lr", "-1", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: --lr must be > 0 (got -1.0)"


def test_finished_run_is_not_overwritten_without_flag(k2, finished, capsys):
    before = _snapshot(finished)
    code, err = call(capsys, "--acts", k2[0], "--out", finished, "--arch", "topk", "--expansion", "2",
                     "--tokens", 512 * 30, *BASE)
    assert code == 2 and "already holds a finished run" in err and _snapshot(finished) == before
    code, err = call(capsys, "--acts", k2[0], "--out", finished, "--resume", "--quiet")
    assert code == 2 and "already holds a finished run" in err and _snapshot(finished) == before


def test_unfinished_run_needs_resume_or_overwrite_and_flags_must_match(k2, tmp_path, capsys):
    acts, _ = k2
    args = ["--acts", acts, "--out", tmp_path, "--arch", "topk", "--expansion", "2", "--tokens", 512 * 30, *BASE]
    run(*args, "--stop-after-steps", 10)
    code, err = call(capsys, *args)
    assert code == 2 and "unfinished run" in err and "--resume" in err
    code, err = call(capsys, *args[:-1], "--lr", "1e-3", "--resume", "--quiet")
    assert code == 2 and "flags differ from the checkpointed run: --lr" in err
    # a checkpoint written before --sparsity-loss existed resumes as the step loss it trained with
    ckpt = tmp_path / "checkpoint.safetensors"
    meta = json.loads(load_tensor_metadata(ckpt)["state"])
    del meta["config"]["sparsity_loss"]
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**load_tensor_metadata(ckpt), "state": json.dumps(meta)})
    code, err = call(capsys, *args, "--sparsity-loss", "tanh", "--resume", "--quiet")
    assert code == 2 and "flags differ from the checkpointed run: --sparsity-loss" in err
    run(*args, "--resume")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30
    run(*args, "--overwrite")
    assert (tmp_path / "summary.json").exists() and metrics(tmp_path)[0]["step"] == 25


def test_resume_refuses_a_checkpoint_whose_dead_latent_remedies_were_other_defaults(k2, tmp_path, capsys):
    """BatchTopK's k_aux (d_in / 4) and pre-activation loss (on) changed at 044ea18: a checkpoint
    written before, which records neither, ran at d_in / 2 and no loss, and must not be continued
    under the new defaults as if it were the same run."""
    acts, _ = k2
    args = ["--acts", acts, "--out", tmp_path, "--arch", "batchtopk", "--expansion", "2", "--tokens", 512 * 30, *BASE]
    run(*args, "--stop-after-steps", 10)
    ckpt = tmp_path / "checkpoint.safetensors"
    meta = json.loads(load_tensor_metadata(ckpt)["state"])
    assert meta["remedies"] == {"k_aux": meta["d_in"] // 4, "pre_act_coeff": 1e-3}
    del meta["remedies"]                                    # as a checkpoint of 044ea18's parent
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**load_tensor_metadata(ckpt), "state": json.dumps(meta)})
    code, err = call(capsys, *args, "--resume", "--quiet")
    assert code == 2 and f"trained with k_aux {meta['d_in'] // 2} and pre-act-coeff 0.0" in err and "--overwrite" in err
    run(*args, "--overwrite")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30


def test_plain_activations_file_gets_a_seeded_ten_percent_holdout(tmp_path):
    x = sparse_dictionary_data(n=3000, active=2)[0]
    save_file({"activations": x}, str(tmp_path / "mine.safetensors"))
    for seed in (0, 1):
        run("--acts", tmp_path / "mine.safetensors", "--out", tmp_path / f"s{seed}", "--arch", "relu",
            "--expansion", "2", "--tokens", 512 * 20, "--seed", seed, *BASE)
    s0, s1 = (json.loads((tmp_path / f"s{s}" / "summary.json").read_text()) for s in (0, 1))
    assert s0["n_heldout"] == 300 and s0["n_train"] == 2700 and "seeded 10%" in s0["split"]
    assert s0["heldout"]["rows"] == 300 and s0["heldout"]["mse"] != s1["heldout"]["mse"]


# ----------------------------------------------------------------------------
# several SAEs in one pass over the data

def test_several_seeds_in_one_pass_are_the_runs_they_would_have_been(k2, tmp_path, trainer):
    """--seed 1 2 3: one directory per seed, each what a single run writes, each SAE from its own
    seed's init. Stacked (lib/stacked.py, the default for TopK) every SAE is within 0.01 held-out EV
    of its own run (same maths, other float rounding; the batch order follows the first seed);
    with --stack off, seed 1 is bit-identical to its own run. A killed and resumed pass ends where
    an unbroken one does, bit for bit."""
    acts, _ = k2
    args = ["--acts", acts, "--arch", "topk", "--expansion", "4", "--lr", "3e-3", "--tokens", 512 * 120,
            "--ckpt-every", 40, *BASE]
    trainer.main([str(a) for a in (*args, "--seed", 1, 2, 3, "--out", tmp_path / "many")])
    trainer.main([str(a) for a in (*args, "--seed", 1, 2, 3, "--out", tmp_path / "apart", "--stack", "off")])
    for s in (1, 2, 3):
        trainer.main([str(a) for a in (*args, "--seed", s, "--out", tmp_path / f"one{s}")])
        d = tmp_path / "many" / f"seed{s}"
        assert {p.name for p in d.iterdir()} >= {"sae_weights.safetensors", "cfg.json", "metrics.jsonl",
                                                 "checkpoint.safetensors", "summary.json"}
        many, one = (json.loads((p / "summary.json").read_text()) for p in (d, tmp_path / f"one{s}"))
        assert many["seed"] == one["seed"] == s and SAE.load(d).metadata["seed"] == s
        assert sorted(many["trained_with"]) == sorted(f"seed{t}" for t in (1, 2, 3) if t != s)
        assert abs(many["heldout"]["ev"] - one["heldout"]["ev"]) < 0.01
    _same_run(tmp_path / "apart" / "seed1", tmp_path / "one1")
    wa, wb = weights(tmp_path / "apart" / "seed2"), weights(tmp_path / "one2")
    assert not torch.equal(wa["W_dec"], wb["W_dec"])                 # another batch order: not the same bits
    # killed and resumed, the stacked pass ends where an unbroken one does
    trainer.main([str(a) for a in (*args, "--seed", 1, 2, 3, "--out", tmp_path / "cut", "--stop-after-steps", 50)])
    trainer.main([str(a) for a in (*args, "--seed", 1, 2, 3, "--out", tmp_path / "cut", "--resume")])
    for s in (1, 2, 3):
        _same_run(tmp_path / "many" / f"seed{s}", tmp_path / "cut" / f"seed{s}")


def test_lists_of_k_and_d_sae_name_one_directory_each(k2, tmp_path, trainer):
    acts, _ = k2
    trainer.main([str(a) for a in ("--acts", acts, "--out", tmp_path, "--k", 2, 4, "--d-sae", 128, 256,
                                   "--tokens", 512 * 10, *BASE[2:])])
    for k in (2, 4):
        for d in (128, 256):
            cfg = json.loads((tmp_path / f"k{k}_d{d}_seed0" / "cfg.json").read_text())
            assert cfg["k"] == k and cfg["d_sae"] == d
