"""The tools researchers use, for real: SAELens (the sae-lens package, in its own environment
.venv-saelens/ that tests/setup_saelens_env.sh builds on first use), Weights & Biases
(03 --wandb, offline) and Hugging Face `datasets` (02 --dataset, local data only)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_stage, sparse_dictionary_data, write_acts
from lib.common import load_stage
from lib import lm
from sae import ARCHS, SAE
from test_lm import char_tokenizer, tiny_config
from test_sae import data, make

SAELENS_VERSION = re.search(r"^sae-lens==(\S+)$", (ROOT / "tests" / "saelens-constraints.txt").read_text(),
                            re.M).group(1)
SAELENS_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"


def _tail(text, n=3000):
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("WARNING: Location"))[-n:]


# ----------------------------------------------------------------------------
# SAELens: our files in sae_lens.SAE.load_from_disk, SAELens's saves in SAE.load

def build_saelens_env():
    """Run tests/setup_saelens_env.sh: (seconds, stderr, None) or (.., .., why it failed)."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON") or sys._base_executable}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["bash", str(ROOT / "tests" / "setup_saelens_env.sh")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, "", "tests/setup_saelens_env.sh took over 15 minutes (pip stuck?)"
    if p.returncode != 0:
        return time.perf_counter() - t0, p.stderr, (
            f"tests/setup_saelens_env.sh failed (exit {p.returncode}), so sae-lens=={SAELENS_VERSION} "
            f"could not be installed into .venv-saelens/ and the SAELens round trip cannot be checked:\n"
            f"{_tail(p.stderr + p.stdout)}")
    return time.perf_counter() - t0, p.stderr, None


# ours, saved by sae.py -> (the class SAELens should build, extra SAE kwargs)
OURS = {"relu": ("StandardSAE", {}), "topk": ("TopKSAE", {}), "batchtopk": ("JumpReLUSAE", {}),
        "jumprelu": ("JumpReLUSAE", {}), "jumprelu_no_b_dec_in": ("JumpReLUSAE", {"apply_b_dec_to_input": False})}
META = {"model_name": "tiny-llama", "hook_name": "model.layers.1"}
# SAELens's saves (tests/saelens_side.py) -> (our arch after SAE.load, SAELens output to compare with, exact?)
THEIRS = {"standard": ("relu", "standard", True), "topk": ("topk", "topk", True),
          "jumprelu": ("jumprelu", "jumprelu", True),
          "batchtopk": ("batchtopk", "batchtopk", True),             # SAELens's inference export (a JumpReLU)
          "batchtopk_training": ("batchtopk", "batchtopk", True),    # its training save: the same SAE
          "topk_rescaled": ("topk", "topk_rescaled", False)}         # decoder norms folded on load


@pytest.fixture(scope="session")
def saelens_round_trip(tmp_path_factory):
    """Both sides' codes and reconstructions, or why they could not be had: the SAELens side
    runs once, in .venv-saelens, on our saved SAEs and on SAEs it makes and saves itself."""
    _, _, err = build_saelens_env()
    if err:
        return {"error": err}
    work = tmp_path_factory.mktemp("saelens")
    x = data(300, 32)
    save_file({"x": x}, str(work / "x.safetensors"))
    ours = {}
    for name in OURS:
        arch = name.split("_")[0]
        sae = make(arch, **OURS[name][1])
        if arch == "jumprelu":                # a threshold of its own for each latent
            with torch.no_grad():
                sae.threshold.uniform_(0.2, 1.0, generator=torch.Generator().manual_seed(5))
        sae.eval()
        sae.save(work / "ours" / name, metadata=META)
        with torch.no_grad():
            f = sae.encode(x)
            ours[name] = {"codes": f, "recon": sae.decode(f)}
    p = subprocess.run([str(SAELENS_PYTHON), str(ROOT / "tests" / "saelens_side.py"), str(work),
                        str(torch.get_num_threads())], cwd=work, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode != 0:
        return {"error": f"tests/saelens_side.py failed in .venv-saelens (exit {p.returncode}):\n{_tail(p.stderr)}"}
    return {"work": work, "x": x, "ours": ours, "report": json.loads((work / "report.json").read_text())}


def _need(res):
    if "error" in res:
        pytest.fail(res["error"], pytrace=False)
    return res


def test_saelens_env_is_pinned_and_cached(saelens_round_trip):
    res = _need(saelens_round_trip)
    assert res["report"]["sae_lens"] == SAELENS_VERSION
    assert res["report"]["torch"].split("+")[0] == "2.13.0"
    # built (or found) above; a second call finds its stamp and does nothing
    seconds, stderr, err = build_saelens_env()
    assert err is None and stderr == "" and seconds < 5, (seconds, stderr, err)


@pytest.mark.parametrize("name", list(OURS))
def test_our_saes_load_in_saelens_with_identical_codes(name, saelens_round_trip):
    res = _need(saelens_round_trip)
    assert set(OURS) >= set(ARCHS)
    arch = name.split("_")[0]
    seen = res["report"]["ours"][name]
    assert seen["class"] == OURS[name][0] and seen["d_in"] == 32 and seen["d_sae"] == 128
    assert seen["model_name"] == META["model_name"] and seen["hook_name"] == META["hook_name"]
    assert seen["apply_b_dec_to_input"] == ("no_b_dec_in" not in name) and seen["normalize_activations"] == "none"
    if arch == "topk":
        assert seen["k"] == 6
    if arch == "batchtopk":                   # a JumpReLU with one threshold, as SAELens exports BatchTopK
        assert seen["distinct_thresholds"] == 1
    if arch == "jumprelu":
        assert seen["distinct_thresholds"] == 128
    theirs = load_file(str(res["work"] / "theirs_on_ours" / f"{name}.safetensors"))
    ours = res["ours"][name]
    assert 0 < (ours["codes"] > 0).float().mean() < 1      # codes neither empty nor dense: a real comparison
    assert torch.equal(theirs["codes"], ours["codes"]), name
    assert torch.equal(theirs["recon"], ours["recon"]), name


@pytest.mark.parametrize("name", list(THEIRS))
def test_saelens_saves_load_here_with_identical_codes(name, saelens_round_trip):
    res = _need(saelens_round_trip)
    arch, ref_name, exact = THEIRS[name]
    sae = SAE.load(res["work"] / "sl" / name)
    assert sae.arch == arch and sae.d_in == 32 and sae.d_sae == 128
    ref = load_file(str(res["work"] / "sl_out" / f"{ref_name}.safetensors"))
    with torch.no_grad():
        f = sae.encode(res["x"])
        recon = sae.decode(f)
    assert 0 < (f > 0).float().mean() < 1
    if name.startswith("batchtopk"):
        assert res["report"]["batchtopk_inference_class"] == "JumpReLUSAE"
    if exact:
        assert torch.equal(f, ref["codes"]) and torch.equal(recon, ref["recon"]), name
    else:                 # the same SAE with its decoder norms folded in: equal up to float rounding
        assert torch.equal(f > 0, ref["codes"] > 0), name
        torch.testing.assert_close(f, ref["codes"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(recon, ref["recon"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Weights & Biases: 03 --wandb PROJECT, offline, read back from the run's .wandb file

def read_wandb_run(run_file: Path, env: dict) -> list:
    """The records of an offline run, read by wandb's own reader (`wandb leet inspect`, which
    prints them in protobuf text format) and parsed with wandb's own protobuf schema."""
    from google.protobuf import text_format
    from wandb.proto import wandb_internal_pb2 as pb
    p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_file)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    blocks = re.split(r"^# record \d+: \S+\n", p.stdout, flags=re.M)
    assert blocks[0].strip() == "" and len(blocks) > 3, p.stdout[:2000]
    records = []
    for b in blocks[1:]:
        r = pb.Record()
        text_format.Parse(b, r)
        records.append(r)
    return records


def _items(items) -> dict:
    return {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path):
    x = sparse_dictionary_data(n=4000, active=2)[0]
    acts = write_acts(tmp_path / "acts" / "activations.safetensors", x).parent
    out = tmp_path / "sae"
    home = tmp_path / "wandb_home"          # keep wandb's own settings and caches inside the test
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
           "WANDB_ERROR_REPORTING": "false", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "03_train_sae.py"), "--acts", str(acts), "--out", str(out),
                        "--arch", "relu", "--expansion", "4", "--batch-size", "256", "--tokens", "2560",
                        "--log-every", "2", "--quiet", "--wandb", "sae-interop"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))

    records = read_wandb_run(runs[0], env)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "sae-interop"
    config = _items(run.config.update)
    assert config["arch"] == "relu" and config["batch_size"] == 256 and config["d_sae"] == 4 * 64
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = _items(r.history.item)
            history.setdefault(row["_step"], {}).update(row)
    assert sorted(history) == [m["step"] for m in metrics]
    for m in metrics:                        # every logged value, as 03 wrote it to metrics.jsonl
        got = history[m["step"]]
        assert {"loss", "mse", "ev", "l0", "l1_loss", "lambda"} <= set(m)
        assert {k: got.get(k) for k in m} == m, m["step"]
    final = {}
    for r in records:                        # the run summary, updates in order
        if r.WhichOneof("record_type") == "summary":
            final.update(_items(r.summary.update))
    for k in ("ev", "mse", "l0"):
        assert final[f"final/{k}"] == summary["heldout"][k]
    assert final["loss"] == metrics[-1]["loss"]
    assert "exit" in kinds                   # wandb.finish() closed the run


# ----------------------------------------------------------------------------
# Hugging Face datasets: 02 --dataset on local data, against --text on the same documents

WORDS = "the king and queen of a far land went to see what the fool had said about war love night day".split()


@pytest.fixture(scope="module")
def extract():
    return load_stage("02_extract_activations.py")


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """No Hub, and `datasets`' cache inside the test (set before `datasets` is first imported,
    which reads them then)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
        yield


@pytest.fixture(scope="module")
def docs_and_model(hf_offline, tmp_path_factory):
    """(directory, documents, tiny Llama directory): the documents as .jsonl files (what --text
    reads and `datasets` streams), as parquet files, and as save_to_disk directories."""
    import datasets
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("hf_datasets")
    torch.manual_seed(7)
    model = root / "llama"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    rng = random.Random(3)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(24)]
    parts = [docs[:10], docs[10:]]
    rows = [[{"text": d, "id": i} for i, d in enumerate(part)] for part in parts]
    (root / "jsonl").mkdir()
    for j, part in enumerate(rows):
        (root / "jsonl" / f"part-{j}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "parquet").mkdir()
    for j, part in enumerate(rows):
        datasets.Dataset.from_list(part).to_parquet(str(root / "parquet" / f"train-{j}.parquet"))
    flat = [r for part in rows for r in part]
    datasets.Dataset.from_list(flat).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat),
                          "validation": datasets.Dataset.from_list(flat[:3])}).save_to_disk(str(root / "saved_dict"))
    return root, docs, model


def _extract(extract, model, out, *source):
    extract.main([str(a) for a in ("--model", model, "--layer", 1, "--site", "resid_post", "--ctx-len", 32,
                                   "--holdout-frac", 0.2, "--out", out, "--quiet", *source)])
    m = json.loads((out / "manifest.json").read_text())         # read as files, as 03 would
    parts = [load_file(str(out / s["file"])) for s in m["shards"]]
    return m, {k: torch.cat([p[k] for p in parts]) for k in ("activations", "tokens", "heldout")}


@pytest.mark.parametrize("source", ["jsonl", "parquet", "saved", "saved_dict", "jsonl/part-0.jsonl"])
def test_dataset_rows_equal_text_rows(source, docs_and_model, extract, tmp_path):
    root, docs, model = docs_and_model
    n_docs = 10 if source.endswith(".jsonl") else len(docs)
    assert list(lm.iter_documents(None, str(root / source))) == docs[:n_docs]
    text = root / source if source.endswith(".jsonl") else root / "jsonl"
    m_text, t_text = _extract(extract, model, tmp_path / "from_text", "--text", text)
    m_ds, t_ds = _extract(extract, model, tmp_path / "from_dataset", "--dataset", root / source)
    assert m_ds["n_contexts"] == m_text["n_contexts"] >= 8
    assert torch.equal(t_ds["tokens"], t_text["tokens"])
    assert torch.equal(t_ds["activations"], t_text["activations"])
    assert torch.equal(t_ds["heldout"], t_text["heldout"])


def test_dataset_is_streamed(docs_and_model, extract, tmp_path, capsys):
    """A directory of .jsonl files is read lazily: with a bad second file, --tokens that the
    first file covers succeeds, and reading on to the bad file is one clear error line."""
    root, docs, model = docs_and_model
    d = tmp_path / "half_bad"
    d.mkdir()
    (d / "part-0.jsonl").write_text((root / "jsonl" / "part-0.jsonl").read_text())
    (d / "part-1.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    _, t = _extract(extract, model, tmp_path / "head", "--dataset", d, "--tokens", 124)
    _, t_ref = _extract(extract, model, tmp_path / "ref", "--text", root / "jsonl", "--tokens", 124)
    assert len(t["tokens"]) == 4 and torch.equal(t["activations"], t_ref["activations"])
    code, err = _call(capsys, model, "--dataset", d, "--out", tmp_path / "all")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --dataset {d}: cannot read row"), err


def _call(capsys, model, *args):
    """02 as the command line runs it: (exit code, stderr)."""
    r = run_stage(capsys, "02_extract_activations.py", "--model", model, "--layer", 0, "--ctx-len", 16, "--quiet", *args)
    return r.returncode, r.stderr


@pytest.mark.parametrize("source,extra,message", [
    ("jsonl", ["--dataset-field", "body"], "no field 'body' in its rows (fields: text, id); pass --dataset-field"),
    ("saved", ["--dataset-field", "body"], "no field 'body' in its rows (fields: text, id); pass --dataset-field"),
    ("jsonl", ["--dataset-field", "id"], "field 'id' holds int, not text; pass --dataset-field"),
    ("saved_dict", ["--dataset-split", "test"], "no split 'test' (it has train, validation); pass --dataset-split"),
    ("jsonl", ["--dataset-split", "test"], "cannot be opened ("),
    ("missing_dir", [], "cannot be opened ("),
])
def test_dataset_errors_are_one_line(source, extra, message, docs_and_model, tmp_path, capsys):
    root, _, model = docs_and_model
    code, err = _call(capsys, model, "--dataset", root / source, *extra, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --dataset {root / source}: ") and message in err, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_wandb_resumed_run_continues_the_same_wandb_run(tmp_path):
    """Killed (--stop-after-steps) and resumed: the W&B run id travels in the checkpoint, so both
    processes write to one W&B run; a fresh run gets a new id."""
    x = sparse_dictionary_data(n=4000, active=2)[0]
    acts = write_acts(tmp_path / "acts" / "activations.safetensors", x).parent
    home = tmp_path / "wandb_home"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home / "config"),
           "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
           "WANDB_ERROR_REPORTING": "false"}
    base = [sys.executable, str(ROOT / "03_train_sae.py"), "--acts", str(acts), "--arch", "topk", "--k", "2",
            "--expansion", "2", "--batch-size", "256", "--tokens", "5120", "--quiet", "--wandb", "sae-interop"]
    for extra in (["--out", str(tmp_path / "a"), "--stop-after-steps", "8"], ["--out", str(tmp_path / "a"), "--resume"],
                  ["--out", str(tmp_path / "b")]):
        p = subprocess.run(base + extra, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    ids_a = {d.name.rsplit("-", 1)[-1] for d in (tmp_path / "a" / "wandb").glob("offline-run-*")}
    ids_b = {d.name.rsplit("-", 1)[-1] for d in (tmp_path / "b" / "wandb").glob("offline-run-*")}
    assert len(list((tmp_path / "a" / "wandb").glob("offline-run-*"))) == 2 and len(ids_a) == 1
    assert len(ids_b) == 1 and ids_a != ids_b
