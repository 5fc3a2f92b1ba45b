"""Our TopK training step against SAELens's own, same shape, same rows, same threads, one run.

    .venv/bin/python bench/bench_vs_saelens.py                  # 128 -> 1024, k 32, batch 4096
    .venv/bin/python bench/bench_vs_saelens.py --d-sae 256 --k 2 --batch-size 1024

SAELens runs in its own environment, .venv-saelens/ (the real sae-lens, pinned by
tests/saelens-constraints.txt, built by `bash tests/setup_saelens_env.sh`, same torch build as
.venv): this script writes the rows to a temporary safetensors file and calls itself there
with --side saelens. Each side times what its trainer does per batch:

  * ours (03_train_sae.py): sae.SAE forward (the sparse TopK path, lib/kernels.py), backward,
    decoder-gradient projection, fused Adam, decoder renormalisation;
  * SAELens (SAETrainer._train_step, sae-lens 6): TopKTrainingSAE.training_forward_pass,
    its firing statistics, backward, clip_grad_norm_(1.0), Adam, zero_grad; as shipped
    (dense code) and with use_sparse_activations=True (its sparse decode; there with
    rescale_acts_by_decoder_norm=False, as with its default True the backward fails on a CPU:
    "Could not run 'aten::view' with arguments from the 'SparseCPU' backend", sae-lens 6.54).

Each with and without AuxK over a quarter of the latents marked dead (the same latents on
both sides; each side's own AuxK: ours normalised by the error variance as Gao et al.,
SAELens's not). The sides alternate over --rounds rounds, a fresh SAELens process per
round, so that load elsewhere on the machine hits both alike; the median step is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness import add_shape_args, dead_latents, make_rows, timed  # noqa: E402
SAELENS_PYTHON = ROOT / ".venv-saelens" / "bin" / "python"


def ours(x, dead, args) -> dict:
    from bench.bench_sae import our_step          # 03's step: fused Adam, decoder projection
    from sae import SAE
    res = {}
    for name, mask in (("base", None), ("auxk", dead)):
        sae = SAE(x.shape[1], args.d_sae, k=args.k, arch="topk", generator=torch.Generator().manual_seed(0))
        sae.init_b_dec_(x[:2048])
        step = our_step(sae, 3e-4, dead_mask=mask)
        res[name] = timed(lambda: step(x), args.steps, args.warmup)
    return res


def saelens(x, dead, args) -> dict:
    import sae_lens
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    res = {"version": sae_lens.__version__}
    for sparse in (False, True):
        for name, mask in (("base", None), ("auxk", dead)):
            torch.manual_seed(0)
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32",
                                                        device="cpu", use_sparse_activations=sparse,
                                                        rescale_acts_by_decoder_norm=not sparse))
            sae.train()
            opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
            since_fired = torch.zeros(args.d_sae)
            n = [0]

            def step():                     # SAETrainer._train_step, less the lr scheduler and W&B
                out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                               n_training_steps=n[0], is_logging_step=False))
                with torch.no_grad():
                    did_fire = out.feature_acts.bool().float().sum(-2).bool()
                    if did_fire.is_sparse:
                        did_fire = did_fire.to_dense()
                    since_fired.add_(1)
                    since_fired[did_fire] = 0
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                n[0] += 1
            res[f"{'sparse' if sparse else 'dense'}_{name}"] = timed(step, args.steps, args.warmup)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(ap, steps=10)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each side once per round (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    ap.add_argument("--side", choices=["both", "saelens"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dead = dead_latents(args.d_sae, args.dead_frac)
    if args.side == "saelens":                       # inside .venv-saelens: one round, JSON out
        print(json.dumps(saelens(load_file(args.rows)["x"], dead, args)))
        return 0
    if not SAELENS_PYTHON.exists():
        print(f"error: {SAELENS_PYTHON} not found: build it with `bash tests/setup_saelens_env.sh`", file=sys.stderr)
        return 2
    x = make_rows(args.batch_size, args.d_in, args.d_sae)
    mine, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        rows = str(Path(tmp) / "x.safetensors")
        save_file({"x": x.contiguous()}, rows)
        cmd = [str(SAELENS_PYTHON), __file__, "--side", "saelens", "--rows", rows,
               *[f"--{a}={getattr(args, a.replace('-', '_'))}" for a in
                 ("d-in", "d-sae", "k", "batch-size", "dead-frac", "steps", "warmup", "threads")]]
        for _ in range(args.rounds):
            mine.append(ours(x, dead, args))
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                print(f"error: the SAELens side failed:\n{p.stderr.strip()[-2000:]}", file=sys.stderr)
                return 1
            theirs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    med = lambda runs, key: statistics.median(r[key] for r in runs)          # noqa: E731
    B = args.batch_size
    n_dead = int(dead.sum())
    print(f"TopK training step, d_in {args.d_in} -> d_sae {args.d_sae}, k {args.k}, batch {B}, fp32, "
          f"{args.threads} CPU threads, torch {torch.__version__}, sae-lens {theirs[0]['version']}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'step':44s} {'tokens/s':>10s} {'ours x':>7s} {'AuxK cost':>10s}")
    ref = {"base": B / med(mine, "base"), "auxk": B / med(mine, "auxk")}
    lines = [("ours (03: sparse TopK path)", med(mine, "base"), med(mine, "auxk")),
             ("SAELens TopKTrainingSAE (as shipped)", med(theirs, "dense_base"), med(theirs, "dense_auxk")),
             ("SAELens, use_sparse_activations=True", med(theirs, "sparse_base"), med(theirs, "sparse_auxk"))]
    for name, base, auxk in lines:
        cost = 100 * (1 - base / auxk)
        print(f"{name:44s} {B / base:10,.0f} {ref['base'] * base / B:7.2f} {'':>10s}")
        print(f"{'  + AuxK (' + str(n_dead) + ' dead)':44s} {B / auxk:10,.0f} {ref['auxk'] * auxk / B:7.2f} {cost:9.1f}%")
    print("ours x = our tokens/s over that row's (AuxK rows: ours with AuxK over theirs with AuxK); "
          "AuxK cost = the share of the step's speed AuxK takes, 1 - (tokens/s with) / (tokens/s without)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
