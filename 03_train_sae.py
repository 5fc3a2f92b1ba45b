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

Several SAEs train in one pass: lists of --seed, --k, --d-sae give one SAE each (in
OUT/seed<S>/, or OUT/k<K>_d<D>_seed<S>/), every batch read once and used by all of them; each
starts from its own seed's init, the batch order follows the first seed. The TopK family's SAEs
of one width and k take each step together as one stacked module (lib/stacked.py, --stack):
the same maths per SAE (its own lr and schedule), one set of ops for all.

Defaults, chosen by bench/sweep_sae_recipe.py on the modular-addition data and kept sound for
LM streams: d_sae = 8 d_in; Adam with lr 6e-4 * sqrt(16384 / d_sae) * sqrt(batch / 4096) (the lr
scaling of Gao et al. 2024 and sparsify, times 3); batch 4096, or for a small data set the largest
power of two <= train rows / 8 (1024 on modular addition). Length: until the held-out loss
plateaus (class Schedule: warmup, flat, then a linear decay over 20% of the steps done so far,
Conerly et al. 2024's final decay started by the plateau), at most --max-tokens; the reason it
stopped is in summary.json. --tokens N instead trains exactly N rows (5% warmup, last 20% decay).
Inputs are scaled to unit mean squared norm (Lieberum et al. 2024) unless --no-normalize; the
scale is folded into the saved weights, so the saved SAE takes and returns activations in their
own units. --k is the L0 of every architecture: exact per row (topk), on average (batchtopk), or
the target that lambda is steered to (relu, jumprelu: lambda grows or shrinks by up to
--steer-gain (log) a step with log(L0/k)) unless --l1-coeff / --l0-coeff fix lambda. Dead latents
(not fired for --dead-tokens: 10M tokens as in Gao et al. 2024, at most one pass over the
SAE-train rows) are trained by AuxK, for every architecture, and for jumprelu also by the
pre-activation loss (--pre-act-coeff; sae.py).

Under torchrun every process takes its slice of the same global batch, gradients are
averaged with one all-reduce per step (gloo on CPU, nccl on GPU), and the dead-latent
counters, AuxK normaliser, BatchTopK threshold and lambda use global statistics, so N
processes follow one process at the same --batch-size. (BatchTopK picks the top
k * batch within each process's slice, as SAELens does.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import torch

from lib.activations import Acts, encode_chunks, open_acts
from lib.common import (ArgumentParser, Dist, UserError, append_jsonl, check, load_tensor_metadata, load_tensors,
                        prepare_out_dir, provenance, run_main, save_json, save_tensors, seed_everything)
from lib.metrics import explained_variance, l0 as mean_l0
from lib.stacked import StackedAdam, StackedSAE
from sae import ARCHS, SAE

FINAL = "summary.json"
CKPT = "checkpoint.safetensors"
OUTPUTS = ("sae_weights.safetensors", "cfg.json", "metrics.jsonl", CKPT, FINAL)
# flags that may differ between a run and its --resume
# (--acts may be spelled differently: the file itself is checked by its hash)
RESUME_FREE = {"acts", "out", "resume", "overwrite", "quiet", "wandb", "stop_after_steps", "threads",
               "device", "log_every", "ckpt_every", "buffer_rows"}
NEWER_FLAGS = {"sparsity_loss": "step"}   # flags added since checkpoints were first written: their value before
DEFAULT_MAX_TOKENS = 24_000_000      # the plateau schedule's cap on an in-memory data set
PRE_ACT_COEFF = 1e-3                 # the pre-activation loss of jumprelu (inputs at unit mean squared norm;
                                     # bench/sweep_pre_act.py: 2e-3 to 1e-2 trade L0, EV or recovery for it)
                                     # and of the TopK family (their dead latents below zero; batchtopk since
                                     # its k_aux is d_in / 4: bench/dead_pre_cpu.txt, block 5; block 6: 1e-2 keeps
                                     # batchtopk's latents alive at k 32 but costs answer features at k 2-3)
PRE_ACT_ARCHS = ("jumprelu", "topk", "batchtopk")


def get_args(argv=None):
    """03's flags, in the four groups --help shows them in, then checked (one clear line per bad value)."""
    p = ArgumentParser(description="Train a sparse autoencoder (ReLU, TopK, BatchTopK, JumpReLU) on activations.")
    _sae_args(p.add_argument_group("what is trained: data, architecture, size, start"))
    _schedule_args(p.add_argument_group("length and learning rate: Adam, the plateau schedule or --tokens"))
    _sparsity_args(p.add_argument_group("sparsity control (relu, jumprelu) and dead-latent remedies"))
    _run_args(p.add_argument_group("logging, checkpoints, sharded inputs, metadata, machine"))
    return check_args(p.parse_args(argv))


def _sae_args(p):
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
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="SAE seed (init); several seeds train one SAE each in one pass over the data, "
                        "in OUT/seed<S>/ (the batch order follows the first seed)")
    p.add_argument("--init", choices=("tied", "data", "orthogonal"), default="tied",
                   help="decoder rows: random unit vectors (Gao et al. 2024), random data rows minus b_dec "
                        "(sae.SAE.init_from_data_: fewer dead latents on data of low rank, but on modular addition "
                        "better only at k 2: >= 98%% of the answer features with every TopK seed at k 2 / 256, fewer at k 3; "
                        "bench/curve_recovery_init_cpu.txt), or semi-orthogonal; W_enc = W_dec^T in all three")
    p.add_argument("--no-normalize", action="store_true", help="do not scale inputs to unit mean squared norm")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the 10%% hold-out when the file has no train_mask")


def _schedule_args(p):
    p.add_argument("--lr", type=float, default=None,
                   help="Adam lr (default 6e-4 * sqrt(16384 / d_sae) * sqrt(batch / 4096): 3x the lr scaling of "
                        "Gao et al. 2024 / sparsify, square-root scaled with the batch; bench/sweep_sae_recipe.py)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiplies the default lr (not --lr): run_all.sh's sweep trains at 3x for at most 1M rows, "
                        "a screen at a quarter of the study's length (bench/sweep_lr_rows_cpu.txt)")
    p.add_argument("--batch-size", type=batch_size_arg, default=None,
                   help="global batch, split over processes (default: 4096, or for a small data set the largest "
                        "power of two <= train rows / 8, so that a pass holds at least 8 steps); 'max': the largest "
                        "power of two <= train rows, near full-batch (run_all.sh's study: bench/curve_recovery_batch_cpu.txt)")
    p.add_argument("--tokens", type=int, default=None,
                   help="train for exactly this many rows (warmup and final decay as fractions of it); default: "
                        "until the held-out loss plateaus (see --max-tokens, --plateau-window)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap of the plateau schedule (default: max(24M, one pass) for a file, one pass for LM shards)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (plateau rule)")
    p.add_argument("--plateau-window", type=int, default=10,
                   help="plateau: the best held-out FVU of the last W evaluations improved on the best before them "
                        "by less than --plateau-tol (relative), dead latents stopped reviving, L0 near k")
    p.add_argument("--plateau-tol", type=float, default=0.02)
    p.add_argument("--max-grad-norm", type=float, default=None,
                   help="clip each SAE's gradient to this global norm before the step, 0 = off (default 1 for "
                        "relu, as Conerly et al. 2024 and SAELens: a rare AuxK step on free decoder rows otherwise "
                        "sets off a loss spike, bench/grad_norm_trace.py; off for the rest: TopK's and BatchTopK's "
                        "norms stay below 0.2, JumpReLU's threshold gradients pass 1 in its first 100 steps, and "
                        "clipping them would change it)")
    p.add_argument("--warmup-steps", type=int, default=100, help="lr warmup of the plateau schedule")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="with --tokens: lr warmup, fraction of steps")
    p.add_argument("--decay-frac", type=float, default=0.2,
                   help="final linear lr decay to 0: a fraction of the steps (--tokens) or of the steps done when "
                        "the plateau is reached")


