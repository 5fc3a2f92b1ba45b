"""Stage 01: train the modular-addition transformer until it groks.

    python 01_train_transformer.py --seed 42 --out runs/modadd/seed42

Model and task as in Nanda et al. 2023 ("Progress measures for grokking via
mechanistic interpretability"): input [a, b, =], predict c = (a + b) mod p at
`=` only; one layer, d_model 128, 4 heads of 32, d_mlp 512, ReLU, learned
positions, no LayerNorm; a seeded 30% of the p^2 pairs to train, the rest held out.

Two recipes (`--recipe`):
  fast  (default) the same model and data, full-batch AdamW, plus Grokfast-EMA
        gradient filtering (Lee et al. 2024, "Grokfast: Accelerated Grokking by
        Amplifying Slow Gradients"), a higher lr and tuned betas; it stops once
        held-out accuracy has held >= --target-acc for --hold steps, then trains
        --cleanup more steps (the Fourier structure keeps sharpening after the
        jump, Nanda et al. "clean-up" phase). Groks in about a minute on 2 cores.
  nanda the paper's recipe: lr 1e-3, weight decay 1, betas (0.9, 0.98), no
        filtering, up to 40k steps (~10-14k to grok; 25-45 minutes on 2 cores).
Any flag given explicitly overrides the recipe's value.

Writes to --out: model.safetensors, config.json, metrics.jsonl, fourier.json, fourier.png.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lib import modadd
from lib.common import (ArgumentParser, UserError, append_jsonl, check, pick_device, prepare_out_dir,
                    provenance, run_main, save_figure, save_json, save_tensors, seed_everything)

RECIPES = {
    # fast: chosen by bench/sweep_recipe.py (18 recipes x 3 seeds; table in
    # bench/sweep_recipe_h200.txt): groks in ~560-710 steps, vs ~2000 for lr 3e-3 / wd 1
    # with the usual Grokfast alpha 0.98, and never within 4000 for the Nanda recipe.
    "fast":  dict(lr=3e-3, weight_decay=2.0, beta1=0.9, beta2=0.98, grokfast_alpha=0.9,
                  grokfast_lamb=2.0, steps=5000, warmup=10, hold=100, cleanup=300),
    "nanda": dict(lr=1e-3, weight_decay=1.0, beta1=0.9, beta2=0.98, grokfast_alpha=0.0,
                  grokfast_lamb=0.0, steps=40000, warmup=10, hold=1000, cleanup=2000),
}


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
                        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, required=True, help="run directory to write")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    ap.add_argument("--p", type=int, default=113, help="modulus (the vocabulary is p residues plus `=`)")
    ap.add_argument("--n-layers", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--d-head", type=int, default=None, help="default d_model / n_heads")
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--train-frac", type=float, default=0.3)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--beta1", type=float)
    ap.add_argument("--beta2", type=float)
    ap.add_argument("--grokfast-alpha", type=float, help="EMA decay of the gradient filter (0 = off)")
    ap.add_argument("--grokfast-lamb", type=float, help="amplification of the slow gradient (0 = off)")
    ap.add_argument("--steps", type=int, help="maximum full-batch steps")
    ap.add_argument("--warmup", type=int, help="linear lr warmup steps")
    ap.add_argument("--target-acc", type=float, default=0.995, help="held-out accuracy that counts as grokked")
    ap.add_argument("--hold", type=int, help="steps the target must hold before clean-up starts")
    ap.add_argument("--cleanup", type=int, help="extra steps after grokking (0 = stop at once)")
    ap.add_argument("--no-early-stop", action="store_true", help="train all --steps")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.d_head is None:
        check(args.n_heads > 0 and args.d_model % args.n_heads == 0,
              f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads} (or pass --d-head)")
        args.d_head = args.d_model // args.n_heads
    check(args.p >= 3, f"--p must be at least 3, got {args.p}")
    check(0.0 < args.train_frac < 1.0, f"--train-frac must be in (0, 1), got {args.train_frac}")
    for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "steps", "eval_every"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.lr > 0, f"--lr must be positive, got {args.lr}")
    check(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    check(0 <= args.grokfast_alpha < 1, f"--grokfast-alpha must be in [0, 1), got {args.grokfast_alpha}")
    check(0 < args.target_acc <= 1, f"--target-acc must be in (0, 1], got {args.target_acc}")
    return args


class GrokfastEMA:
    """g <- g + lamb * EMA_alpha(g)  (Lee et al. 2024, Algorithm 2).

    Grokking is slow generalisation hidden under fast memorisation; the EMA is
    a low-pass filter on the gradient sequence, and amplifying its slow part
    speeds up the generalising direction."""

    def __init__(self, params, alpha: float, lamb: float):
        self.params = [p for p in params if p.requires_grad]
        self.alpha, self.lamb = alpha, lamb
        self.ema = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def __call__(self):
        if self.lamb == 0:
            return
        for p, e in zip(self.params, self.ema):
            e.mul_(self.alpha).add_(p.grad, alpha=1 - self.alpha)
            p.grad.add_(e, alpha=self.lamb)


def train(args) -> dict:
    out = prepare_out_dir(args.out, "model.safetensors", args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    seed_everything(args.seed)

    cfg = modadd.ModelConfig(p=args.p, n_layers=args.n_layers, d_model=args.d_model,
                             n_heads=args.n_heads, d_head=args.d_head, d_mlp=args.d_mlp)
    tokens, labels = modadd.all_pairs(args.p)
    train_idx, test_idx = modadd.train_test_split(args.p, args.train_frac, args.seed)
    x_tr, y_tr = tokens[train_idx].to(device), labels[train_idx].to(device)
    x_te, y_te = tokens[test_idx].to(device), labels[test_idx].to(device)
    modadd.check_no_answer_leak(x_tr, y_tr, args.p)   # the real batch, checked every run
    modadd.check_no_answer_leak(x_te, y_te, args.p)

    model = modadd.Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(args.beta1, args.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    grokfast = GrokfastEMA(model.parameters(), args.grokfast_alpha, args.grokfast_lamb)

    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    history = []
    t0 = time.time()
    grok_step, held_since, stop_at = None, None, args.steps
    bar = tqdm(range(args.steps), disable=args.quiet or not sys.stderr.isatty(), desc="train", unit="step")
    step = 0
    for step in bar:
        model.train()
        logits = model(x_tr)                          # [N, p], read at `=` only
        loss = F.cross_entropy(logits, y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grokfast()
        opt.step()
        sched.step()

        last = step == args.steps - 1 or step + 1 >= stop_at
        if step % args.eval_every == 0 or last:
            rec = {"step": step, "time_s": round(time.time() - t0, 3), **measure(model, logits, loss, y_tr, x_te, y_te)}
            append_jsonl(metrics_path, rec)
            history.append(rec)
            bar.set_postfix(train=f"{rec['train_acc']:.3f}", test=f"{rec['test_acc']:.3f}")
            if rec["test_acc"] >= args.target_acc:
                if held_since is None:
                    held_since = step
                if grok_step is None and step - held_since >= args.hold:
                    grok_step = held_since
                    if not args.no_early_stop:
                        stop_at = min(args.steps, step + 1 + args.cleanup)
            else:
                held_since = None
        if step + 1 >= stop_at:
            break
    summary = {"steps": step + 1, "train_time_s": round(time.time() - t0, 2), "grok_step": grok_step,
               "grokked": history[-1]["test_acc"] >= args.target_acc, "final": history[-1]}
    return save_model(args, out, cfg, model, history, summary, train_idx, test_idx)


def measure(model, logits, loss, y_tr, x_te, y_te) -> dict:
    """Train loss and accuracy of the step just taken; test loss and accuracy now."""
    model.eval()
    with torch.no_grad():
        te_logits = model(x_te)
        return {"train_loss": float(loss), "train_acc": float((logits.argmax(-1) == y_tr).float().mean()),
                "test_loss": float(F.cross_entropy(te_logits, y_te)),
                "test_acc": float((te_logits.argmax(-1) == y_te).float().mean())}


def save_model(args, out, cfg, model, history, summary, train_idx, test_idx) -> dict:
    """The Fourier analysis, the figure, config.json, then the weights (last: they mark a
    finished run)."""
    model = model.cpu().eval()
    fourier = modadd.fourier_analysis(model, train_idx=train_idx)
    model.float()
    cfg_json = {"model": modadd.config_dict(cfg), "data": {"p": args.p, "train_frac": args.train_frac,
                "split_seed": args.seed, "n_train": len(train_idx), "n_test": len(test_idx),
                "sequence": "[a, b, =]", "eq_token": args.p, "loss_position": "= only"},
                "summary": summary, **provenance(args, seed=args.seed)}
    save_json(fourier, out / "fourier.json")
    plot(history, modadd.embedding_frequency_norms(model.W_E.detach(), args.p), fourier, out / "fourier.png")
    save_json(cfg_json, out / "config.json")
    save_tensors(dict(model.state_dict()), out / "model.safetensors",
                 metadata={"config": cfg_json["model"], "code_version": cfg_json["code_version"]})
    return summary | {"key_frequencies": fourier["key_frequencies"]}


def plot(history, norms, fourier, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].bar(range(1, len(norms)), norms[1:].numpy(), color="tab:blue")
    for k in fourier["key_frequencies"]:
        ax[0].bar([k], [float(norms[k])], color="tab:red")
    ax[0].set(title=f"W_E Fourier norms (key: {fourier['key_frequencies']})", xlabel="frequency k", ylabel="norm")
    ax[1].semilogy(steps, [r["train_loss"] for r in history], label="train")
    ax[1].semilogy(steps, [r["test_loss"] for r in history], label="test")
    ax[1].set(title="loss", xlabel="step"); ax[1].legend()
    ax[2].plot(steps, [r["train_acc"] for r in history], label="train")
    ax[2].plot(steps, [r["test_acc"] for r in history], label="test")
    ax[2].set(title="accuracy", xlabel="step", ylim=(0, 1.02)); ax[2].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def main(argv=None):
    args = parse_args(argv)
    s = train(args)
    print(f"{args.out}: {s['steps']} steps in {s['train_time_s']} s, test acc {s['final']['test_acc']:.4f}, "
          f"grokked={s['grokked']}, key frequencies {s['key_frequencies']}")


if __name__ == "__main__":
    run_main(main)
