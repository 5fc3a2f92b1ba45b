"""Stage 03: train a sparse autoencoder (sae.py) on activations.

    python 03_train_sae.py --acts runs/acts --out runs/sae_topk --arch topk
    torchrun --nproc_per_node 2 03_train_sae.py --acts runs/acts --out runs/sae_topk   # data parallel

--acts is what 02 writes (DIR/activations.safetensors, or the file itself) or any
safetensors file with a 2-D float tensor `activations` [N, d_in]. If it holds a
bool `train_mask` [N], the SAE trains on the True rows and the rest are held out;
without one a seeded 10% is held out (--split-seed, so every SAE seed shares it).

A directory with a manifest.json (02 --model: a language model's sharded activations)
is streamed: shards are read a window at a time through a shuffle buffer of about
--buffer-rows rows (lib/activations.py ShardStream), so memory does not grow with the data set. Only
the SAE-train contexts of the manifest's split are trained on; the held-out rows
(at most --heldout-rows) are evaluated. The input scale is estimated on a sample of
--scale-rows train rows. Default length there: one pass over the train rows.

Writes to --out:
    sae_weights.safetensors, cfg.json   the SAE, SAELens 6 layout (sae.SAE.load reads it)
    metrics.jsonl                       every --log-every steps: loss terms, MSE, EV (metrics.py),
                                        L0, dead fraction, tokens/s, held-out EV and L0
    checkpoint.safetensors              every --ckpt-every steps: weights, Adam state, step,
                                        RNG, dead-latent counters, lambda; --resume continues
                                        from it and ends bit-identical (CPU) to an unbroken run
    summary.json                        written last (a run is finished when it exists):
                                        config, seed, code version, held-out metrics

Defaults follow the modular-addition study: d_sae = 8 d_in, k 32, batch 4096, Adam
lr 3e-4, warmed up over the first 5% of steps and decayed linearly to 0 over the last
20% (Conerly et al. 2024). Length: --tokens, by default the larger of 2000 batches and
100 passes over the SAE-train rows. Inputs are scaled to unit mean squared norm
(Lieberum et al. 2024) unless --no-normalize; the scale is folded into the saved
weights, so the saved SAE takes and returns activations in their own units.
--k is the L0 of every architecture: exact per row (topk), on average (batchtopk), or
the target that lambda is steered to (relu, jumprelu: lambda grows or shrinks by up to
2% a step with log(L0/k)) unless --l1-coeff / --l0-coeff fix lambda. Dead latents
(AuxK's, and the logged dead fraction) have not fired for --dead-tokens: by default
10M tokens as in Gao et al. 2024, but at most one pass over the SAE-train rows.

Under torchrun every process takes its slice of the same global batch, gradients are
averaged with one all-reduce per step (gloo on CPU, nccl on GPU), and the dead-latent
counters, AuxK normaliser, BatchTopK threshold and lambda use global statistics, so N
processes follow one process at the same --batch-size. (BatchTopK picks the top
k * batch within each process's slice, as SAELens does.)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from lib.activations import Acts, encode_chunks, open_acts
from lib.common import (ArgumentParser, Dist, UserError, append_jsonl, check, load_tensor_metadata, load_tensors,
                        prepare_out_dir, provenance, run_main, save_json, save_tensors, seed_everything)
from lib.metrics import explained_variance, l0 as mean_l0
from sae import ARCHS, SAE

FINAL = "summary.json"
CKPT = "checkpoint.safetensors"
OUTPUTS = ("sae_weights.safetensors", "cfg.json", "metrics.jsonl", CKPT, FINAL)
# flags that may differ between a run and its --resume
# (--acts may be spelled differently: the file itself is checked by its hash)
RESUME_FREE = {"acts", "out", "resume", "overwrite", "quiet", "wandb", "stop_after_steps", "threads",
               "device", "log_every", "ckpt_every", "buffer_rows"}


def get_args(argv=None):
    p = ArgumentParser(description="Train a sparse autoencoder (ReLU, TopK, BatchTopK, JumpReLU) on activations.")
    p.add_argument("--acts", required=True, help="activations.safetensors, or a directory holding it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--arch", choices=ARCHS, default="topk")
    p.add_argument("--k", type=int, nargs="+", default=[32],
                   help="active latents per row: exact (topk), on average (batchtopk), the L0 that lambda is "
                        "steered to (relu, jumprelu; unless --l1-coeff / --l0-coeff fix lambda); several values "
                        "train one SAE each, over the same batches")
    p.add_argument("--expansion", type=float, default=8.0, help="d_sae = expansion * d_in")
    p.add_argument("--d-sae", type=int, nargs="+", default=None,
                   help="number of latents (overrides --expansion); several values train one SAE each")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=4096, help="global batch (split over processes)")
    p.add_argument("--tokens", type=int, default=None,
                   help="training rows to consume (default: max(2000 batches, 100 passes over the train rows))")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="SAE seed (init); several seeds train one SAE each in one pass over the data, "
                        "in OUT/seed<S>/ (the batch order follows the first seed)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 10%% hold-out when the file has no train_mask")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="lr warmup, fraction of steps")
    p.add_argument("--decay-frac", type=float, default=0.2, help="final linear lr decay to 0, fraction of steps")
    p.add_argument("--init", choices=("tied", "orthogonal"), default="tied",
                   help="random unit decoder rows with W_enc = W_dec^T, or a semi-orthogonal W_dec")
    p.add_argument("--no-normalize", action="store_true", help="do not scale inputs to unit mean squared norm")
    p.add_argument("--l1-coeff", type=float, default=None,
                   help="relu: fixed L1 coefficient (default: steered so that L0 approaches --k)")
    p.add_argument("--l1-warmup-frac", type=float, default=0.05, help="relu: L1 coefficient ramps up from 0")
    p.add_argument("--l0-coeff", type=float, default=None,
                   help="jumprelu: fixed lambda; default: lambda is steered so that L0 approaches --k")
    p.add_argument("--bandwidth", type=float, default=1e-3, help="jumprelu: STE kernel width eps")
    p.add_argument("--init-threshold", type=float, default=1e-3, help="jumprelu: initial theta")
    p.add_argument("--k-aux", type=int, default=None, help="AuxK latents (default d_in/2)")
    p.add_argument("--auxk-coeff", type=float, default=1 / 32)
    p.add_argument("--no-auxk", action="store_true", help="topk/batchtopk without the AuxK loss")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="a latent is dead after this many tokens without firing (default min(10M, train rows))")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--eval-rows", type=int, default=8192, help="held-out rows evaluated at each log step")
    p.add_argument("--buffer-rows", type=int, default=262144,
                   help="sharded --acts: rows held in the shuffle buffer (bounds memory)")
    p.add_argument("--heldout-rows", type=int, default=65536, help="sharded --acts: held-out rows kept for evaluation")
    p.add_argument("--scale-rows", type=int, default=65536,
                   help="sharded --acts: train rows sampled for the input scale and b_dec init")
    p.add_argument("--hook-name", default=None, help="metadata (default: from the activations' JSON sidecar)")
    p.add_argument("--model-name", default=None, help="metadata (default: from the activations' JSON sidecar)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished run in --out")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and exit after this many steps, as if killed (tests)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores / processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")
    args = p.parse_args(argv)
    check(args.lr > 0 and math.isfinite(args.lr), f"--lr must be > 0 (got {args.lr})")
    check(args.batch_size > 0, f"--batch-size must be > 0 (got {args.batch_size})")
    check(all(k > 0 for k in args.k), f"--k must be > 0 (got {' '.join(map(str, args.k))})")
    check(args.expansion > 0, f"--expansion must be > 0 (got {args.expansion})")
    check(args.d_sae is None or all(d > 0 for d in args.d_sae),
          f"--d-sae must be > 0 (got {' '.join(map(str, args.d_sae or []))})")
    for name in ("seed", "k", "d_sae"):
        v = getattr(args, name) or []
        check(len(set(v)) == len(v), f"--{name.replace('_', '-')} lists a value twice")
    check(args.tokens is None or args.tokens > 0, f"--tokens must be > 0 (got {args.tokens})")
    check(0 <= args.warmup_frac < 1 and 0 <= args.decay_frac <= 1 and args.warmup_frac + args.decay_frac <= 1,
          "--warmup-frac and --decay-frac must lie in [0, 1] and sum to at most 1")
    check(0 <= args.l1_warmup_frac <= 1, "--l1-warmup-frac must lie in [0, 1]")
    for name in ("l1_coeff", "l0_coeff"):
        v = getattr(args, name)
        check(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    check(args.bandwidth > 0 and args.init_threshold >= 0, "--bandwidth must be > 0 and --init-threshold >= 0")
    check(args.k_aux is None or args.k_aux > 0, f"--k-aux must be > 0 (got {args.k_aux})")
    check(args.dead_tokens is None or args.dead_tokens > 0, f"--dead-tokens must be > 0 (got {args.dead_tokens})")
    check(args.log_every > 0 and args.ckpt_every > 0 and args.eval_rows > 0,
          "--log-every, --ckpt-every and --eval-rows must be > 0")
    check(args.stop_after_steps is None or args.stop_after_steps > 0, "--stop-after-steps must be > 0")
    check(args.threads is None or args.threads > 0, "--threads must be > 0")
    check(args.buffer_rows > 0 and args.heldout_rows > 0 and args.scale_rows > 0,
          "--buffer-rows, --heldout-rows and --scale-rows must be > 0")
    return args


# ----------------------------------------------------------------------------
# Data: every check happens here, before --out is touched.

def load_data(args) -> tuple[Acts, torch.Tensor, torch.Tensor]:
    """The opened activations, the SAE-train rows the input scale and b_dec come from (all of
    a file's; a sample of --scale-rows from shards) and the held-out rows."""
    acts = open_acts(args.acts, args.split_seed)
    if acts.kind == "file":
        return acts, acts.train_rows(), acts.heldout_rows()
    sample = acts.train_sample(args.scale_rows, seed=args.split_seed)
    held = acts.heldout_rows(args.heldout_rows)
    for name, x in (("train", sample), ("held-out", held)):
        bad = ~torch.isfinite(x).all(1)
        check(not bad.any(), f"--acts {acts.path}: {int(bad.sum())} sampled {name} row(s) hold NaN/inf")
    return acts, sample, held


def lr_at(step: int, steps: int, lr: float, warmup: int, decay: int) -> float:
    """Linear warmup, constant, then linear decay to 0 over the last `decay` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay and step >= steps - decay:
        return lr * (steps - step) / decay
    return lr


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, chunk: int = 8192) -> dict:
    """EV, MSE, L0 and never-fired fraction of sae's inference code on rows x."""
    if len(x) == 0:
        return {}
    x_hats, l0_sum, fired, sq = [], 0.0, torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device), 0.0
    for xb, f, xh in encode_chunks(sae, x, chunk):
        x_hats.append(xh)
        l0_sum += mean_l0(f) * len(xb)
        fired |= (f > 0).any(0)
        sq += float((xh - xb).double().pow(2).sum())
    x_hat = torch.cat(x_hats)
    return {"ev": explained_variance(x, x_hat), "mse": sq / len(x), "l0": l0_sum / len(x),
            "never_fired_frac": float((~fired).float().mean()), "rows": len(x)}


