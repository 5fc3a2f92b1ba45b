"""Stage 02: read a trained model's activations at one site, for the SAEs to learn from.

Modular addition (--run, a 01_train_transformer.py run):

    python 02_extract_activations.py --run runs/modadd/seed42 --out runs/modadd/seed42/acts/resid_post.safetensors

All p^2 inputs [a, b, =] are run and the activation at the `=` position (the only position
the loss is read at; the answer c is never an input) is saved, one row per input, row index
a*p + b: a safetensors file with
  activations  float32 [p^2, width]
  a, b, c      int64 [p^2]   the inputs and the answer, for 04's ground-truth scoring
  train_mask   bool [p^2]    a seeded SAE-train / held-out split (--holdout-frac, default 0.1)
plus a JSON sidecar (same name, .json) with the source run, site, layer, shape, dtype, seed
and code version, and the site's ground truth measured over the full grid (lib/ground_truth.py):
<stem>.ground_truth.safetensors + .json, the value tables of the operands, the answer and every
other line of the grid, their variance shares, ranks and key frequencies; 04 and 05 score SAEs
against the rows of the material ones.

A language model (--model: any Hugging Face causal LM, GPT-2, Llama / SmolLM, Qwen2, ...):

    python scripts/fetch_corpus.py  # default offline corpus -> data/corpus
    python 02_extract_activations.py --model smollm2 --layer 15 --site resid_post \\
        --text data/corpus --tokens 1000000 --out runs/smollm2/acts/L15_resid_post
    torchrun --nproc_per_node 2 02_extract_activations.py --model smollm2 ...   # corpus split by rank

Documents (--text files, or --dataset through Hugging Face `datasets`) are tokenised and cut
into contexts of --ctx-len tokens led by BOS; a forward hook reads the site (lib/lm.py) and
the layers after it never run. The first --skip-first positions of every context (default 1:
the BOS / first token, whose residual norm is an outlier, often 10-100x the others, and would
dominate an SAE's MSE) are not saved as rows. Output, in the --out directory:
  shard-r{rank}-{k:05d}.safetensors  at most --shard-mb each: activations [rows, d], tokens
                                     [contexts, ctx_len], context_index, heldout (per context)
  manifest.json                      written last (a finished extraction): model hash, layer,
                                     site, dtype, split, per-shard row counts, timing
A context is held out from SAE training when a seeded hash of its index falls below
--holdout-frac (lib/activations.py is_heldout_context). A killed run continues with --resume
from the shards it has; under torchrun rank r takes the contexts i with i % world == r.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from lib import ground_truth, lm, modadd
from lib.activations import MANIFEST, is_heldout_context, read_tensors
from lib.common import (ROOT, ArgumentParser, Dist, check, file_sha256, load_tensor_metadata, provenance, run_main,
                        save_json, save_tensors)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    import argparse
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Give --run (modular addition) or --model (a language model); see the module docstring.")
    src = ap.add_argument_group("what to read")
    src.add_argument("--run", type=Path, default=None, help="a 01_train_transformer.py run directory (modular addition)")
    src.add_argument("--model", default=None, help="a language model: smollm2, a local save_pretrained directory, "
                                                   "a .gguf file, or a Hub name already in the local cache (gpt2)")
    src.add_argument("--gguf-file", default=None, help="LM: GGUF file name inside --model's directory")
    src.add_argument("--site", default="resid_post", help=f"modular addition: one of {', '.join(modadd.SITES)}; "
                                                          f"LM: one of {', '.join(lm.SITES)}")
    src.add_argument("--layer", type=int, default=None,
                     help="layer index, negative counts from the end (modular addition default: the last; LM: required)")
    out = ap.add_argument_group("where it goes")
    out.add_argument("--out", type=Path, required=True,
                     help="modular addition: the .safetensors file; LM: a directory (shards + manifest.json)")
    out.add_argument("--holdout-frac", type=float, default=None,
                     help="rows (modular addition, default 0.1) or contexts (LM, default 0.05) held out from SAE training")
    out.add_argument("--seed", type=int, default=0, help="seed of the SAE-train / held-out split")
    out.add_argument("--overwrite", action="store_true", help="replace a finished extraction")
    lmg = ap.add_argument_group("language models only")
    lmg.add_argument("--text", default=None, help=f"a .txt / .jsonl file or a directory of them "
                                                  f"(default {lm.DEFAULT_CORPUS.relative_to(ROOT)} without --dataset)")
    lmg.add_argument("--dataset", default=None, help="a Hugging Face dataset name or local path (needs `datasets`)")
    lmg.add_argument("--dataset-split", default="train")
    lmg.add_argument("--dataset-field", default="text")
    lmg.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    lmg.add_argument("--no-bos", action="store_true", help="do not lead each context with BOS")
    lmg.add_argument("--skip-first", type=int, default=1,
                     help="positions per context not saved (BOS/first-token norms are outliers); default 1")
    lmg.add_argument("--tokens", type=int, default=None, help="stop after this many saved rows (default: all the text)")
    lmg.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of the saved activations")
    lmg.add_argument("--shard-mb", type=float, default=256.0, help="upper bound on one shard's activations")
    lmg.add_argument("--batch-contexts", type=int, default=16, help="contexts per forward pass")
    lmg.add_argument("--no-early-stop", action="store_true", help="run the whole model (benchmarks)")
    lmg.add_argument("--device", default="cpu")
    lmg.add_argument("--resume", action="store_true", help="continue a killed extraction from its shards")
    lmg.add_argument("--stop-after-shards", type=int, default=None, help="exit after this many new shards (tests)")
    lmg.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if (args.run is None) == (args.model is None):
        ap.error("give --run RUN (a modular-addition model) or --model MODEL (a language model), not both")
    if args.run is not None:
        check(args.site in modadd.SITES, f"--site {args.site!r} is unknown; choose one of {', '.join(modadd.SITES)}")
        args.holdout_frac = 0.1 if args.holdout_frac is None else args.holdout_frac
        check(0.0 < args.holdout_frac < 1.0, f"--holdout-frac must be in (0, 1), got {args.holdout_frac}")
        check(args.out.suffix == ".safetensors", f"--out {args.out} must end in .safetensors")
        args.layer = -1 if args.layer is None else args.layer
        return args
    check(args.layer is not None, "--model needs --layer (the decoder layer to read)")
    check(args.site in lm.SITES, f"--site {args.site!r} is unknown; choose one of {', '.join(lm.SITES)}")
    args.holdout_frac = 0.05 if args.holdout_frac is None else args.holdout_frac
    check(args.ctx_len >= 2, "--ctx-len must be >= 2")
    check(0 <= args.skip_first < args.ctx_len, "--skip-first must be in [0, --ctx-len)")
    check(0.0 <= args.holdout_frac < 1.0, f"--holdout-frac must be in [0, 1), got {args.holdout_frac}")
    check(args.tokens is None or args.tokens > 0, "--tokens must be > 0")
    check(args.shard_mb > 0 and args.batch_contexts > 0, "--shard-mb and --batch-contexts must be > 0")
    if args.text is None and args.dataset is None:
        args.text = str(lm.DEFAULT_CORPUS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run is not None:
        return extract_modadd(args)
    check(not args.out.exists() or args.out.is_dir(), f"--out {args.out} exists and is not a directory")
    check(not (args.out / MANIFEST).exists() or args.overwrite,
          f"--out {args.out} already holds a finished extraction ({MANIFEST}); pass --overwrite to replace it")
    dist = Dist(args.device)
    try:
        extract_lm(args, dist)
    finally:
        dist.close()


# ----------------------------------------------------------------------------
# Modular addition: every input, the `=` position

def extract_modadd(args):
    check(args.run.is_dir(), f"--run {args.run} is not a directory (train one with 01_train_transformer.py)")
    model, run_cfg = modadd.load_run(args.run)
    cfg = model.cfg
    layer = args.layer if args.layer >= 0 else cfg.n_layers + args.layer
    check(0 <= layer < cfg.n_layers, f"--layer {args.layer} is out of range for a {cfg.n_layers}-layer model")
    check(not args.out.exists() or args.overwrite, f"--out {args.out} exists; pass --overwrite to replace it")

    tokens, labels = modadd.all_pairs(cfg.p)
    modadd.check_no_answer_leak(tokens, labels, cfg.p)
    acts = modadd.run_with_cache(model, tokens, args.site, layer).float()
    n = len(acts)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    train_mask = torch.ones(n, dtype=torch.bool)
    train_mask[perm[: int(round(args.holdout_frac * n))]] = False

    sidecar = {
        "source": "modadd", "run": str(args.run), "model_sha256": file_sha256(args.run / "model.safetensors"),
        "site": args.site, "layer": layer, "hook_name": f"blocks.{layer}.hook_{args.site}",
        "position": "= (last)", "shape": list(acts.shape), "dtype": "float32",
        "n_train": int(train_mask.sum()), "n_holdout": int((~train_mask).sum()),
        "split_seed": args.seed, "model_config": run_cfg["model"], **provenance(args, seed=args.seed),
    }
    save_tensors({"activations": acts, "a": tokens[:, 0], "b": tokens[:, 1], "c": labels,
                  "train_mask": train_mask}, args.out,
                 metadata={"site": args.site, "layer": str(layer), "code_version": sidecar["code_version"]})
    save_json(sidecar, args.out.with_suffix(".json"))
    if float(acts.double().var(0).sum()) > 0:              # (resid_pre at `=` is the same for every input)
        gt = ground_truth.fit_value_tables(acts, tokens[:, 0], tokens[:, 1], cfg.p)
        ground_truth.save_ground_truth(gt, ground_truth.ground_truth_path(args.out))
        shares = ", ".join(f"{n} {gt.info['tables'][n]['share']:.1%}" for n in gt.features) or "no material table"
    else:
        shares = "none (the site is constant over the inputs)"
    print(f"{args.out}: {tuple(acts.shape)} at {args.site} layer {layer} "
          f"({sidecar['n_train']} SAE-train / {sidecar['n_holdout']} held-out rows); ground truth: {shares}")


# ----------------------------------------------------------------------------
# Language models: contexts -> hooked forward -> shards -> manifest

def shard_name(rank: int, k: int) -> str:
    return f"shard-r{rank:02d}-{k:05d}.safetensors"


def existing_shards(out: Path, rank: int) -> list[Path]:
    return sorted(out.glob(f"shard-r{rank:02d}-*.safetensors"))


def extract_lm(args, dist: Dist):
    out = args.out
    spec = lm.resolve_model(args.model, args.gguf_file)
    text_fp = lm.text_fingerprint(args)
    t0 = time.perf_counter()
    model, tok = lm.load_model(spec, dist.device)
    nl = lm.n_layers(model)
    layer = args.layer if args.layer >= 0 else nl + args.layer
    check(0 <= layer < nl, f"--layer {args.layer} is out of range for a {nl}-layer model (0..{nl - 1})")
    hf_module, _ = lm.site_module(model, layer, args.site)
    d = int(model.config.hidden_size)
    bos = not args.no_bos and tok.bos_token_id is not None
    P = args.ctx_len - args.skip_first                      # saved rows per context
    max_ctx = None if args.tokens is None else math.ceil(args.tokens / P)
    contexts = lm.make_contexts(lm.iter_documents(args.text, args.dataset, args.dataset_split, args.dataset_field),
                                tok, args.ctx_len, max_ctx, bos=bos)
    maxpos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    check(maxpos is None or args.ctx_len <= maxpos, f"--ctx-len {args.ctx_len} exceeds the model's {maxpos} positions")
    load_s = time.perf_counter() - t0
    mine = torch.arange(dist.rank, len(contexts), dist.world_size)  # this rank's contexts
    per_shard = max(1, int(args.shard_mb * 2**20 // (P * d * torch.tensor([], dtype=DTYPES[args.dtype]).element_size())))
    fingerprint = hashlib.sha256(json.dumps({
        "model": spec["sha256"], "layer": layer, "site": args.site, "ctx": args.ctx_len, "bos": bos,
        "skip": args.skip_first, "dtype": args.dtype, "text": text_fp, "holdout": args.holdout_frac,
        "seed": args.seed, "world": dist.world_size, "per_shard": per_shard}, sort_keys=True).encode()).hexdigest()[:16]
    done, k = resume_point(args, out, dist, fingerprint)

    # --- the loop: forward to the site, buffer, write a shard every per_shard contexts -------
    dtype, stop = DTYPES[args.dtype], not args.no_early_stop
    new_shards, t_fwd, t_write, rows_new = 0, 0.0, 0.0, 0
    t_loop = time.perf_counter()
    pos = done
    while pos < len(mine):
        if args.stop_after_shards is not None and new_shards >= args.stop_after_shards:
            if not args.quiet:
                print(f"stopped after {new_shards} new shard(s) (--stop-after-shards)", file=sys.stderr)
            return
        idx = mine[pos: pos + per_shard]
        t1 = time.perf_counter()
        acts = forward_contexts(args, model, contexts[idx], layer, d, dtype, stop, dist.device)
        t2 = time.perf_counter()
        save_tensors({"activations": acts, "tokens": contexts[idx].to(torch.int32),
                      "context_index": idx.clone(), "heldout": is_heldout_context(idx, args.holdout_frac, args.seed)},
                     out / shard_name(dist.rank, k),
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

    dist.barrier()                                          # the manifest: rank 0, after every rank
    if dist.master:
        timing = {"load_s": load_s, "loop_s": loop_s, "forward_s": t_fwd, "write_s": t_write,
                  "rows_per_s_this_run": rows_new / max(1e-9, loop_s)}
        write_manifest(args, dist, spec, model, tok, layer, hf_module, d, bos, P, len(contexts), text_fp,
                       per_shard, fingerprint, timing)


def forward_contexts(args, model, contexts: torch.Tensor, layer: int, d: int, dtype, stop: bool, device) -> torch.Tensor:
    """The site's activations [n_contexts * P, d] of these contexts [n_contexts, ctx_len], in
    batches of --batch-contexts, without the first --skip-first positions of each."""
    rows = []
    for b in range(0, len(contexts), args.batch_contexts):
        x = lm.hooked_forward(model, contexts[b: b + args.batch_contexts].to(device), layer, args.site, stop=stop)
        rows.append(x[:, args.skip_first:].reshape(-1, d).to(dtype).cpu())
    return torch.cat(rows)


def resume_point(args, out: Path, dist: Dist, fingerprint: str) -> tuple[int, int]:
    """(contexts already done, shards already written) by this rank; refuses a mismatched
    resume and clears an old extraction under --overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".shard-r{dist.rank:02d}-*.tmp*"):
        tmp.unlink(missing_ok=True)                       # half-written shard of a killed run
    have = existing_shards(out, dist.rank)
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
        check(f.name == shard_name(dist.rank, k), f"--resume: shard {f.name} is out of sequence in {out}")
        check(meta.get("fingerprint") == fingerprint,
              f"--resume: {f.name} was written with other flags, model or text; pass --overwrite to start over")
        check(int(meta["first_local"]) == done, f"--resume: shard {f.name} does not continue the one before it")
        done += int(meta["n_contexts"])
    if done and not args.quiet:
        print(f"resuming after {done} contexts in {len(have)} shard(s)", file=sys.stderr)
    return done, len(have)


