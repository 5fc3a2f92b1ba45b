"""Stage 02: read a trained model's activations at one site, for the SAEs to learn from.

    python 02_extract_activations.py --run runs/modadd/seed42 --out runs/modadd/seed42/acts/resid_post_L0.safetensors

Modular addition: all p^2 inputs [a, b, =] are run and the activation at the
`=` position (the only position the loss is read at; the answer c is never an
input) is saved, one row per input, row index a*p + b.

Output: a safetensors file with
  activations  float32 [p^2, width]
  a, b, c      int64 [p^2]   the inputs and the answer, for 04's Fourier scoring
  train_mask   bool [p^2]    a seeded SAE-train / held-out split (--holdout-frac)
plus a JSON sidecar (same name, .json) with the source run, site, layer, shape,
dtype, seed and code version.

Language models (any Hugging Face causal LM: GPT-2, Llama / SmolLM, Qwen2, ...): given
--model, this script hands over to lm.py (see its docstring and `--model X --help`):

    python lm.py fetch-corpus      # default offline corpus -> data/corpus
    python 02_extract_activations.py --model smollm2 --layer 15 --site resid_post \
        --text data/corpus --tokens 1000000 --out runs/smollm2/acts_L15_resid_post
    python 02_extract_activations.py --model gpt2 --layer 6 --text data/corpus --out runs/gpt2/acts
    torchrun --nproc_per_node 2 02_extract_activations.py --model smollm2 ...   # corpus split by rank

It writes numbered safetensors shards plus manifest.json to the --out directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import modadd
from common import (ArgumentParser, check, file_sha256, load_json, provenance, run_main, save_json,
                    save_tensors)


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0] + " (LM mode: --model NAME, see lm.py)")
    ap.add_argument("--run", type=Path, required=True, help="a 01_train_transformer.py run directory")
    ap.add_argument("--site", default="resid_post", help=f"one of {', '.join(modadd.SITES)}")
    ap.add_argument("--layer", type=int, default=-1, help="layer index (default: the last)")
    ap.add_argument("--out", type=Path, required=True, help="activations .safetensors file to write")
    ap.add_argument("--holdout-frac", type=float, default=0.1, help="rows held out from SAE training")
    ap.add_argument("--seed", type=int, default=0, help="seed of the SAE-train / held-out split")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    check(args.site in modadd.SITES, f"--site {args.site!r} is unknown; choose one of {', '.join(modadd.SITES)}")
    check(0.0 < args.holdout_frac < 1.0, f"--holdout-frac must be in (0, 1), got {args.holdout_frac}")
    check(args.out.suffix == ".safetensors", f"--out {args.out} must end in .safetensors")
    return args


def main(argv=None):
    raw = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--model" or a.startswith("--model=") for a in raw):
        import lm                                          # Hugging Face LM mode
        return lm.extract_main(raw)
    args = parse_args(argv)
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
    print(f"{args.out}: {tuple(acts.shape)} at {args.site} layer {layer} "
          f"({sidecar['n_train']} SAE-train / {sidecar['n_holdout']} held-out rows)")


if __name__ == "__main__":
    run_main(main)