def log_record(done: int, batch_size: int, lr: float, out, terms: torch.Tensor, x: torch.Tensor, l0: float,
               dead_frac: float, tokens_per_s: float, lam: float, sae: SAE, heldout: dict) -> dict:
    """One line of metrics.jsonl: loss terms (averaged over processes), EV of this batch
    (metrics.py), L0, dead fraction, speed, lambda / BatchTopK threshold, held-out EV and L0."""
    rec = {"step": done, "tokens": done * batch_size, "lr": lr, "loss": float(terms[0])}
    rec.update({k: float(v) for k, v in zip(out.losses, terms[1:])})       # mse, l1/l0/auxk_loss
    rec["ev"] = explained_variance(x, out.x_hat.detach())
    rec["l0"] = l0
    rec["dead_frac"] = dead_frac
    rec["tokens_per_s"] = tokens_per_s
    if sae.arch in ("relu", "jumprelu"):
        rec["lambda"] = lam
    if sae.arch == "batchtopk":
        rec["threshold"] = float(sae.threshold[0])
    if heldout:
        rec["heldout_ev"], rec["heldout_l0"] = heldout["ev"], heldout["l0"]
    return rec


# ----------------------------------------------------------------------------
# Checkpoints and resume: safetensors tensors + JSON in the header; no pickle.

