"""run_all.sh and lib/report.py: the QUICK=1 smoke run end to end (small model, small sweep, the
study, the report), a bad target, and the report's tables and goal lines on hand-made results."""
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


def test_quick_run_all_end_to_end(tmp_path):
    """QUICK=1 bash run_all.sh from empty directories: model, activations + ground truth, a TopK
    sweep (2 widths x 2 k x 2 seeds in one 03 pass and one 04 call per width; its seed agreement
    from the evals, no 05), the configuration the rule picks, the study (topk, relu and topk with
    --init data, x 2 seeds; the TopK SAEs near full-batch),
    evaluations, overlaps, REPORT.md; a second call redoes nothing."""
    env = {**os.environ, "QUICK": "1", "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path / "res")}
    res = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(next((tmp_path / "res").rglob("topk-data_seed42/eval.json")).read_text())
    assert data["sae"]["arch"] == "topk" and data["sae"]["init"] == "data"         # ARCHS's "topk-data"
    md = (tmp_path / "res" / "REPORT.md").read_text()
    assert "## The answer" in md and "sweep_resid_post.png" in md and "study configuration" not in md
    assert (tmp_path / "res" / "figures" / "sweep_resid_post.png").is_file()
    evals = sorted((tmp_path / "res").rglob("eval.json"))
    assert len(evals) == 8 + 6                                  # sweep 2 x 2 x 2, study 3 archs x 2 seeds
    assert len(sorted((tmp_path / "res").rglob("overlap.json"))) == 3       # the study's archs
    assert "| topk-data |" in md
    for arch, full_batch in (("topk", True), ("topk-data", True), ("relu", False)):     # STUDY_TOPK_ARGS
        s = json.loads(next((tmp_path / "runs").rglob(f"{arch}/seed42/summary.json")).read_text())
        assert (s["config"]["batch_size"] == 1 << (s["n_train"].bit_length() - 1)) == full_batch, (arch, s["config"])
    study = json.loads(next(p for p in evals if "sweep" not in p.parts).read_text())
    assert study["ground_truth"]["features"] and study["downstream"]["heldout"]["rows"] > 0
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.name in ("summary.json", "eval.json",
                                                                                 "overlap.json", "model.safetensors")}
    again = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())      # nothing was redone
    # Another study configuration in the same directories: TopK's eval files (named by arch and seed) are
    # redone for the new SAEs, not kept from the old ones; ReLU's, whose SAEs did not change, are kept.
    env2 = {**env, "SWEEP": "0", "STUDY_POST": "2 48", "ARCHS": "topk"}
    third = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env2, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    topk_eval, relu_eval = (next((tmp_path / "res").rglob(f"eval/{a}_seed42/eval.json")) for a in ("topk", "relu"))
    assert "/k2_d48/topk/" in json.loads(topk_eval.read_text())["sae"]["path"]
    assert relu_eval.stat().st_mtime_ns == stamps[relu_eval]
    assert "| topk | 2 / 48 | 2 |" in (tmp_path / "res" / "REPORT.md").read_text()


def fake_eval(arch, seed, ev, l0, answer, chance=0.0, sweep_k=None, init="tied", empty=0.0, kl_empty=float("nan")):
    k, d_sae = (sweep_k, 256) if sweep_k else (3, 384)
    gt = {"features": ["operand", "answer"],
          "tables": {"operand": {"share": 0.068}, "answer": {"share": 0.906}},
          "sae": {"answer": {"recovered": answer, "mcc": 0.95, "selectivity": 0.9, "plane_share": 0.3, "n_features": 113},
                  "operand": {"recovered": 0.5, "mcc": 0.8, "selectivity": 0.5, "plane_share": 0.2, "n_features": 113,
                              "recovered_firing": 0.7}},
          "chance": {b: {"answer": {"recovered": chance}, "operand": {"recovered": chance}}
                     for b in ("random_isotropic", "random_pca_subspace", "pca_signed")}}
    return {"sae": {"arch": arch, "seed": seed, "k": k, "d_sae": d_sae, "init": init,
                    "path": f"x/{arch}-{init}/{seed}/{sweep_k}"},
            "target": "modadd", "acts": "a.safetensors", "site": {"site": "resid_post", "layer": 0},
            "reconstruction": {"explained_variance": ev},
            "sparsity": {"l0": l0, "dead_fraction": 0.02, "dead_fraction_all_rows": 0.01, "dense_fraction": 0.0,
                         "empty_fraction_all_rows": empty},
            "downstream": {"heldout": {"loss_recovered": 0.99, "kl_sae": 0.01, "kl_zero": 4.7},
                           "all": {"kl_share_empty_rows": kl_empty}},
            "ground_truth": gt, "figures": {}}


