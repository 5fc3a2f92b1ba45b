"""Extraction speed: tokens/s of a plain full forward pass (logits) beside hooked extraction
that stops after the target layer, in the same process on the same contexts.

    .venv/bin/python bench/bench_extract.py                       # SmolLM2-135M, layer 15 of 30
    .venv/bin/python bench/bench_extract.py --model gpt2 --layer 6

Rows:
  full forward           model(input_ids).logits, no hooks (the baseline)
  full forward + hook    the same with the capture hook, no early stop (hook overhead)
  early stop (hook)      lm.hooked_forward(stop=True): layers after the target never run
  02 pipeline            02_extract_activations.py --model ... end to end minus model loading
                         and tokenisation: forward + cast + shard writes (from its manifest timing)
Goals (issue): early stop >= 1.3x the full forward at a mid-depth layer; the pipeline within
10% of the bare early-stopped forward (hooks + writing).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib import lm  # noqa: E402
from lib.common import load_json, load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use

EXTRACT = load_stage("02_extract_activations.py")


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--text", default=str(lm.DEFAULT_CORPUS))
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--batch-contexts", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = lm.resolve_model(a.model, a.gguf_file)
    model, tok = lm.load_model(spec)
    nl = lm.n_layers(model)
    layer = nl // 2 if a.layer is None else a.layer
    ctx = lm.make_contexts(lm.iter_documents(a.text), tok, a.ctx_len, a.contexts)
    n_tok = ctx.numel()
    batches = [ctx[i: i + a.batch_contexts] for i in range(0, len(ctx), a.batch_contexts)]
    _, mod = lm.site_module(model, layer, a.site)

    @torch.no_grad()
    def full():
        for b in batches:
            model(input_ids=b, use_cache=False).logits

    def full_hooked():
        for b in batches:
            lm.hooked_forward(model, b, layer, a.site, stop=False)

    def early():
        for b in batches:
            lm.hooked_forward(model, b, layer, a.site, stop=True)

    # the 02 pipeline on the same contexts, reusing the loaded model (timed by its manifest:
    # forward + cast + shard writes, without model loading and tokenisation)
    def pipeline():
        with tempfile.TemporaryDirectory() as d:
            EXTRACT.main(["--model", a.model, *(["--gguf-file", a.gguf_file] if a.gguf_file else []),
                             "--layer", str(layer), "--site", a.site, "--text", a.text, "--out", f"{d}/acts",
                             "--ctx-len", str(a.ctx_len), "--skip-first", "1",
                             "--tokens", str(a.contexts * (a.ctx_len - 1)),
                             "--batch-contexts", str(a.batch_contexts), "--shard-mb", "8", "--quiet"])
            m = load_json(Path(d) / "acts" / "manifest.json")
            assert m["n_contexts"] == a.contexts, m["n_contexts"]
            return m["timing"]["loop_s"]

    orig = lm.load_model
    lm.load_model = lambda *_a, **_k: (model, tok)
    try:
        full()                                           # warm-up
        # interleaved repetitions, so a load change on a shared machine hits every path alike
        fns = {"full forward": full, "full forward + hook": full_hooked, "early stop (hook)": early}
        ts = {k: [] for k in [*fns, "02 pipeline (fwd+write)"]}
        for _ in range(a.reps):
            for k, fn in fns.items():
                ts[k].append(timed(fn, 1))
            ts["02 pipeline (fwd+write)"].append(pipeline())
    finally:
        lm.load_model = orig
    rows = {k: statistics.median(v) for k, v in ts.items()}

    base = rows["full forward"]
    print(f"model {spec['name']} ({model.config.model_type}, {nl} layers, d {model.config.hidden_size}), "
          f"layer {layer} {a.site}, {a.contexts} x {a.ctx_len} tokens, batch {a.batch_contexts}, "
          f"torch threads {torch.get_num_threads()}, median of {a.reps}")
    print(f"| {'path':26s} | {'tokens/s':>9s} | {'vs full forward':>15s} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 17}|")
    for k, v in rows.items():
        print(f"| {k:26s} | {n_tok / v:9.0f} | {base / v:14.2f}x |")
    over_hook = rows["full forward + hook"] / base - 1
    over_pipe = rows["02 pipeline (fwd+write)"] / rows["early stop (hook)"] - 1
    print(f"hook overhead on the full forward: {100 * over_hook:+.1f}%; "
          f"writing + casting overhead over the bare early-stopped forward: {100 * over_pipe:+.1f}%")


if __name__ == "__main__":
    main()