def save_checkpoint(path: Path, sae: SAE, opt, step: int, since_fired, lam: float, meta: dict) -> None:
    t = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            t[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["since_fired"] = since_fired
    t["rng.torch"] = torch.get_rng_state()
    save_tensors(t, path, metadata={"state": json.dumps({"step": step, "lam": lam, **meta})})


def checkpoint_state(path: Path) -> dict:
    """The JSON part of a checkpoint: step, lambda, config, data identity."""
    try:
        return json.loads(load_tensor_metadata(path)["state"])
    except Exception:                                      # no header, not JSON, not ours
        raise UserError(f"checkpoint {path} has no readable training state; pass --overwrite to start over")


def load_checkpoint(path: Path, sae: SAE, opt) -> tuple[int, torch.Tensor, float]:
    t = load_tensors(path, what="checkpoint")
    meta = checkpoint_state(path)
    sd = {k[4:]: v for k, v in t.items() if k.startswith("sae.")}
    try:
        sae.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit this SAE ({str(e).splitlines()[-1].strip()[:160]})")
    params = opt.param_groups[0]["params"]
    state = {}
    for i, p in enumerate(params):
        s = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"opt.{i}.")}
        for k, v in s.items():              # the parameter's own memory layout, as a fresh run has
            if v.shape == p.shape:
                s[k] = torch.empty_like(p).copy_(v)
        if s:
            state[i] = s
    opt.load_state_dict({"state": state, "param_groups": [{**opt.param_groups[0], "params": list(range(len(params)))}]})
    torch.set_rng_state(t["rng.torch"])
    return int(meta["step"]), t["since_fired"], float(meta["lam"])


