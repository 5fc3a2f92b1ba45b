"""Language-model targets (lm.py, 02 --model, 03 over shards): tiny random GPT-2, Llama and
Qwen2 models built here (no download), a char-level tokenizer built here; plus one slow
end-to-end run on the packaged SmolLM2 GGUF."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_stage
from lib.common import load_stage

from lib import activations as A
from lib import lm

ARCHS = ("gpt2", "llama", "qwen2")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def extract():
    return load_stage("02_extract_activations.py")


@pytest.fixture(scope="session")
def trainer():
    return load_stage("03_train_sae.py")


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, "\n": 3}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config
    common = dict(vocab_size=128, bos_token_id=0, eos_token_id=1)
    if arch == "gpt2":
        return GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **common)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, **common)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{arch: model directory (save_pretrained, with tokenizer)}."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("tiny_lms")
    out = {}
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(100 + i)
        m = AutoModelForCausalLM.from_config(tiny_config(arch))
        d = root / arch
        m.save_pretrained(d)
        char_tokenizer().save_pretrained(d)
        out[arch] = d
    return out


WORDS = ("the king and queen of a far land went to see what the fool had said about war "
         "love night day sword crown ghost castle sea wind rain fire").split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of two .txt files and one .jsonl (about 24k characters)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def doc(n):
        return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                         for _ in range(n))
    (d / "a.txt").write_text(doc(120))
    (d / "b.txt").write_text(doc(120))
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": doc(20)}) for _ in range(6)) + "\n")
    return d


def run_extract(extract, *args):
    extract.main([str(a) for a in args])


def call(script, capsys, *args):
    r = run_stage(capsys, script, *args)
    return r.returncode, r.stderr


def load_all(out):
    m = A.read_manifest(out)
    parts = [A.load_shard(out, m, i) for i in range(len(m["shards"]))]
    return m, {k: torch.cat([p[k] for p in parts]) for k in ("activations", "tokens", "context_index", "heldout",
                                                               "row_heldout")}


# ----------------------------------------------------------------------------
# hooks

@pytest.mark.parametrize("arch", ARCHS)
def test_hooked_resid_equals_hidden_states_and_early_stop_changes_nothing(arch, tiny):
    spec = lm.resolve_model(str(tiny[arch]))
    model, _ = lm.load_model(spec)
    ids = torch.randint(4, 100, (3, 20), generator=torch.Generator().manual_seed(1))
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(lm.n_layers(model) - 1):      # the last entry of hidden_states has the final norm
        full = lm.hooked_forward(model, ids, layer, "resid_post", stop=False)
        early = lm.hooked_forward(model, ids, layer, "resid_post", stop=True)
        torch.testing.assert_close(full, hs[layer + 1], rtol=0, atol=0)
        assert torch.equal(early, full)
        # the sub-sites: resid_post - resid_pre = attn_out + mlp_out (pre-norm blocks)
        a = lm.hooked_forward(model, ids, layer, "attn_out")
        m = lm.hooked_forward(model, ids, layer, "mlp_out")
        torch.testing.assert_close(hs[layer + 1] - hs[layer], a + m, rtol=1e-5, atol=1e-5)


def test_early_stop_runs_no_later_layer(tiny):
    model, _ = lm.load_model(lm.resolve_model(str(tiny["llama"])))
    _, layers = lm.decoder_layers(model)
    calls = []
    hooks = [layers[i].register_forward_hook(lambda *_a, i=i: calls.append(i)) for i in range(len(layers))]
    lm_head = model.lm_head.register_forward_hook(lambda *_a: calls.append("head"))
    try:
        lm.hooked_forward(model, torch.randint(4, 100, (2, 8)), 1, "mlp_out")
        assert calls == [0]                           # layer 1's own hook runs after its mlp: never reached
        calls.clear()
        lm.hooked_forward(model, torch.randint(4, 100, (2, 8)), 1, "resid_post")
        assert calls == [0, 1]
    finally:
        for h in hooks + [lm_head]:
            h.remove()


# ----------------------------------------------------------------------------
# extraction: shards + manifest

@pytest.mark.parametrize("arch", ARCHS)
def test_shards_and_manifest_round_trip(arch, tiny, corpus, extract, tmp_path):
    out = tmp_path / "acts"
    run_extract(extract, "--model", tiny[arch], "--layer", 1, "--site", "resid_post", "--text", corpus,
                "--out", out, "--ctx-len", 32, "--shard-mb", 0.05, "--holdout-frac", 0.2, "--quiet")
    m, t = load_all(out)
    P = 31
    assert m["positions_per_context"] == P and m["skip_first"] == 1 and m["bos"] and m["context_length"] == 32
    assert len(m["shards"]) > 2 and all(s["bytes"] <= 0.05 * 2**20 + 4096 for s in m["shards"])
    assert m["token_count"] == len(t["activations"]) == m["n_contexts"] * P
    assert m["model_sha256"] and m["layer"] == 1 and m["site"] == "resid_post" and m["dtype"] == "fp32"
    assert m["config"]["layer"] == 1 and "code_version" in m and m["seed"] == 0
    assert torch.equal(t["context_index"], torch.arange(m["n_contexts"]))       # each context once, in order
    # token ids are the tokenised text; the rows are the model's activations on them
    tok = lm.load_model(lm.resolve_model(str(tiny[arch])))[1]
    ctx = lm.make_contexts(lm.iter_documents(str(corpus)), tok, 32)
    assert torch.equal(t["tokens"].long(), ctx) and (ctx[:, 0] == tok.bos_token_id).all()
    model, _ = lm.load_model(lm.resolve_model(str(tiny[arch])))
    ref = lm.hooked_forward(model, ctx[:40], 1, "resid_post")[:, 1:].reshape(-1, 32)
    torch.testing.assert_close(t["activations"][: 40 * P], ref)
    # the split: recorded per context, per shard and in total; held-out rows are those
    held = A.is_heldout_context(t["context_index"], 0.2, 0)
    assert torch.equal(t["heldout"], held) and 0 < int(held.sum()) < len(held)
    assert m["split"]["n_heldout_rows"] == int(held.sum()) * P
    assert m["split"]["n_train_rows"] + m["split"]["n_heldout_rows"] == m["token_count"]
    hr = A.load_heldout_rows(out, 10**9)
    assert hr.dtype == torch.float32 and torch.equal(hr, t["activations"][t["row_heldout"]])
    assert len(A.load_heldout_rows(out, 50)) == 50


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_shards(dtype, torch_dtype, tiny, corpus, extract, tmp_path):
    run_extract(extract, "--model", tiny["qwen2"], "--layer", 0, "--site", "mlp_out", "--text", corpus / "a.txt",
                "--out", tmp_path / "h", "--ctx-len", 16, "--dtype", dtype, "--tokens", 600, "--quiet")
    run_extract(extract, "--model", tiny["qwen2"], "--layer", 0, "--site", "mlp_out", "--text", corpus / "a.txt",
                "--out", tmp_path / "f", "--ctx-len", 16, "--tokens", 600, "--quiet")
    mh, th = load_all(tmp_path / "h")
    _, tf = load_all(tmp_path / "f")
    assert mh["dtype"] == dtype and th["activations"].dtype == torch_dtype and mh["token_count"] >= 600
    torch.testing.assert_close(th["activations"].float(), tf["activations"], rtol=2e-2, atol=2e-2)


def test_killed_extraction_resumes_without_duplicating_or_losing_a_token(tiny, corpus, extract, tmp_path, capsys):
    base = ["--model", tiny["gpt2"], "--layer", 2, "--site", "attn_out", "--text", corpus, "--ctx-len", 24,
            "--shard-mb", 0.02, "--holdout-frac", 0.2, "--quiet"]
    run_extract(extract, *base, "--out", tmp_path / "whole")
    part = tmp_path / "part"
    run_extract(extract, *base, "--out", part, "--stop-after-shards", 2)
    assert not (part / "manifest.json").exists() and len(list(part.glob("shard-*"))) == 2
    (part / ".shard-r00-00002.safetensors.tmp999").write_bytes(b"half a shard")   # killed mid-write
    code, err = call("02_extract_activations.py", capsys, *base, "--out", part)
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    run_extract(extract, *base, "--out", part, "--resume", "--stop-after-shards", 1)
    run_extract(extract, *base, "--out", part, "--resume")
    assert not list(part.glob(".shard-*"))
    mw, tw = load_all(tmp_path / "whole")
    mp, tp = load_all(part)
    assert mp["token_count"] == mw["token_count"] and len(mp["shards"]) == len(mw["shards"])
    assert torch.equal(tp["context_index"], torch.arange(mw["n_contexts"]))
    for k in tw:
        assert torch.equal(tp[k], tw[k]), k
    code, err = call("02_extract_activations.py", capsys, *base, "--out", part, "--resume")          # finished: refuse
    assert code == 2 and "already holds a finished extraction" in err
    # resuming with other flags is refused
    other = tmp_path / "other"
    run_extract(extract, *base, "--out", other, "--stop-after-shards", 1)
    code, err = call("02_extract_activations.py", capsys, *[a if a != 2 else 1 for a in base], "--out", other, "--resume")
    assert code == 2 and "other flags" in err


# ----------------------------------------------------------------------------
# downstream splice

class IdentitySAE:
    def encode(self, x):
        return x

    def decode(self, f):
        return f


def relu_identity_sae(d):
    """A real sae.SAE whose reconstruction is exact: relu(x) - relu(-x) = x."""
    from sae import SAE
    s = SAE(d, 2 * d, "relu", k=d)
    eye = torch.eye(d)
    with torch.no_grad():
        s.W_enc.copy_(torch.cat([eye, -eye], 1))
        s.W_dec.copy_(torch.cat([eye, -eye], 0))
        s.b_enc.zero_()
        s.b_dec.zero_()
    return s.eval()


@pytest.mark.parametrize("arch,site", [("gpt2", "attn_out"), ("llama", "resid_post"), ("qwen2", "mlp_out")])
def test_identity_sae_spliced_in_recovers_all_the_loss(arch, site, tiny, corpus, extract, tmp_path):
    out = tmp_path / "acts"
    run_extract(extract, "--model", tiny[arch], "--layer", 1, "--site", site, "--text", corpus, "--out", out,
                "--ctx-len", 32, "--holdout-frac", 0.3, "--quiet")
    for sae in (IdentitySAE(), relu_identity_sae(32)):
        r = lm.lm_downstream(sae, out, "cpu", 6)
        assert set(r) >= {"ce_clean", "ce_sae", "ce_zero", "loss_recovered", "kl_sae", "kl_zero"}
        assert r["contexts"] == 6 and r["predictions"] == 6 * 30
        assert abs(r["loss_recovered"] - 1.0) < 1e-4 and abs(r["kl_sae"]) < 1e-6
        assert r["ce_zero"] != r["ce_clean"] and r["kl_zero"] > 0


# ----------------------------------------------------------------------------
# 03 streams the shards

def test_sae_trains_on_streamed_shards_only_on_train_rows(tiny, corpus, extract, trainer, tmp_path):
    acts = tmp_path / "acts"
    run_extract(extract, "--model", tiny["llama"], "--layer", 1, "--text", corpus, "--out", acts, "--ctx-len", 32,
                "--shard-mb", 0.05, "--holdout-frac", 0.2, "--quiet")
    m, t = load_all(acts)
    train_rows = {tuple(r.tolist()) for r in t["activations"][~t["row_heldout"]]}
    src = A.ShardStream(acts, m, 256, seed=3, buffer_rows=600)
    assert 1 < src.W < len(m["shards"])                           # a window of shards, not the whole set
    again = A.ShardStream(acts, m, 256, seed=3, buffer_rows=600)
    steps = src.steps_in_pass(0) + 3
    seen = []
    for s in list(range(steps)) + [1, 0]:                         # any order: a pure function of the step
        b = src.batch(s)
        assert b.shape == (256, 32)
        assert torch.equal(b, again.batch(s))
        seen.append(b)
        assert all(tuple(r.tolist()) in train_rows for r in b[::17])
    from collections import Counter
    train_count = Counter(tuple(r.tolist()) for r in t["activations"][~t["row_heldout"]])
    first_pass = Counter(tuple(r.tolist()) for b in seen[: src.steps_in_pass(0)] for r in b)
    assert all(n <= train_count[r] for r, n in first_pass.items())    # no row twice within a pass
    assert sum(first_pass.values()) > 0.8 * sum(train_count.values())

    base = ["--acts", acts, "--k", 4, "--expansion", 4, "--batch-size", 256, "--tokens", 256 * 30,
            "--log-every", 10, "--ckpt-every", 10, "--buffer-rows", 600, "--quiet"]
    trainer.main([str(a) for a in base + ["--out", tmp_path / "a"]])
    trainer.main([str(a) for a in base + ["--out", tmp_path / "b", "--stop-after-steps", 13]])
    trainer.main([str(a) for a in base + ["--out", tmp_path / "b", "--resume"]])
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["n_train"] == m["split"]["n_train_rows"] and s["n_heldout"] == m["split"]["n_heldout_rows"]
    assert s["heldout"]["ev"] > 0.3
    from safetensors.torch import load_file
    wa, wb = load_file(str(tmp_path / "a" / "sae_weights.safetensors")), load_file(str(tmp_path / "b" / "sae_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)             # resume is bit-identical
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert "blocks.1.hook_resid_post" in json.dumps(cfg)


# ----------------------------------------------------------------------------
# bad input: one line, exit 2

def test_unknown_model_offline(extract, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = call("02_extract_activations.py", capsys, "--model", "no-such-org/no-such-model-xyz", "--layer", 0,
                     "--text", corpus, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot be found locally" in err and "save_pretrained" in err
    assert not (tmp_path / "o").exists()


def test_layer_out_of_range(extract, tiny, corpus, tmp_path, capsys):
    code, err = call("02_extract_activations.py", capsys, "--model", tiny["gpt2"], "--layer", 3, "--text", corpus,
                     "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out of range for a 3-layer model" in err


def test_empty_text_file(extract, tiny, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, err = call("02_extract_activations.py", capsys, "--model", tiny["gpt2"], "--layer", 0, "--text", tmp_path / "empty.txt",
                     "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "empty" in err


def test_manifest_with_missing_shards(tiny, corpus, extract, trainer, tmp_path, capsys):
    acts = tmp_path / "acts"
    run_extract(extract, "--model", tiny["gpt2"], "--layer", 0, "--text", corpus / "a.txt", "--out", acts,
                "--ctx-len", 16, "--shard-mb", 0.02, "--quiet")
    next(acts.glob("shard-r00-00001.safetensors")).unlink()
    code, err = call("03_train_sae.py", capsys, "--acts", acts, "--out", tmp_path / "sae")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing" in err and "shard-r00-00001" in err
    with pytest.raises(A.UserError, match="missing"):
        A.load_heldout_rows(acts, 10)


def test_modadd_mode_still_needs_run(extract, capsys):
    with pytest.raises(SystemExit) as e:
        extract.main(["--out", "x.safetensors"])
    assert e.value.code == 2 and "--run" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# torchrun: the corpus split by rank

def test_two_ranks_split_the_corpus(tiny, corpus, extract, tmp_path):
    base = ["--model", tiny["llama"], "--layer", 1, "--text", corpus, "--ctx-len", 32, "--shard-mb", 0.05, "--quiet"]
    run_extract(extract, *base, "--out", tmp_path / "one")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "02_extract_activations.py"), *map(str, base), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    m1, t1 = load_all(tmp_path / "one")
    m2, t2 = load_all(tmp_path / "two")
    assert m2["world_size"] == 2 and {s["rank"] for s in m2["shards"]} == {0, 1}
    order = torch.argsort(t2["context_index"])
    assert torch.equal(t2["context_index"][order], t1["context_index"])
    assert torch.equal(t2["tokens"][order], t1["tokens"])
    P = m1["positions_per_context"]
    rows2 = t2["activations"].view(-1, P, 32)[order].reshape(-1, 32)
    torch.testing.assert_close(rows2, t1["activations"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# the offline default target, end to end

@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    corpus = ROOT / "data" / "corpus"
    if not (corpus / "SOURCE").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_corpus.py"), "--quiet"], check=True)
    acts, sae_dir = tmp_path / "acts", tmp_path / "sae"
    py = sys.executable
    p = subprocess.run([py, str(ROOT / "02_extract_activations.py"), "--model", "smollm2", "--layer", "15",
                        "--text", str(corpus), "--tokens", "30000", "--holdout-frac", "0.1", "--out", str(acts),
                        "--quiet"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([py, str(ROOT / "03_train_sae.py"), "--acts", str(acts), "--out", str(sae_dir),
                        "--d-sae", "2304", "--k", "32", "--batch-size", "512", "--tokens", str(512 * 400),
                        "--lr", "1e-3", "--quiet"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    from lib.metrics import explained_variance
    from sae import SAE
    sae = SAE.load(sae_dir)
    x = A.load_heldout_rows(acts, 20000)
    with torch.no_grad():
        ev = explained_variance(x, sae.decode(sae.encode(x)))
    r = lm.lm_downstream(sae, acts, "cpu", 12)
    print(f"\nSmolLM2 L15 resid_post e2e: EV {ev:.3f}, {json.dumps(r)}")
    assert ev > 0.5
    assert r["loss_recovered"] > 0 and r["ce_clean"] < r["ce_sae"] < r["ce_zero"]


# ----------------------------------------------------------------------------
# 03 and 04 hold out the same rows, for both kinds of --acts input

def _run_stage(script, *args):
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("kind", ["bare file", "lm shards"])
def test_03_and_04_use_the_same_heldout_rows(kind, tiny, corpus, extract, tmp_path):
    """03 evaluates its SAE on the held-out rows (summary.json) and 04 reports on them (eval.json):
    through lib.activations both see the same rows, so the same SAE scores the same, to the bit.
    Choosing other rows (another split seed for a bare file) changes the numbers."""
    if kind == "bare file":
        from safetensors.torch import save_file
        from conftest import sparse_dictionary_data
        acts = tmp_path / "bare.safetensors"
        save_file({"activations": sparse_dictionary_data(n=3000, d=32, active=2)[0]}, str(acts))
    else:
        acts = tmp_path / "acts"
        run_extract(extract, "--model", tiny["llama"], "--layer", 1, "--text", corpus, "--out", acts,
                    "--ctx-len", 32, "--shard-mb", 0.05, "--holdout-frac", 0.2, "--quiet")
    sae = tmp_path / "sae"
    _run_stage("03_train_sae.py", "--acts", acts, "--out", sae, "--k", 4, "--expansion", 2, "--batch-size", 256,
               "--tokens", 256 * 20, "--quiet")
    _run_stage("04_evaluate.py", "--sae", sae, "--acts", acts, "--out", tmp_path / "eval.json", "--max-contexts", 2,
               "--quiet")
    s = json.loads((sae / "summary.json").read_text())["heldout"]
    e = json.loads((tmp_path / "eval.json").read_text())
    opened = A.open_acts(acts)
    assert s["rows"] == e["rows"]["heldout"] == len(opened.heldout_rows()) > 0
    assert s["ev"] == pytest.approx(e["reconstruction"]["explained_variance"], rel=1e-9, abs=1e-12)
    assert s["mse"] == pytest.approx(e["reconstruction"]["mse"], rel=1e-6)
    assert s["l0"] == pytest.approx(e["sparsity"]["l0"], rel=1e-9)
    if kind == "bare file":
        _run_stage("04_evaluate.py", "--sae", sae, "--acts", acts, "--out", tmp_path / "other.json",
                   "--split-seed", 1, "--quiet")
        other = json.loads((tmp_path / "other.json").read_text())
        assert other["reconstruction"]["mse"] != e["reconstruction"]["mse"]
