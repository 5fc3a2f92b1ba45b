"""run_all.sh and report.py, cheaply. The QUICK=1 smoke run itself takes ~3 min of CPU on 2 idle
cores (longer on a shared machine), so it is not run here: see the README / run `QUICK=1 bash run_all.sh`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_parses_and_rejects_an_unknown_target(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "run_all.sh")]).returncode == 0
    env = {**os.environ, "TARGETS": "nosuchtarget", "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "res")}
    res = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown target 'nosuchtarget'" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


def fake_eval(arch, seed, ev, l0, dead, mcc, mcc_rand):
    return {"sae": {"arch": arch, "seed": seed, "d_sae": 1024, "path": f"x/{arch}/{seed}"}, "target": "modadd",
            "run": "runs/modadd/seed42", "acts": "a.safetensors",
            "reconstruction": {"explained_variance": ev},
            "sparsity": {"l0": l0, "dead_fraction": dead, "dense_fraction": 0.0},
            "downstream": {"heldout": {"loss_recovered": 0.99, "kl_sae": 0.01, "kl_zero": 4.7}},
            "fourier": {"fraction_pure": 0.1, "key_coverage": 0.4, "mcc": mcc,
                        "random_baseline": {"fraction_pure": {"mean": 0.0}, "key_coverage": {"mean": 0.0},
                                            "mcc": {"mean": mcc_rand, "max": mcc_rand + 0.005}},
                        "pca_baseline": {"fraction_pure": 0.8, "key_coverage": 0.8, "mcc": 0.5}},
            "figures": {}}


def test_report_tables_and_checks(tmp_path):
    res = tmp_path / "results"
    for i, s in enumerate((42, 123)):
        p = res / "modadd" / "seed42" / "eval" / f"topk_seed{s}" / "eval.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(fake_eval("topk", s, 0.95 + 0.01 * i, 32.0, 0.02, 0.46, 0.29)))
        p = res / "modadd" / "seed42" / "eval" / f"relu_seed{s}" / "eval.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(fake_eval("relu", s, 0.4, 30.0, 0.0, 0.3, 0.29)))
    # A quick-run result that the default report must leave out.
    q = res / "quick" / "modadd" / "seed42" / "eval" / "topk_seed1" / "eval.json"
    q.parent.mkdir(parents=True)
    q.write_text(json.dumps({**fake_eval("topk", 1, 0.1, 8.0, 0.5, 0.2, 0.2), "run": "runs/quick/modadd/seed42"}))
    out = subprocess.run([sys.executable, "-m", "lib.report", "--results", str(res), "--elapsed", "90",
                          "--exclude", str(res / "quick")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    md = (res / "REPORT.md").read_text()
    assert "| topk | 2 (123, 42) | 1024 | 0.955 ± 0.005 | 32.0 ± 0.0 | 2.0 ± 0.0 | n/a |" in md
    assert "| relu |" in md and "runs/quick" not in md
    assert "**PASS** TopK EV > 0.9" in md and "**PASS** TopK L0 within 10-50" in md
    assert "**PASS** TopK dead < 10%" in md and "**PASS** TopK Fourier-recovery MCC" in md
    assert "1.5 min" in md
    # A miss is reported as a miss.
    for s in (42, 123):
        p = res / "modadd" / "seed42" / "eval" / f"topk_seed{s}" / "eval.json"
        p.write_text(json.dumps(fake_eval("topk", s, 0.85, 60.0, 0.2, 0.30, 0.29)))
    subprocess.run([sys.executable, "-m", "lib.report", "--results", str(res), "--exclude", str(res / "quick")],
                   check=True, capture_output=True, cwd=ROOT, timeout=120)
    md = (res / "REPORT.md").read_text()
    for what in ("EV > 0.9", "L0 within 10-50", "dead < 10%", "Fourier-recovery MCC"):
        assert f"**MISS** TopK {what}" in md