def will_resume(args, out: Path, dist: Dist) -> bool:
    """--resume continues an unfinished run; anything else starts from step 0, and refuses to
    replace a run (finished or not) without --overwrite."""
    ckpt = out / CKPT
    if args.resume and ckpt.is_file() and not (out / FINAL).exists():
        return True
    if args.resume and dist.master and not (out / FINAL).exists():
        print(f"note: no {CKPT} in --out {out}; starting from step 0", file=sys.stderr)
    check(not ckpt.is_file() or args.overwrite or (out / FINAL).exists(),
          f"--out {out} holds an unfinished run ({CKPT}); pass --resume to continue it or --overwrite to start over")
    return False


def check_same_run(ckpt_path: Path, ckpt_meta: dict, acts: Acts) -> None:
    """A resumed run must be the run that was checkpointed: same d_in, flags and data."""
    meta = checkpoint_state(ckpt_path)
    check(meta.get("d_in") == acts.d_in, f"--resume: mismatched d_in: the checkpoint was trained on "
                                         f"d_in={meta.get('d_in')}, --acts has d_in={acts.d_in}")
    diff = [k for k, v in ckpt_meta["config"].items() if meta.get("config", {}).get(k) != v]
    check(not diff, f"--resume: flags differ from the checkpointed run: "
                    f"{', '.join('--' + k.replace('_', '-') for k in diff)}")
    check(meta.get("acts_sha256_1mb") == acts.sha256_1mb,
          f"--resume: --acts {acts.path} is not the file the run started on")


def tidy_out_dir(out: Path, resuming: bool, start: int) -> None:
    """Remove half-written files of a killed run; a fresh run clears an old one (--overwrite);
    a resumed run keeps its metrics up to the checkpoint."""
    for name in OUTPUTS:
        for tmp in out.glob(f".{name}.tmp*"):
            tmp.unlink(missing_ok=True)
    if not resuming:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        return
    mpath = out / "metrics.jsonl"
    if mpath.exists():
        keep = [ln for ln in mpath.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        tmp = out / ".metrics.jsonl.tmp"
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, mpath)


# ----------------------------------------------------------------------------

class Run:
    """One SAE being trained, and everything its checkpoint holds. Several runs share one pass
    over the data: each batch is read once and every run takes a step on it."""

    def __init__(self, name: str, out: Path, seed: int, k: int, d_sae: int):
        self.name, self.out, self.seed, self.k, self.d_sae = name, out, seed, k, d_sae
        self.resuming, self.start = False, 0
        self.sae: SAE | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.since_fired: torch.Tensor | None = None    # [d_sae] tokens since each latent last fired
        self.lam, self.steer = 0.0, False               # relu / jumprelu: lambda, fixed or steered toward L0 = k
        self.l0: float | None = None                    # the last step's L0 over the global batch
        self.ckpt_meta: dict = {}