def test_seed_agreement_from_evals_is_what_05_would_report():
    """Without an overlap.json (the sweep), the report takes 'recovered by every seed' and 'by both
    of a pair' from the evals' per-feature best cosines: here 3 seeds over 4 features."""
    from lib.report import agreement_from_evals
    best = [[0.95, 0.95, 0.5, 0.95], [0.95, 0.5, 0.95, 0.95], [0.95, 0.95, 0.95, 0.5]]
    group = [{"ground_truth": {"recovery_cos": 0.9, "sae": {"answer": {"best_cos": b}}}} for b in best]
    every, both = agreement_from_evals(group, "answer")
    assert every == 0.25                                        # only feature 0 is recovered by all three
    assert both == (0.5 + 0.5 + 0.5) / 3                        # each pair shares 2 of the 4
    assert all(v != v for v in agreement_from_evals(group[:1], "answer"))    # one seed: no agreement


def test_choose_rule_prefers_the_most_recovery_among_mostly_live_dictionaries():
    """CHOOSE_RULE: most answer features by every seed among cells with <= 10% dead latents;
    a wider cell that recovers two more features with 84% of its latents dead is passed over,
    unless every cell is mostly dead."""
    from lib.report import answer_rows, choice_lines, choose

    def cell(k, d_sae, answer, dead):
        out = []
        for seed in (1, 2):
            e = fake_eval("topk", seed, 0.9, k, answer, sweep_k=k)
            e["sae"].update(d_sae=d_sae, path=f"x/topk/{seed}/{k}_{d_sae}")
            e["sparsity"]["dead_fraction_all_rows"] = dead
            out.append(e)
        return out

    evals = cell(2, 256, 107 / 113, 0.0) + cell(2, 1024, 109 / 113, 0.84) + cell(3, 256, 0.8, 0.0) + cell(2, 512, 107 / 113, 0.05)
    assert choose(evals, [])[:2] == (2, 256)                    # 512 ties with 256: fewer latents win
    line = choice_lines(answer_rows(evals, [])[1])[0]           # what REPORT.md says of the choice
    assert line.endswith("k 2 / 256 latents, 95% of the answer features by every seed. Cells that recover more "
                         "but leave more than 10% of their latents dead: k 2 / 1024 (96% by every seed, 84% dead).")
    for e in evals:
        e["sparsity"]["dead_fraction_all_rows"] = 0.5
    assert choose(evals, [])[:2] == (2, 1024)                   # none is mostly live: all cells compete


def fake_overlap(arch, seeds, every, sweep_k=None, init="tied"):
    return {"saes": [{"arch": arch, "seed": s, "init": init, "path": f"x/{arch}-{init}/{s}/{sweep_k}"} for s in seeds],
            "acts": "a.safetensors",
            "summary": {"pw_mcc": {"mean": 0.7, "std": 0.0, "n": 1}}, "baseline_isotropic": {"pw_mcc": {"mean": 0.3}},
            "baseline_subspace": {"pw_mcc": {"mean": 0.59}}, "pairs": [{}], "effective_subspace": {"r": 18},
            "ground_truth": {"answer": {"every": every, "both": {"mean": every}, "pw_mcc_gt": {"mean": 0.98}},
                             "operand": {"every": 0.4, "both": {"mean": 0.4}, "pw_mcc_gt": {"mean": 0.9}}}}


def fake_lm_eval(arch, seed):
    return {"sae": {"arch": arch, "seed": seed, "k": 32, "d_sae": 4608, "path": f"lm/{arch}/{seed}"},
            "target": "lm", "acts": "runs/smollm2/acts/L15_resid_post",
            "site": {"site": "resid_post", "layer": 15, "model": "smollm2", "tokens": 1000000},
            "reconstruction": {"explained_variance": 0.8}, "sparsity": {"l0": 32.0, "dead_fraction": 0.1},
            "downstream": {"ce_clean": 3.1, "ce_sae": 3.4, "ce_zero": 9.0, "loss_recovered": 0.95, "kl_sae": 0.3,
                           "kl_zero": 6.0, "contexts": 32, "model": "smollm2", "layer": 15, "site": "resid_post"},
            "ground_truth": None, "figures": {}}