def write_manifest(args, dist, spec, model, tok, layer, hf_module, d, bos, P, n_ctx, text_fp, per_shard,
                   fingerprint, timing) -> None:
    """manifest.json over every rank's shards: a finished extraction."""
    out = args.out
    shards, n_train_rows, n_held_rows = [], 0, 0
    for r in range(dist.world_size):
        for f in existing_shards(out, r):
            t = read_tensors(f, ("heldout", "context_index"))
            held = int(t["heldout"].sum())
            cr = len(t["heldout"])
            shards.append({"file": f.name, "rank": r, "contexts": cr, "rows": cr * P,
                           "heldout_contexts": held, "train_rows": (cr - held) * P,
                           "heldout_rows": held * P, "first_context": int(t["context_index"][0]),
                           "bytes": f.stat().st_size})
            n_train_rows += (cr - held) * P
            n_held_rows += held * P
    total_rows = n_train_rows + n_held_rows
    manifest = {
        "format": "sae-lm-shards/1", "source": "hf-causal-lm",
        "model": spec["name"], "model_path": spec["path"], "gguf_file": spec["gguf_file"],
        "model_sha256": spec["sha256"], "model_name": spec["name"], "architecture": model.config.model_type,
        "n_layers": lm.n_layers(model), "d_model": d, "d_in": d, "layer": layer, "site": args.site,
        "hf_module": hf_module, "hook_name": f"blocks.{layer}.hook_{args.site}", "dtype": args.dtype,
        "context_length": args.ctx_len, "bos": bos, "bos_token_id": tok.bos_token_id if bos else None,
        "eos_token_id": tok.eos_token_id, "skip_first": args.skip_first, "positions_per_context": P,
        "vocab_size": int(model.config.vocab_size),
        "n_contexts": n_ctx, "token_count": total_rows, "tokens_processed": n_ctx * args.ctx_len,
        "split": {"rule": "context i is held out when lib.activations.is_heldout_context(i, holdout_frac, seed)",
                  "holdout_frac": args.holdout_frac, "seed": args.seed,
                  "n_train_rows": n_train_rows, "n_heldout_rows": n_held_rows},
        "text": text_fp, "world_size": dist.world_size, "contexts_per_shard": per_shard,
        "fingerprint": fingerprint, "shards": shards, "timing": timing,
        **provenance(args, seed=args.seed),
    }
    save_json(manifest, out / MANIFEST)
    if not args.quiet:
        print(f"{out}: {total_rows} rows x {d} ({args.dtype}) at {args.site} layer {layer} of {spec['name']} "
              f"in {len(shards)} shard(s); {n_train_rows} SAE-train / {n_held_rows} held-out rows")


if __name__ == "__main__":
    run_main(main)