def plan_runs(args, d_in: int) -> list[Run]:
    """One run per (k, d_sae, seed); a single run writes to --out itself, several to
    --out/<k.._d.._>seed<S> (only the lists with more than one value name a directory)."""
    ds = args.d_sae or [int(round(args.expansion * d_in))]
    runs = []
    for k in args.k:
        for d_sae in ds:
            check(k <= d_sae, f"--k {k} exceeds the number of latents d_sae={d_sae}")
            for seed in args.seed:
                parts = ([f"k{k}"] if len(args.k) > 1 else []) + ([f"d{d_sae}"] if len(ds) > 1 else []) + \
                        ([f"seed{seed}"] if len(args.seed) > 1 or len(args.k) * len(ds) > 1 else [])
                name = "_".join(parts)
                runs.append(Run(name or "sae", Path(args.out) / name if name else Path(args.out), seed, k, d_sae))
    return runs


def build_run(run: Run, args, x_train: torch.Tensor, dev, dist: Dist) -> None:
    """The SAE (initialised from its own seed: the same init as a run of its own), Adam, state."""
    gen = seed_everything(run.seed)
    run.sae = SAE(x_train.shape[1], run.d_sae, args.arch, run.k, k_aux=args.k_aux, auxk_coeff=args.auxk_coeff,
                  l1_coeff=args.l1_coeff or 0.0, l0_coeff=args.l0_coeff or 0.0, bandwidth=args.bandwidth,
                  init_threshold=args.init_threshold, init=args.init, generator=gen)
    run.sae.init_b_dec_(x_train[torch.randperm(len(x_train), generator=gen)[:32768].to(dev)])   # Bricken et al. 2023
    run.sae.to(dev).train()
    dist.broadcast_([p.data for p in run.sae.parameters()])   # every process starts from rank 0's weights
    try:
        run.opt = torch.optim.Adam(run.sae.parameters(), lr=args.lr, fused=True)
    except (RuntimeError, TypeError):
        run.opt = torch.optim.Adam(run.sae.parameters(), lr=args.lr)
    run.since_fired = torch.zeros(run.d_sae, dtype=torch.long, device=dev)
    fixed = args.l1_coeff if args.arch == "relu" else args.l0_coeff if args.arch == "jumprelu" else 0.0
    run.steer = fixed is None
    run.lam = (0.01 if args.arch == "relu" else 1e-4) if run.steer else fixed


def train_step(run: Run, x: torch.Tensor, step: int, steps: int, lr: float, args, dist: Dist, dead_tokens: int):
    """One optimiser step of one SAE on batch x (this process's slice); returns its SAEOutput."""
    sae, opt = run.sae, run.opt
    # (1) schedule: lr, the L1 warmup, which latents are dead (AuxK)
    for g in opt.param_groups:
        g["lr"] = lr
    if args.arch == "relu":       # L1 warmup (Conerly et al. 2024), on top of any steering
        coeff = run.lam * min(1.0, (step + 1) / max(1, int(args.l1_warmup_frac * steps)))
    else:
        coeff = run.lam if args.arch == "jumprelu" else None
    use_auxk = args.arch in ("topk", "batchtopk") and not args.no_auxk
    dead_mask = run.since_fired >= dead_tokens if use_auxk else None

    # (2) forward and backward; gradients averaged over processes
    out = sae(x, dead_mask=dead_mask, sparsity_coeff=coeff,
              all_reduce=dist.all_reduce_sum_ if dist.world_size > 1 else None)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    dist.average_gradients_(sae.parameters())

    # (3) the step under the decoder constraint, then the global statistics: which latents
    # fired, L0, BatchTopK's smallest kept activation, lambda's steering toward L0 = k
    sae.remove_parallel_grad_()                        # Bricken et al. 2023
    opt.step()
    sae.post_step_()                                   # unit-norm decoder rows, theta >= 0
    with torch.no_grad():
        stats = dist.all_reduce_sum_(torch.cat([out.fired.to(torch.float64), (out.l0 * x.shape[0]).view(1).double()]))
        run.l0 = float(stats[-1]) / args.batch_size
        run.since_fired = torch.where(stats[:-1] > 0, torch.zeros_like(run.since_fired), run.since_fired + args.batch_size)
        if args.arch == "batchtopk" and out.min_active is not None:
            sae.update_threshold_(float(dist.all_reduce_min_(out.min_active.detach().double().view(1).clone())))
        if run.steer:             # integral control of lambda toward L0 = k, at most 2% a step
            run.lam *= math.exp(0.02 * max(-1.0, min(1.0, math.log(max(run.l0, 1e-3) / run.k))))
    return out