def _sparsity_args(p):
    p.add_argument("--l1-coeff", type=float, default=None,
                   help="relu: fixed L1 coefficient (default: steered so that L0 approaches --k)")
    p.add_argument("--l1-warmup-frac", type=float, default=0.05,
                   help="relu: L1 coefficient ramps up from 0 over this fraction of the (maximum) steps")
    p.add_argument("--steer-gain", type=float, default=None,
                   help="relu / jumprelu: lambda moves by at most this log-factor a step toward L0 = k "
                        "(default 0.005 relu, 0.02 jumprelu)")
    p.add_argument("--l0-coeff", type=float, default=None,
                   help="jumprelu: fixed lambda; default: lambda is steered so that L0 approaches --k")
    p.add_argument("--bandwidth", type=float, default=1e-2,
                   help="jumprelu: STE kernel width eps (inputs at unit mean squared norm; SAELens's 0.05 at "
                        "|x| = sqrt(d_in) is 0.0044 at d_in 128; 0.01 from bench/sweep_bandwidth_cpu.txt)")
    p.add_argument("--init-threshold", type=float, default=1e-3, help="jumprelu: initial theta")
    p.add_argument("--sparsity-loss", choices=("step", "tanh"), default="step",
                   help="jumprelu: lambda * L0 through theta's pseudo-gradient (step, Rajamanoharan et al. 2024) or "
                        "lambda * sum_i tanh(4 f_i |W_dec_i|) (tanh, Anthropic Jan 2025; trains on the dense path)")
    p.add_argument("--k-aux", type=int, default=None, help="AuxK latents (default d_in/2; batchtopk d_in/4: bench/auxk_size.py)")
    p.add_argument("--auxk-coeff", type=float, default=1 / 32)
    p.add_argument("--auxk-input", choices=("relu", "raw"), default=None,
                   help="what AuxK decodes: the dead latents' ReLU'd pre-activations (default for topk, batchtopk: "
                        "Gao et al. 2024) or raw ones (default for relu, jumprelu). raw reaches latents below zero "
                        "on every row, as --pre-act-coeff does for the TopK family, but at k 3 / 384 leaves 26%% of "
                        "TopK's latents dead instead of 0.3%% (bench/dead_pre_cpu.txt)")
    p.add_argument("--no-auxk", action="store_true",
                   help="no dead-latent remedy: no AuxK loss (every arch), no pre-activation loss")
    p.add_argument("--pre-act-coeff", type=float, default=None,
                   help="coefficient of the pre-activation loss on dead latents: jumprelu, sum of ReLU(theta - pre) "
                        "(Anthropic, Jan 2025); topk and batchtopk, sum of ReLU(-pre) over the dead latents below "
                        "zero on every row, which the ReLU'd AuxK cannot reach (bench/dead_pre_cpu.txt); default "
                        "PRE_ACT_COEFF for jumprelu, topk and batchtopk; relu: none")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="a latent is dead after this many tokens without firing (default min(10M, train rows))")