def write(path: Path, obj: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_report_leads_with_the_answer_and_states_each_goal(tmp_path):
    res = tmp_path / "results"
    site = res / "modadd" / "seed42" / "resid_post"
    for s, ans in ((42, 0.97), (123, 0.96)):
        write(site / "eval" / f"topk_seed{s}" / "eval.json", fake_eval("topk", s, 0.95, 3.0, ans))
        write(site / "eval" / f"relu_seed{s}" / "eval.json", fake_eval("relu", s, 0.9, 3.1, 0.5, empty=0.005,
                                                                       kl_empty=0.5 + (s == 123) * 0.2))
        write(site / "eval" / f"topk-data_seed{s}" / "eval.json", fake_eval("topk", s, 0.96, 3.0, 1.0, init="data"))
        for k in (2, 32):
            e = fake_eval("topk", s, 0.9, k, 0.9 if k == 2 else 0.0, sweep_k=k)
            best = [0.95] * 102 + [0.5] * 11 if k == 2 else [0.5] * 113      # seed 123: the first 11 missed
            e["ground_truth"].update(recovery_cos=0.9)
            e["ground_truth"]["sae"]["answer"]["best_cos"] = best if s == 42 else best[::-1]
            write(site / "sweep" / f"k{k}" / "eval" / f"topk_seed{s}" / "eval.json", e)
    write(site / "overlap" / "topk" / "overlap.json", fake_overlap("topk", (42, 123), 0.93))
    write(site / "overlap" / "relu" / "overlap.json", fake_overlap("relu", (42, 123), 0.3))
    write(site / "overlap" / "topk-data" / "overlap.json", fake_overlap("topk", (42, 123), 0.99, init="data"))
    for s in (42, 123):
        write(res / "smollm2" / "eval" / f"topk_seed{s}" / "eval.json", fake_lm_eval("topk", s))
    # A quick-run result that the default report must leave out.
    write(res / "quick" / "modadd" / "eval" / "topk_seed1" / "eval.json", {**fake_eval("topk", 1, 0.1, 8.0, 0.2),
                                                                            "acts": "runs/quick/a.safetensors"})
    out = subprocess.run([sys.executable, "-m", "lib.report", "--results", str(res), "--elapsed", "90",
                          "--exclude", str(res / "quick")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    md = (res / "REPORT.md").read_text()
    assert md.index("## The answer") < md.index("## Details per site") < md.index("## Language model")
    assert "| topk | 3 / 384 | 2 | 0% ± 0% |" not in md
    assert "| topk | 3 / 384 | 2 | 50% ± 0% | 40% | 40% | 0.900 | 96% ± 0% | 93% | 93% | 0.980 |" in md
    assert "**PASS** topk (k 3, 384 latents): every seed recovers >= 95% of the answer features: lowest seed 96%" in md
    assert "**PASS** topk (k 3, 384 latents): the 2 seeds together recover >= 90% of them: 93%" in md
    assert "**MISS** relu (k 3, 384 latents): every seed recovers >= 95%" in md
    # a variant of the study (run_all.sh's ARCHS "topk-data"): its own row, after its arch's, named and explained
    row_t, row_d = md.index("| topk | 3 / 384 | 2 |"), md.index("| topk-data | 3 / 384 | 2 | 50% ± 0% | 40% | 40% |")
    assert row_t < row_d < md.index("| relu | 3 / 384 | 2 |")
    assert "| topk-data | 3 / 384 | 2 | 50% ± 0% | 40% | 40% | 0.900 | 100% ± 0% | 99% | 99% | 0.980 |" in md
    assert "`ARCH-data`: the architecture trained with `03_train_sae.py --init data`" in md
    assert "**PASS** topk-data (k 3, 384 latents): the 2 seeds together recover >= 90% of them: 99%" in md
    assert "Started from `--init data`, topk recovers 100% of the answer features with its lowest seed and 99% " \
           "with every seed, against 96% and 93% from 03's default init." in md
    assert "**MISS** relu (k 3, 384 latents): the 2 seeds together recover >= 90% of them: 30%" in md
    assert "topk with k 3 and 384 latents recovers 50% of the 113 operand features" in md
    assert "random decoders 0%; by firing 70%); 96% of the 113 answer features" in md     # operand's, not answer's
    # rows with no latent: a sentence for the architecture that leaves them (means over seeds), none for TopK
    assert "relu leaves 0.50% of the rows with no active latent (reconstructed as b_dec alone: README, " \
           "\"Rows with no latent\"); they carry 60% of its KL over all inputs." in md
    assert "topk leaves" not in md and "| 0.50 ± 0.00 |" in md
    assert (res / "figures" / "sweep_resid_post.png").is_file() and "sweep_resid_post.png" in md
    assert "At the seed guide's k 32 / 1024 latents" not in md       # no such cell in this sweep
    # the heatmaps' numbers as a table, and the configuration the rule picks from them, with the rule
    assert "| k | 256 latents |\n|---|---|\n| 2 | 90% / 81% (1% dead) |\n| 32 | 0% / 0% (1% dead) |" in md
    assert "The study's configuration by the rule (lib/report.py CHOOSE_RULE: among the sweep cells whose TopK " \
           "SAEs leave at most 10% of their latents dead" in md
    assert "): k 2 / 256 latents, 81% of the answer features by every seed." in md
    # the LM section: model, layer, site, tokens; CE clean / with SAE / zero, loss recovered, KL
    assert "## Language model: smollm2, layer 15, resid_post" in md and "1000000 token rows" in md
    assert "| topk | 32 / 4608 | 2 | 0.800 ± 0.000 | 32.0 ± 0.0 | 10.0 ± 0.0 | 3.100 ± 0.000 | 3.400 ± 0.000 | " \
           "9.000 ± 0.000 | 0.950 ± 0.000 |" in md
    assert "runs/quick" not in md and "1.5 min" in md
    assert "These figures come from one modular-addition model." in md          # every modadd eval: one model
    other = {**fake_eval("topk", 42, 0.95, 3.0, 0.97), "acts": "runs/modadd/seed123/acts/resid_post.safetensors"}
    write(res / "modadd" / "seed123" / "resid_post" / "eval" / "topk_seed42" / "eval.json", other)
    out = subprocess.run([sys.executable, "-m", "lib.report", "--results", str(res), "--exclude", str(res / "quick")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "These figures come from one" not in (res / "REPORT.md").read_text()    # two models: no such note