def finish_run(run: Run, args, acts: Acts, x_held: torch.Tensor, scale: float, dev, dist: Dist, steps: int,
               warmup: int, decay: int, dead_tokens: int, others: list[str]) -> dict:
    """Back to the input's units, save the SAE (SAELens layout) and summary.json (written last)."""
    sae = run.sae
    sae.fold_input_scale_(scale)
    sae.eval()
    held = evaluate(sae, x_held.to(dev))
    side = acts.sidecar
    prov = provenance(args, seed=run.seed, d_in=acts.d_in, d_sae=run.d_sae, k=run.k, steps=steps,
                      tokens=steps * args.batch_size, n_train=acts.n_train, n_heldout=len(x_held), split=acts.split,
                      input_scale=scale, dead_tokens=dead_tokens, warmup_steps=warmup, decay_steps=decay,
                      world_size=dist.world_size, acts_sha256_1mb=acts.sha256_1mb,
                      trained_with=others)
    sae.save(run.out, metadata={"model_name": args.model_name or side.get("model_name") or side.get("model"),
                                "hook_name": args.hook_name or side.get("hook_name"),
                                "input_scale_folded": scale, "seed": run.seed, "code_version": prov["code_version"],
                                "training_config": prov["config"], "tokens": steps * args.batch_size})
    save_json({**prov, "heldout": held, "final_train_l0": run.l0,
               "final_lambda": run.lam if args.arch in ("relu", "jumprelu") else None,
               "batchtopk_threshold": float(sae.threshold[0]) if args.arch == "batchtopk" else None,
               "dead_frac": float((run.since_fired >= dead_tokens).float().mean())}, run.out / FINAL)
    if not args.quiet:
        print(f"saved {run.out}: held-out EV {held.get('ev', float('nan')):.4f}, L0 {held.get('l0', float('nan')):.1f}"
              if held else f"saved {run.out} (no held-out rows)")
    return held


def main(argv=None):
    args = get_args(argv)
    dist = Dist(args.device)
    if args.threads or dist.world_size > 1:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    try:
        train(args, dist, dist.device)
    finally:
        dist.close()