def _run_args(p):
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
    p.add_argument("--stack", choices=("auto", "on", "off"), default="auto",
                   help="several SAEs of one width and k take each step as one stacked module (lib/stacked.py); "
                        "auto: for the TopK family, where it is faster on a CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores / processes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases")


def check_args(args):
    check(args.lr is None or (args.lr > 0 and math.isfinite(args.lr)), f"--lr must be > 0 (got {args.lr})")
    check(args.lr_scale > 0 and math.isfinite(args.lr_scale), f"--lr-scale must be > 0 (got {args.lr_scale})")
    check(args.lr is None or args.lr_scale == 1, "--lr-scale scales the default lr: give --lr or --lr-scale, not both")
    check(args.batch_size in (None, "max") or args.batch_size > 0, f"--batch-size must be > 0 (got {args.batch_size})")
    check(all(k > 0 for k in args.k), f"--k must be > 0 (got {' '.join(map(str, args.k))})")
    check(args.expansion > 0, f"--expansion must be > 0 (got {args.expansion})")
    check(args.d_sae is None or all(d > 0 for d in args.d_sae),
          f"--d-sae must be > 0 (got {' '.join(map(str, args.d_sae or []))})")
    for name in ("seed", "k", "d_sae"):
        v = getattr(args, name) or []
        check(len(set(v)) == len(v), f"--{name.replace('_', '-')} lists a value twice")
    check(args.tokens is None or args.tokens > 0, f"--tokens must be > 0 (got {args.tokens})")
    check(args.max_tokens is None or args.max_tokens > 0, f"--max-tokens must be > 0 (got {args.max_tokens})")
    check(args.eval_every > 0 and args.plateau_window > 0 and args.plateau_tol >= 0 and args.warmup_steps >= 0,
          "--eval-every and --plateau-window must be > 0, --plateau-tol and --warmup-steps >= 0")
    check(args.steer_gain is None or args.steer_gain > 0, f"--steer-gain must be > 0 (got {args.steer_gain})")
    check(args.max_grad_norm is None or args.max_grad_norm >= 0,
          f"--max-grad-norm must be >= 0 (got {args.max_grad_norm})")
    if args.max_grad_norm is None:                     # the default, resolved here so that config records it
        args.max_grad_norm = 1.0 if args.arch == "relu" else 0.0
    check(0 <= args.warmup_frac < 1 and 0 <= args.decay_frac <= 1 and args.warmup_frac + args.decay_frac <= 1,
          "--warmup-frac and --decay-frac must lie in [0, 1] and sum to at most 1")
    check(0 <= args.l1_warmup_frac <= 1, "--l1-warmup-frac must lie in [0, 1]")
    for name in ("l1_coeff", "l0_coeff", "pre_act_coeff"):
        v = getattr(args, name)
        check(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    check(args.bandwidth > 0 and args.init_threshold >= 0, "--bandwidth must be > 0 and --init-threshold >= 0")
    check(not (args.arch == "jumprelu" and args.sparsity_loss == "tanh" and args.stack == "on"),
          "--sparsity-loss tanh trains each SAE on its own plain path: drop --stack on")
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


class Schedule:
    """A run's learning rate and length.

    fixed (--tokens): linear warmup over the first warmup_frac of the steps, flat, linear decay
        to 0 over the last decay_frac (Conerly et al. 2024).
    plateau (default): warmup over --warmup-steps, then flat until the held-out loss stops
        improving (`update`, every --eval-every steps): the best held-out FVU of the last W
        evaluations beats the best before them by less than max(tol * best_before, 0.001), and the
        dead fraction fell by less than 0.5 points over those W evaluations. For relu and jumprelu
        only the evaluations with the held-out L0 within 10% of k count (l0_ok): a denser code has
        a lower FVU than any code at L0 = k, so comparing against it (the dense start, or a dense
        excursion) would call the sparse evaluations after it a plateau and stop a run that is
        still improving. The others are left out, not a reason to start the count again: the
        held-out L0 of a steered run wanders a few % either side of the 10% edge, and restarting
        the count there made a run's stop step near chance (ReLU at k 2: 9,600-22,080 steps for
        the same plateau). Evaluations inside the lr warmup do not count either: a `--init data`
        start is good before the full lr moves it, and that low bar stopped TopK k 2 / 512 at step
        500 while its FVU still fell 15% a window (bench/curve_recovery_init_cpu.txt). Then lr
        decays linearly to 0 over decay_frac of the steps done so far and the run stops: the
        decay is what a converged run needs last, not a fixed share of a guessed length. If the
        cap (max steps) comes first, the decay starts in time to end there. `reason` says which,
        for summary.json."""

    def __init__(self, lr: float, max_steps: int, warmup: int, decay_frac: float, fixed: bool,
                 window: int = 10, tol: float = 0.02):
        self.lr0, self.max_steps, self.warmup, self.decay_frac, self.fixed = lr, max_steps, warmup, decay_frac, fixed
        self.window, self.tol = window, tol
        self.fvu, self.dead = [], []
        self.ok = []                    # per evaluation: its L0 near k, so it counts (relu, jumprelu)
        self.decay_start, self.end, self.reason = None, max_steps, None
        if fixed:
            self.decay_start, self.reason = max_steps - int(decay_frac * max_steps), "fixed length (--tokens)"

    def lr(self, step: int) -> float:
        if self.fixed:
            return lr_at(step, self.max_steps, self.lr0, self.warmup, self.max_steps - self.decay_start)
        if step < self.warmup:
            return self.lr0 * (step + 1) / self.warmup
        if self.decay_start is not None and step >= self.decay_start:
            return self.lr0 * max(0.0, (self.end - step) / max(1, self.end - self.decay_start))
        return self.lr0

    def update(self, done: int, fvu: float, dead_frac: float, l0_ok: bool) -> None:
        """After step `done`: record the held-out FVU, dead fraction and whether L0 is near k;
        start the decay at a plateau."""
        if self.fixed or self.decay_start is not None:
            return
        self.fvu.append(fvu)
        self.dead.append(dead_frac)
        self.ok.append(bool(l0_ok) and done >= self.warmup)
        W, fvu_ok = self.window, [f for f, ok in zip(self.fvu, self.ok) if ok]
        if len(fvu_ok) >= 2 * W:
            before, recent = min(fvu_ok[:-W]), min(fvu_ok[-W:])
            flat = before - recent < max(self.tol * before, 1e-3)
            revived = self.dead[-1] < self.dead[-1 - W] - 0.005
            if flat and not revived:
                self.decay_start = done
                self.end = min(self.max_steps, done + max(1, int(self.decay_frac * done)))
                self.reason = f"held-out loss plateau at step {done}"
                return
        last_start = self.max_steps - max(1, int(self.decay_frac * self.max_steps))
        if done >= last_start:
            self.decay_start, self.reason = done, "maximum length (--max-tokens) reached before a plateau"

    def state(self) -> dict:
        return {"fvu": self.fvu, "dead": self.dead, "ok": self.ok, "decay_start": self.decay_start,
                "end": self.end, "reason": self.reason}

    def load(self, st: dict) -> None:
        self.fvu, self.dead = list(st["fvu"]), list(st["dead"])
        since = int(st.get("since", 0))                # checkpoints before the "ok" list: the count's start
        self.ok = [bool(o) for o in st["ok"]] if "ok" in st else [i >= since for i in range(len(self.fvu))]
        self.decay_start, self.end, self.reason = st["decay_start"], st["end"], st["reason"]


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

def save_checkpoint(path: Path, sae: SAE, opt, step: int, since_fired, lam: float, meta: dict,
                    schedule: dict | None = None) -> None:
    t = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            t[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["since_fired"] = since_fired
    t["rng.torch"] = torch.get_rng_state()
    save_tensors(t, path, metadata={"state": json.dumps({"step": step, "lam": lam, "schedule": schedule, **meta})})


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
    old = {**NEWER_FLAGS, **meta.get("config", {})}     # a checkpoint older than a flag ran at its old value
    diff = [k for k, v in ckpt_meta["config"].items() if old.get(k) != v]
    check(not diff, f"--resume: flags differ from the checkpointed run: "
                    f"{', '.join('--' + k.replace('_', '-') for k in diff)}")
    check(meta.get("acts_sha256_1mb") == acts.sha256_1mb,
          f"--resume: --acts {acts.path} is not the file the run started on")
    was, now = meta.get("remedies") or remedies_before_044ea18(meta), ckpt_meta["remedies"]
    check(was == now, f"--resume: the checkpointed run trained with k_aux {was['k_aux']} and pre-act-coeff "
                      f"{was['pre_act_coeff']}, this 03's defaults give {now['k_aux']} and {now['pre_act_coeff']} "
                      f"(they changed since): pass --overwrite to start over, or finish it with the code that began it")


def remedies_before_044ea18(meta: dict) -> dict:
    """The dead-latent remedies of a checkpoint written before they were recorded: until then
    k_aux defaulted to d_in / 2 for every arch and the pre-activation loss was off for batchtopk."""
    cfg = meta.get("config", {})
    pre = cfg.get("pre_act_coeff")
    if pre is None:
        pre = PRE_ACT_COEFF if cfg.get("arch") in ("jumprelu", "topk") else 0.0
    return {"k_aux": cfg.get("k_aux") or meta.get("d_in", 0) // 2,
            "pre_act_coeff": 0.0 if cfg.get("arch") == "relu" else pre}


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
        self.schedule: Schedule | None = None           # lr and length
        self.finished = False
        self.init = "tied"                              # how its weights started (--init, resolved)
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


class Group:
    """The SAEs that take each step together: one SAE (sae.py itself, with torch's Adam), or on
    the speed path several SAEs of one architecture and width stacked into one module
    (lib/stacked.py: each SAE's own maths and lr, one set of ops for all). The runs keep their
    own sae.SAE and optimiser: `sync` copies the stacked weights (and Adam state) back into
    them, so evaluation, checkpoints and saved files are what a single run has."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.members: list[Run] = []                    # the live runs, in the stack's block order
        self.stack: StackedSAE | None = None
        self.opt = None

    @property
    def model(self):
        return self.stack if self.stack is not None else self.members[0].sae

    def restack(self) -> None:
        """(Re)build from the live runs' SAEs and optimiser states: at the start (after a resume
        too) and whenever one of them has finished."""
        self.members = [r for r in self.runs if not r.finished]
        self.stack = self.opt = None
        if len(self.members) > 1:
            self.stack = StackedSAE([r.sae for r in self.members])
            self.opt = StackedAdam(self.stack)
            self.opt.load_from([r.sae for r in self.members], [r.opt for r in self.members])
        elif self.members:
            self.opt = self.members[0].opt

    def set_lr(self, lrs: list[float]) -> None:
        if self.stack is None:
            for g in self.opt.param_groups:
                g["lr"] = lrs[0]
        else:
            self.opt.lrs = lrs

    def sync(self, adam: bool = False) -> None:
        """Each run's SAE (and, for a checkpoint, its optimiser) gets its block of the stack."""
        if self.stack is not None:
            for s, r in enumerate(self.members):
                self.stack.export_(s, r.sae, self.opt if adam else None, r.opt)


def plan_groups(runs: list[Run], args) -> list[Group]:
    """--stack auto: the TopK family's SAEs of one width and k train as one stack (on 2 CPU cores
    its step is the faster one, bench/bench_multi_seed.py); relu and jumprelu step one SAE at a
    time: stacked they take the dense step, no faster there than one at a time (and their own
    sparse step, once their code is sparse, is faster still). --stack on / off: always / never."""
    if args.stack == "off" or (args.stack == "auto" and args.arch not in ("topk", "batchtopk")):
        return [Group([r]) for r in runs]
    by: dict = {}
    for r in runs:
        by.setdefault((r.d_sae, r.k), []).append(r)
    return [Group(g) for g in by.values()]


def default_batch(n_train: int) -> int:
    """4096 rows (sparsify's and SAELens's usual batch), or, for a data set too small for that,
    the largest power of two <= n_train / 8: on 11,492 modular-addition rows 1024, so a pass is
    eleven steps, not three (what revives dead latents is the number of steps)."""
    return min(4096, pow2_at_most(n_train // 8))


def max_batch(n_train: int) -> int:
    """--batch-size max: the largest power of two <= n_train, near full-batch gradient descent. On
    the small modular-addition data it lets TopK find answer features the noisier default batch
    leaves merged into a neighbour's latent (bench/curve_recovery_batch_cpu.txt)."""
    return pow2_at_most(n_train)


def pow2_at_most(n: int) -> int:
    """The largest power of two <= n (1 for n < 2)."""
    return 1 << max(0, n.bit_length() - 1)


def batch_size_arg(s: str) -> int | str:
    """--batch-size: a number of rows, or 'max'."""
    if s == "max":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or 'max', got {s!r}") from None


def default_lr(d_sae: int, batch_size: int) -> float:
    """6e-4 * sqrt(16384 / d_sae) * sqrt(batch / 4096): the lr scaling of Gao et al. 2024 (sparsify,
    dictionary_learning: 2e-4 at 16k latents) times 3, square-root scaled with the batch;
    bench/sweep_sae_recipe.py found it revives dead latents on the small modular-addition data
    within a few thousand steps and stays stable for every arch."""
    return 6e-4 * math.sqrt(16384 / d_sae) * math.sqrt(batch_size / 4096)


def build_run(run: Run, args, x_train: torch.Tensor, dev, dist: Dist, max_steps: int, init: str) -> None:
    """The SAE (initialised from its own seed: the same init as a run of its own), Adam, state."""
    gen = seed_everything(run.seed)
    pre_act = (PRE_ACT_COEFF if args.arch in PRE_ACT_ARCHS else 0.0) if args.pre_act_coeff is None else args.pre_act_coeff
    run.sae = SAE(x_train.shape[1], run.d_sae, args.arch, run.k, k_aux=args.k_aux, auxk_coeff=args.auxk_coeff,
                  auxk_raw=None if args.auxk_input is None else args.auxk_input == "raw",
                  pre_act_coeff=0.0 if args.arch == "relu" else pre_act,
                  l1_coeff=args.l1_coeff or 0.0, l0_coeff=args.l0_coeff or 0.0, bandwidth=args.bandwidth,
                  init_threshold=args.init_threshold, init="orthogonal" if init == "orthogonal" else "tied",
                  sparsity_loss=args.sparsity_loss if args.arch == "jumprelu" else "step",
                  generator=gen)
    sample = x_train[torch.randperm(len(x_train), generator=gen)[:32768].to(dev)]
    run.sae.init_b_dec_(sample)                                                    # Bricken et al. 2023
    if init == "data":
        run.sae.init_from_data_(sample, gen)
    run.init = init
    run.sae.to(dev).train()
    dist.broadcast_([p.data for p in run.sae.parameters()])   # every process starts from rank 0's weights
    lr = args.lr or args.lr_scale * default_lr(run.d_sae, args.batch_size)
    try:
        run.opt = torch.optim.Adam(run.sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        run.opt = torch.optim.Adam(run.sae.parameters(), lr=lr)
    if args.tokens:
        run.schedule = Schedule(lr, max_steps, int(args.warmup_frac * max_steps), args.decay_frac, fixed=True)
    else:
        run.schedule = Schedule(lr, max_steps, min(args.warmup_steps, max_steps // 10), args.decay_frac, fixed=False,
                                window=args.plateau_window, tol=args.plateau_tol)
    run.since_fired = torch.zeros(run.d_sae, dtype=torch.long, device=dev)
    fixed = args.l1_coeff if args.arch == "relu" else args.l0_coeff if args.arch == "jumprelu" else 0.0
    run.steer = fixed is None
    run.lam = (0.01 if args.arch == "relu" else 1e-4) if run.steer else fixed


def sparsity_coeff(run: Run, step: int, args) -> float | None:
    """lambda of relu (with its L1 warmup, Conerly et al. 2024) and jumprelu; None for the TopK family."""
    if args.arch == "relu":
        return run.lam * min(1.0, (step + 1) / max(1, int(args.l1_warmup_frac * run.schedule.max_steps)))
    return run.lam if args.arch == "jumprelu" else None


def train_step(group: "Group", x: torch.Tensor, step: int, args, dist: Dist, dead_tokens: int) -> list:
    """One optimiser step of each SAE of `group` on batch x (this process's slice); returns
    their SAEOutputs. A group is one SAE (sae.py itself) or several stacked (lib/stacked.py)."""
    runs = group.members
    # (1) schedule: each SAE's lr, its sparsity coefficient, which of its latents are dead (AuxK)
    group.set_lr([r.schedule.lr(step) for r in runs])
    coeffs = [sparsity_coeff(r, step, args) for r in runs]
    dead = None if args.no_auxk else [r.since_fired >= dead_tokens for r in runs]
    all_reduce = dist.all_reduce_sum_ if dist.world_size > 1 else None

    # (2) forward and backward; gradients averaged over processes
    model, opt = group.model, group.opt
    if group.stack is None:
        outs = [model(x, dead_mask=dead and dead[0], sparsity_coeff=coeffs[0], all_reduce=all_reduce)]
        loss = outs[0].loss
    else:                     # the speed path: the same maths for every SAE, one set of ops for all
        loss, outs = model(x, dead_mask=dead and torch.stack(dead), all_reduce=all_reduce,
                           sparsity_coeff=None if coeffs[0] is None else torch.tensor(coeffs, device=x.device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.average_gradients_(model.parameters())

    # (3) the step under the decoder constraint, then each SAE's global statistics: which
    # latents fired, L0, BatchTopK's smallest kept activation, lambda's steering toward L0 = k
    model.remove_parallel_grad_()                      # Bricken et al. 2023
    if args.max_grad_norm:                             # relu: Conerly et al. 2024
        model.clip_grad_norm_(args.max_grad_norm)
    opt.step()
    model.post_step_()                                 # unit-norm decoder rows (not relu), theta >= 0
    with torch.no_grad():
        for i, (run, out) in enumerate(zip(runs, outs)):
            stats = dist.all_reduce_sum_(torch.cat([out.fired.to(torch.float64), (out.l0 * x.shape[0]).view(1).double()]))
            run.l0 = float(stats[-1]) / args.batch_size
            run.since_fired = torch.where(stats[:-1] > 0, torch.zeros_like(run.since_fired), run.since_fired + args.batch_size)
            if args.arch == "batchtopk" and out.min_active is not None:
                m = float(dist.all_reduce_min_(out.min_active.detach().double().view(1).clone()))
                model.update_threshold_(m) if group.stack is None else model.update_threshold_(i, m)
            if run.steer:         # integral control of lambda toward L0 = k, at most `gain` (log) a step
                gain = args.steer_gain or (0.005 if args.arch == "relu" else 0.02)
                run.lam *= math.exp(gain * max(-1.0, min(1.0, math.log(max(run.l0, 1e-3) / run.k))))
    return outs


def finish_run(run: Run, args, acts: Acts, x_held: torch.Tensor, scale: float, dev, dist: Dist,
               dead_tokens: int, others: list[str]) -> dict:
    """Back to the input's units, save the SAE (SAELens layout) and summary.json (written last)."""
    sae, sch = run.sae, run.schedule
    steps = sch.end
    sae.fold_input_scale_(scale)
    sae.fold_decoder_norm_()                           # relu: unit decoder rows, the same function
    sae.eval()
    held = evaluate(sae, x_held.to(dev))
    side = acts.sidecar
    prov = provenance(args, seed=run.seed, d_in=acts.d_in, d_sae=run.d_sae, k=run.k, init=run.init, steps=steps,
                      tokens=steps * args.batch_size, n_train=acts.n_train, n_heldout=len(x_held), split=acts.split,
                      input_scale=scale, dead_tokens=dead_tokens, lr=sch.lr0, warmup_steps=sch.warmup,
                      decay_start=sch.decay_start, stop_reason=sch.reason, max_steps=sch.max_steps,
                      heldout_fvu_history=sch.fvu, world_size=dist.world_size, acts_sha256_1mb=acts.sha256_1mb,
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
        print(f"saved {run.out}: held-out EV {held.get('ev', float('nan')):.4f}, L0 {held.get('l0', float('nan')):.1f}, "
              f"{steps} steps ({sch.reason})" if held else f"saved {run.out} (no held-out rows)")
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


def restore_run(run: Run, args, acts: Acts, meta: dict, dev, dist: Dist) -> None:
    """Record what a checkpoint must match (config, data, sizes); on --resume load its weights,
    Adam state, dead-latent clocks, lambda and schedule, after checking it is the same run."""
    run.ckpt_meta = {"config": {k: v for k, v in vars(args).items() if k not in RESUME_FREE},
                     **meta, "d_sae": run.d_sae, "k": run.k, "seed": run.seed,
                     "remedies": {"k_aux": run.sae.k_aux, "pre_act_coeff": run.sae.pre_act_coeff}}
    if run.resuming:
        check_same_run(run.out / CKPT, run.ckpt_meta, acts)
        run.start, run.since_fired, run.lam = load_checkpoint(run.out / CKPT, run.sae, run.opt)
        run.since_fired = run.since_fired.to(dev)
        schedule = checkpoint_state(run.out / CKPT).get("schedule")
        if schedule:
            run.schedule.load(schedule)
    if dist.master:
        tidy_out_dir(run.out, run.resuming, run.start)


def import_wandb(args, dist: Dist):
    """The wandb module where --wandb asks for it (on the master process), else None; imported
    only then, and checked before anything is written."""
    if not (args.wandb and dist.master):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package (pip install wandb)")
    return wandb


def start_wandb(wandb, args, runs: list[Run], d_in: int, max_steps: int) -> None:
    """One W&B run for the whole pass. A resumed pass continues its W&B run (the id travels in
    the checkpoint); a fresh one starts a new one."""
    one = len(runs) == 1                               # the resolved sizes, one value per SAE
    sizes = {n: getattr(runs[0], n) if one else [getattr(r, n) for r in runs] for n in ("seed", "k", "d_sae")}
    wandb_id = (checkpoint_state(runs[0].out / CKPT).get("wandb_id") if runs[0].resuming else None) \
        or uuid.uuid4().hex[:8]
    for run in runs:
        run.ckpt_meta["wandb_id"] = wandb_id
    wandb.init(project=args.wandb, id=wandb_id, resume="allow", dir=str(runs[0].out),
               config={**vars(args), **sizes, "d_in": d_in, "max_steps": max_steps, "saes": [r.name for r in runs]})


class Shared:
    """What every SAE of one pass shares: the data (scaled to unit mean squared norm), the
    held-out rows, the sizes, and where records go. (A plain class: 03 is also loaded as a file,
    outside sys.modules, where a dataclass cannot resolve its annotations.)"""

    def __init__(self, acts: Acts, runs: list, x_held: torch.Tensor, eval_rows: torch.Tensor, scale: float,
                 source, max_steps: int, dead_tokens: int, start: int, wandb=None):
        self.acts, self.runs, self.x_held, self.eval_rows, self.scale = acts, runs, x_held, eval_rows, scale
        self.source = source                        # lib.activations' batch source: source.batch(step)
        self.max_steps, self.dead_tokens, self.start, self.wandb = max_steps, dead_tokens, start, wandb


def prepare(args, dist: Dist, dev: torch.device) -> Shared:
    """Data and sizes (everything checked before anything is written), then each SAE, its
    optimiser and its training state (or its checkpoint)."""
    acts, x_train, x_held = load_data(args)
    runs = plan_runs(args, acts.d_in)
    n_train = acts.n_train
    args.batch_size = max_batch(n_train) if args.batch_size == "max" else args.batch_size or default_batch(n_train)
    check(args.batch_size <= n_train, f"--batch-size {args.batch_size} exceeds the {n_train} SAE-train rows of {acts.path}")
    check(args.batch_size % dist.world_size == 0,
          f"--batch-size {args.batch_size} is not divisible by the {dist.world_size} processes")
    tokens = args.tokens or args.max_tokens or (n_train if acts.kind == "shards" else max(DEFAULT_MAX_TOKENS, n_train))
    max_steps = max(1, tokens // args.batch_size)
    dead_tokens = args.dead_tokens or min(10_000_000, n_train)
    wandb = import_wandb(args, dist)
    if args.resume and len(runs) > 1:                      # a killed pass may have finished some SAEs
        runs = [r for r in runs if not (r.out / FINAL).exists()] or runs
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

    meta = {"acts_sha256_1mb": acts.sha256_1mb, "d_in": acts.d_in, "n_train": n_train, "input_scale": scale,
            "data": source.state()}
    for run in runs:
        build_run(run, args, x_train, dev, dist, max_steps, args.init)
        restore_run(run, args, acts, meta, dev, dist)
    check(len({r.start for r in runs}) == 1, "--resume: the SAEs of this run were checkpointed at different steps "
                                             f"({', '.join(f'{r.name} {r.start}' for r in runs)}); pass --overwrite")
    if wandb is not None:
        start_wandb(wandb, args, runs, acts.d_in, max_steps)
    return Shared(acts, runs, x_held, eval_rows, scale, source, max_steps, dead_tokens, runs[0].start, wandb)


def after_step(sh: Shared, run: Run, out, step: int, x: torch.Tensor, log: bool, ckpt: bool, tps: float,
               args, dist: Dist, dev, bar) -> None:
    """(4) for one SAE after its step: evaluate (the plateau rule), log, checkpoint, and finish
    it where its schedule ends (the rest of the pass goes on)."""
    done = step + 1
    plateau_eval = not run.schedule.fixed and done % args.eval_every == 0
    held = evaluate(run.sae, sh.eval_rows) if (plateau_eval or log) else {}
    dead_frac = float((run.since_fired >= sh.dead_tokens).float().mean()) if (plateau_eval or log) else None
    if plateau_eval and held:
        run.schedule.update(done, 1.0 - held["ev"], dead_frac,
                            args.arch in ("topk", "batchtopk") or abs(held["l0"] / run.k - 1) <= 0.10)
    several = len(sh.runs) > 1                      # W&B keys name the SAE
    if log:
        terms = dist.all_reduce_mean_(torch.stack([out.loss.detach()] + [v.detach() for v in out.losses.values()]).double())
        if dist.master:
            rec = log_record(done, args.batch_size, run.schedule.lr(step), out, terms, x, run.l0, dead_frac, tps,
                             run.lam, run.sae, held)
            append_jsonl(run.out / "metrics.jsonl", rec)
            if sh.wandb is not None:
                sh.wandb.log({(f"{run.name}/{k}" if several else k): v for k, v in rec.items()}, step=done)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", ev=f"{rec['ev']:.3f}", l0=f"{rec['l0']:.1f}")
    if dist.master and (ckpt or done == run.schedule.end):
        save_checkpoint(run.out / CKPT, run.sae, run.opt, done, run.since_fired, run.lam, run.ckpt_meta,
                        run.schedule.state())
    if done == run.schedule.end:
        run.finished = True
        if dist.master:
            held = finish_run(run, args, sh.acts, sh.x_held, sh.scale, dev, dist, sh.dead_tokens,
                              [r.name for r in sh.runs if r is not run])
            if sh.wandb is not None:
                sh.wandb.log({(f"final/{run.name}/{k}" if several else f"final/{k}"): v for k, v in held.items()})


def train(args, dist: Dist, dev: torch.device):
    sh = prepare(args, dist, dev)
    runs, start = sh.runs, sh.start

    # --- the loop: every batch is read once and each live SAE takes its step on it -----------
    groups = plan_groups(runs, args)
    for g in groups:
        g.restack()
    from tqdm import tqdm
    bar = tqdm(total=sh.max_steps, initial=start, disable=args.quiet or not dist.master or not sys.stderr.isatty(),
               unit="step", dynamic_ncols=True)
    t_last, tok_last = time.perf_counter(), start * args.batch_size
    stop_at = sh.max_steps if args.stop_after_steps is None else min(sh.max_steps, start + args.stop_after_steps)
    for step in range(start, stop_at):
        if all(r.finished for r in runs):
            break
        x = sh.source.batch(step)
        stepped = [(r, o) for g in groups if g.members for r, o in zip(g.members, train_step(g, x, step, args, dist,
                                                                                                sh.dead_tokens))]

        # (4) evaluate (the plateau rule), log, checkpoint, finish the SAEs whose schedule ends here
        done = step + 1
        log = done % args.log_every == 0 or any(done == r.schedule.end for r, _ in stepped)
        ckpt = done % args.ckpt_every == 0 or done == stop_at
        if log or ckpt or done % args.eval_every == 0:         # stacked weights back into each run's SAE
            for g in groups:
                g.sync(adam=ckpt or any(done == r.schedule.end for r in g.members))
        tps = (done * args.batch_size - tok_last) / max(1e-9, time.perf_counter() - t_last)
        for run, out in stepped:
            after_step(sh, run, out, step, x, log, ckpt, tps, args, dist, dev, bar)
        for g in groups:
            if any(r.finished for r in g.members):        # the rest of a stack go on without it
                g.restack()
        if log:
            t_last, tok_last = time.perf_counter(), done * args.batch_size    # (excludes the eval)
        bar.update(1)
    bar.close()
    dist.barrier()
    if sh.wandb is not None:
        sh.wandb.finish()

if __name__ == "__main__":
    run_main(main)