def train(args, dist: Dist, dev: torch.device):
    # --- data and sizes (everything is checked before anything is written) -------------------
    acts, x_train, x_held = load_data(args)
    runs = plan_runs(args, acts.d_in)
    n_train = acts.n_train
    check(args.batch_size <= n_train, f"--batch-size {args.batch_size} exceeds the {n_train} SAE-train rows of {acts.path}")
    check(args.batch_size % dist.world_size == 0,
          f"--batch-size {args.batch_size} is not divisible by the {dist.world_size} processes")
    tokens = args.tokens or (n_train if acts.kind == "shards" else max(2000 * args.batch_size, 100 * n_train))
    steps = max(1, tokens // args.batch_size)
    warmup, decay = int(args.warmup_frac * steps), int(args.decay_frac * steps)
    dead_tokens = args.dead_tokens or min(10_000_000, n_train)
    wandb = None
    if args.wandb and dist.master:                         # imported only when asked for
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package (pip install wandb)")
    for run in runs:
        run.resuming = will_resume(args, run.out, dist)
    for run in runs:
        prepare_out_dir(run.out, FINAL, overwrite=args.overwrite)

    # inputs scaled to unit mean squared norm (Lieberum et al. 2024); folded back at the end
    x_train = x_train.to(dev)
    scale = 1.0 if args.no_normalize else float(1.0 / x_train.double().pow(2).sum(1).mean().sqrt().clamp_min(1e-30))
    x_train.mul_(scale)
    eval_rows = (x_held.to(dev) * scale)[: args.eval_rows]
    source = acts.batches(args.batch_size, args.seed[0], dist.rank, dist.world_size, x_train=x_train,
                          buffer_rows=args.buffer_rows, scale=scale, device=dev)

    # --- each SAE, its optimiser and its training state (or its checkpoint) -------------------
    for run in runs:
        build_run(run, args, x_train, dev, dist)
        run.ckpt_meta = {"config": {k: v for k, v in vars(args).items() if k not in RESUME_FREE},
                         "acts_sha256_1mb": acts.sha256_1mb, "d_in": acts.d_in, "d_sae": run.d_sae, "k": run.k,
                         "seed": run.seed, "n_train": n_train, "input_scale": scale, "data": source.state()}
        if run.resuming:
            check_same_run(run.out / CKPT, run.ckpt_meta, acts)
            run.start, run.since_fired, run.lam = load_checkpoint(run.out / CKPT, run.sae, run.opt)
            run.since_fired = run.since_fired.to(dev)
        if dist.master:
            tidy_out_dir(run.out, run.resuming, run.start)
    check(len({r.start for r in runs}) == 1, "--resume: the SAEs of this run were checkpointed at different steps "
                                             f"({', '.join(f'{r.name} {r.start}' for r in runs)}); pass --overwrite")
    start = runs[0].start
    if wandb is not None:
        wandb.init(project=args.wandb, config={**vars(args), "d_in": acts.d_in, "steps": steps,
                                               "saes": [r.name for r in runs]},
                   dir=str(runs[0].out), resume="allow")

    # --- the loop: every batch is read once and each SAE takes its step on it ----------------
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=start, disable=args.quiet or not dist.master or not sys.stderr.isatty(),
               unit="step", dynamic_ncols=True)
    t_last, tok_last = time.perf_counter(), start * args.batch_size
    stop_at = steps if args.stop_after_steps is None else min(steps, start + args.stop_after_steps)
    for step in range(start, stop_at):
        lr = lr_at(step, steps, args.lr, warmup, decay)
        x = source.batch(step)
        outs = [train_step(run, x, step, steps, lr, args, dist, dead_tokens) for run in runs]

        # (4) log and checkpoint
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            tps = (done * args.batch_size - tok_last) / max(1e-9, time.perf_counter() - t_last)
            for run, out in zip(runs, outs):
                terms = dist.all_reduce_mean_(torch.stack([out.loss.detach()] + [v.detach() for v in out.losses.values()]).double())
                if dist.master:
                    rec = log_record(done, args.batch_size, lr, out, terms, x, run.l0,
                                     float((run.since_fired >= dead_tokens).float().mean()), tps, run.lam, run.sae,
                                     evaluate(run.sae, eval_rows))
                    append_jsonl(run.out / "metrics.jsonl", rec)
                    if wandb is not None:
                        wandb.log({(f"{run.name}/{k}" if len(runs) > 1 else k): v for k, v in rec.items()}, step=done)
            if dist.master:
                bar.set_postfix(loss=f"{rec['loss']:.4g}", ev=f"{rec['ev']:.3f}", l0=f"{rec['l0']:.1f}")
            t_last, tok_last = time.perf_counter(), done * args.batch_size    # (excludes the eval)
        if (done % args.ckpt_every == 0 or done == stop_at) and dist.master:
            for run in runs:
                save_checkpoint(run.out / CKPT, run.sae, run.opt, done, run.since_fired, run.lam, run.ckpt_meta)
        bar.update(1)
    bar.close()
    dist.barrier()
    if stop_at < steps or not dist.master:                 # --stop-after-steps: leave as if killed
        return

    # --- finish: back to the input's units, save, evaluate on the held-out rows ---------------
    for run in runs:
        held = finish_run(run, args, acts, x_held, scale, dev, dist, steps, warmup, decay, dead_tokens,
                          [r.name for r in runs if r is not run])
        if wandb is not None:
            wandb.log({(f"final/{run.name}/{k}" if len(runs) > 1 else f"final/{k}"): v for k, v in held.items()})
    if wandb is not None:
        wandb.finish()


if __name__ == "__main__":
    run_main(main)
