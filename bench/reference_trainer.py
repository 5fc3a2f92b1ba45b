"""Is the study measuring SAEs or our trainer? All four architectures trained a second way, by the
published recipes that saprmarks/dictionary_learning implements (trainers/top_k.py, batch_top_k.py,
jumprelu.py; for ReLU, Anthropic's April 2024 update), written out plainly here (dense maths, one
loop each), and scored like 03's SAEs.

    .venv/bin/python bench/reference_trainer.py                          # topk + batchtopk, k 2 / 256, seeds 1-3
    .venv/bin/python bench/reference_trainer.py --archs batchtopk --seeds 1 2 3 4 5 --jobs 2
    .venv/bin/python bench/reference_trainer.py --archs jumprelu --k 3 --d-sae 384 --lr 1.96e-3
    .venv/bin/python bench/reference_trainer.py --archs relu --k 3 --d-sae 384 --lr 1.96e-3 --l1 4 5

For each arch and seed it trains (1) 03_train_sae.py with its defaults and (2) the reference
recipe below on the same SAE-train rows, then prints per run: held-out EV (each arch's
inference code), L0, dead latents (never active on any of the site's rows), ground-truth features
recovered at cos > 0.9 (answer, or operand at a site without answer features; --feature), steps, seconds.

The reference recipe, dictionary_learning's defaults (Gao et al. 2024; Bussmann et al. 2024):
  * W_dec rows random unit vectors, W_enc = W_dec^T, b_enc = 0, b_dec = geometric median of
    the first batch; inputs scaled to mean squared norm d_in (its normalize_activations);
  * code: ReLU, then the k largest per row (topk) or the k * B largest over the batch
    (batchtopk; at inference pre > threshold, the EMA (beta 0.999, from step 1000) of the
    smallest kept activation);
  * loss |x - x_hat|^2 + AuxK / 32, AuxK over latents not fired for --dead-tokens (10M there:
    on this 11,492-row site that never triggers within the run; --dead-tokens 11492 is 03's
    window), k_aux = d_in / 2, normalised by the residual's variance;
  * Adam (0.9, 0.999), lr 2e-4 / sqrt(d_sae / 2^14), 1,000 warmup steps, linear decay to 0 over
    the last 20%; gradient parallel to the decoder rows removed, gradient norm clipped at 1,
    decoder rows renormalised each step; a fixed length (--rows).
ReLU's recipe: train_reference_relu's docstring; its l1 is fixed, so --l1 lists values that bracket
L0 = k. JumpReLU's recipe: train_reference_jumprelu's docstring. At its lr, 7e-5, L0 is still 77 (k 3) after
this site's 8M rows, so --lr sets another (1.96e-3 is 03's default at 384 latents, batch 1024).
What differs from 03 is the point: 03's init, lr, plateau schedule, dead window and AuxK
details are its own (03's docstring), so agreement means the figure is the SAE's, not 03's.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib import metrics as M  # noqa: E402
from lib.activations import open_acts  # noqa: E402
from sae import SAE, geometric_median  # noqa: E402


def code(pre: torch.Tensor, arch: str, k: int) -> torch.Tensor:
    """ReLU then top-k per row (topk) or top k*B over the batch (batchtopk): [B, d] -> [B, d]."""
    r = pre.relu()
    if arch == "topk":
        v, i = r.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(r).scatter(-1, i, v)
    v, i = r.flatten().topk(k * r.shape[0], sorted=False)
    return torch.zeros_like(r).flatten().scatter(0, i, v).view_as(r)


def _start(d_sae: int, d_in: int, g: torch.Generator):
    """dictionary_learning's start: W_dec rows random unit vectors, W_enc = W_dec^T, zero biases."""
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = W_dec.detach().t().clone().requires_grad_()
    return W_enc, torch.zeros(d_sae, requires_grad=True), W_dec, torch.zeros(d_in, requires_grad=True)


def _adam(params, lr: float, betas, steps: int):
    """Adam with 1,000 linear warmup steps and a linear decay to 0 over the last 20% of the steps."""
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    decay_start = int(0.8 * steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 1000, 1.0) if s < decay_start else (steps - s) / (steps - decay_start))


def _batches(x: torch.Tensor, batch: int, steps: int, g: torch.Generator):
    """steps batches of rows of x, shuffled passes (a pass's last partial batch is skipped)."""
    order, pos = torch.randperm(len(x), generator=g), 0
    for step in range(steps):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=g), 0
        yield step, x[order[pos:pos + batch]]
        pos += batch


def _update(loss, opt, sched, params, W_dec=None) -> None:
    """Backward; with W_dec (unit decoder rows) remove the gradient parallel to them; clip at
    norm 1; step; renormalise W_dec."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if W_dec is not None:
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if W_dec is not None:
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)


def train_reference(x: torch.Tensor, arch: str, k: int, d_sae: int, seed: int, rows: int, batch: int,
                    dead_tokens: int, lr: float | None = None) -> dict:
    """dictionary_learning's TopK / BatchTopK recipe (module docstring) on rows x [N, d_in]
    (already scaled); returns the weights, the inference threshold and the steps taken."""
    g = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    W_enc, b_enc, W_dec, b_dec = params = list(_start(d_sae, d_in, g))
    steps = rows // batch
    opt, sched = _adam(params, lr or 2e-4 / math.sqrt(d_sae / 2 ** 14), (0.9, 0.999), steps)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    threshold, k_aux = -1.0, d_in // 2
    for step, xb in _batches(x, batch, steps, g):
        if step == 0:
            with torch.no_grad():
                b_dec.copy_(geometric_median(xb))
        pre = (xb - b_dec) @ W_enc + b_enc
        f = code(pre, arch, k)
        e = xb - (f @ W_dec + b_dec)
        loss = e.pow(2).sum(-1).mean()
        with torch.no_grad():
            since_fired += batch
            since_fired[(f > 0).any(0)] = 0
            dead = since_fired >= dead_tokens
        if dead.any():                      # AuxK (Gao et al. 2024, App. A.2)
            ka = min(k_aux, int(dead.sum()))
            v, i = torch.where(dead, pre.relu(), -torch.inf).topk(ka, dim=-1, sorted=False)
            e_hat = torch.zeros_like(pre).scatter(-1, i, v) @ W_dec
            r = e.detach()
            aux = (r - e_hat).pow(2).sum(-1).mean() / (r - r.mean(0)).pow(2).sum(-1).mean()
            loss = loss + aux.nan_to_num(0.0) / 32
        _update(loss, opt, sched, params, W_dec)
        with torch.no_grad():
            if arch == "batchtopk" and step > 1000:
                m = float(f[f > 0].min()) if (f > 0).any() else 0.0
                threshold = m if threshold < 0 else 0.999 * threshold + 0.001 * m
    return dict(W_enc=W_enc.detach(), b_enc=b_enc.detach(), W_dec=W_dec.detach(), b_dec=b_dec.detach(),
                threshold=threshold, steps=steps)


class _JumpReLU(torch.autograd.Function):
    """f = z H(z - theta) and H(z - theta) in one, with Rajamanoharan et al. 2024's rectangle-kernel
    pseudo-gradients for theta (written out again here, not sae.JumpReLU: a second implementation)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        on = (z > theta).to(z.dtype)
        return z * on, on

    @staticmethod
    def backward(ctx, g_f, g_on):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(z.dtype) / ctx.eps
        d_theta = -(window * (theta * g_f + g_on)).sum(0)
        return g_f * (z > theta).to(z.dtype), d_theta, None


def train_reference_jumprelu(x: torch.Tensor, k: int, d_sae: int, seed: int, rows: int, batch: int,
                             lr: float | None = None) -> dict:
    """dictionary_learning's JumpReLU recipe (trainers/jumprelu.py) on rows x [N, d_in] (scaled):
    W_dec random unit rows, W_enc = W_dec^T, theta = 0.001, no b_dec subtracted from the input;
    loss |x - x_hat|^2 + (L0 / k - 1)^2 (its target-L0 penalty, coefficient 1, warmed up over
    2,000 steps); bandwidth 0.001; Adam betas (0, 0.999), lr 7e-5, 1,000 warmup steps, decay
    over the last 20%; grad parallel to the decoder rows removed, clipped at norm 1, decoder
    rows renormalised. No dead-latent remedy (it has none)."""
    g = torch.Generator().manual_seed(seed)
    W_enc, b_enc, W_dec, b_dec = _start(d_sae, x.shape[1], g)
    theta = torch.full((d_sae,), 0.001, requires_grad=True)
    params = [W_enc, b_enc, W_dec, b_dec, theta]
    steps = rows // batch
    opt, sched = _adam(params, lr or 7e-5, (0.0, 0.999), steps)
    for step, xb in _batches(x, batch, steps, g):
        f, on = _JumpReLU.apply(xb @ W_enc + b_enc, theta, 0.001)
        l0 = on.sum(-1).mean()
        loss = (xb - (f @ W_dec + b_dec)).pow(2).sum(-1).mean() + (l0 / k - 1).pow(2) * min(1.0, step / 2000)
        _update(loss, opt, sched, params, W_dec)
    return dict(W_enc=W_enc.detach(), b_enc=b_enc.detach(), W_dec=W_dec.detach(), b_dec=b_dec.detach(),
                threshold=theta.detach(), b_dec_in=False, steps=steps)


def train_reference_relu(x: torch.Tensor, d_sae: int, seed: int, rows: int, batch: int, lr: float | None,
                         l1: float) -> dict:
    """Anthropic's April 2024 ReLU recipe (Conerly et al. 2024, "Training SAEs"): W_dec rows random
    directions of norm 0.1, W_enc = W_dec^T, no decoder
    constraint, no b_dec subtracted from the input; loss |x - x_hat|^2 + l1 * sum_i f_i |W_dec_i|,
    l1 warmed up over the first 5% of the steps; Adam (0.9, 0.999), lr 5e-5, the schedule of _adam,
    gradient norm clipped at 1. A fixed l1, not steered: its L0 is whatever l1 gives."""
    g = torch.Generator().manual_seed(seed)
    W_enc, b_enc, W_dec, b_dec = params = list(_start(d_sae, x.shape[1], g))
    with torch.no_grad():
        W_dec.mul_(0.1)
        W_enc.mul_(0.1)
    steps = rows // batch
    opt, sched = _adam(params, lr or 5e-5, (0.9, 0.999), steps)
    for step, xb in _batches(x, batch, steps, g):
        f = (xb @ W_enc + b_enc).relu()
        penalty = (f * W_dec.norm(dim=1)).sum(-1).mean() * l1 * min(1.0, step / (0.05 * steps))
        loss = (xb - (f @ W_dec + b_dec)).pow(2).sum(-1).mean() + penalty
        _update(loss, opt, sched, params)               # no decoder constraint
    return dict(W_enc=W_enc.detach(), b_enc=b_enc.detach(), W_dec=W_dec.detach(), b_dec=b_dec.detach(),
                threshold=0.0, b_dec_in=False, steps=steps)


def infer(w: dict, x: torch.Tensor, arch: str, k: int) -> torch.Tensor:
    """The inference code [N, d_sae]: top-k per row (topk), pre > threshold (batchtopk: one
    threshold; jumprelu: one per latent)."""
    pre = ((x - w["b_dec"]) if w.get("b_dec_in", True) else x) @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        return code(pre, "topk", k)
    if arch == "jumprelu":
        return torch.where(pre > w["threshold"], pre, 0.0)
    if arch == "relu":
        return pre.relu()
    return torch.where(pre > max(w["threshold"], 0.0), pre, 0.0)


def features(acts, name: str | None) -> tuple[str, torch.Tensor]:
    """The ground-truth feature set scored: `name`, or answer where the site has it, else operand."""
    gt, _ = G.load_or_fit(acts)
    name = name or ("answer" if "answer" in gt.features else "operand")
    return name, G.ground_truth_features(gt, [name])[name]


def score(w: dict, x: torch.Tensor, train: torch.Tensor, arch: str, k: int, feats: torch.Tensor) -> dict:
    """x: every row of the site, in the units the weights were trained in; feats: unit rows scored."""
    with torch.no_grad():
        acts = infer(w, x, arch, k)
        x_hat = acts @ w["W_dec"] + w["b_dec"]
        best, _ = M.best_feature_match(feats, w["W_dec"].double())
    held = ~train
    return {"ev": M.explained_variance(x[held], x_hat[held]), "l0": M.l0(acts[held]),
            "dead": M.dead_fraction(acts), "recovered": float((best > G.RECOVERY_COS).double().mean())}


def run_reference(job: dict) -> dict:
    torch.set_num_threads(1)
    acts = open_acts(job["acts"])
    x = acts.x.float()
    scale = math.sqrt(x.shape[1] / x[acts.train].pow(2).sum(1).mean())      # mean |x|^2 = d_in
    t0 = time.perf_counter()
    if job["arch"] == "relu":
        w = train_reference_relu(x[acts.train] * scale, job["d_sae"], job["seed"], job["rows"], job["batch"], job["lr"],
                                 job["l1"])
    elif job["arch"] == "jumprelu":
        w = train_reference_jumprelu(x[acts.train] * scale, job["k"], job["d_sae"], job["seed"], job["rows"],
                                     job["batch"], job["lr"])
    else:
        w = train_reference(x[acts.train] * scale, job["arch"], job["k"], job["d_sae"], job["seed"], job["rows"],
                            job["batch"], job["dead_tokens"], job["lr"])
    s = score(w, x * scale, acts.train, job["arch"], job["k"], features(acts, job["feature"])[1])
    return {**job, **s, "steps": w["steps"], "s": time.perf_counter() - t0, "who": "reference"}


def run_03(job: dict) -> dict:
    """03 with its defaults, one seed, scored by the same function on its saved weights."""
    out = Path(job["out"]) / f"{job['arch']}_seed{job['seed']}"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "03_train_sae.py"), "--acts", job["acts"], "--out", str(out), "--arch", job["arch"],
           "--k", str(job["k"]), "--d-sae", str(job["d_sae"]), "--seed", str(job["seed"]), "--threads", "1",
           "--quiet", "--overwrite"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-800:])
    secs = time.perf_counter() - t0
    sae = SAE.load(out)
    acts = open_acts(job["acts"])
    x = acts.x.float()
    w = {"W_enc": sae.W_enc.detach(), "b_enc": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
         "b_dec": sae.b_dec.detach(), "threshold": sae.threshold.detach() if job["arch"] == "jumprelu"
         else float(sae.threshold[0]) if job["arch"] == "batchtopk" else 0.0}
    s = score(w, x, acts.train, job["arch"], job["k"], features(acts, job["feature"])[1])
    summ = json.loads((out / "summary.json").read_text())
    return {**job, **s, "steps": summ["steps"], "s": secs, "who": "03"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", default=str(ROOT / "runs" / "modadd" / "seed42" / "acts" / "resid_post.safetensors"))
    ap.add_argument("--archs", nargs="+", default=["topk", "batchtopk"], choices=["topk", "batchtopk", "jumprelu", "relu"])
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--rows", type=int, default=8_000_000, help="reference: rows trained on (a fixed length)")
    ap.add_argument("--batch", type=int, default=1024, help="reference: batch (03's default on this site)")
    ap.add_argument("--lr", type=float, default=None, help="reference: lr (default: the recipe's)")
    ap.add_argument("--l1", type=float, nargs="+", default=[5.0],
                    help="reference relu: its fixed L1 coefficient(s), one run each (5: Conerly et al. 2024's)")
    ap.add_argument("--dead-tokens", type=int, nargs="+", default=[10_000_000, 11_492],
                    help="reference: AuxK's dead window(s), one reference run each (10M: dictionary_learning's; "
                         "11,492: 03's, one pass over this site's train rows)")
    ap.add_argument("--feature", default=None, help="ground-truth feature set scored (default: answer where the "
                    "site has it, else operand)")
    ap.add_argument("--only", choices=["reference", "03"], default=None, help="train one side only")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "reference_trainer"))
    a = ap.parse_args()
    if not Path(a.acts).is_file():
        raise SystemExit(f"{a.acts} is missing (run_all.sh, or 01 + 02, make it)")
    feature = features(open_acts(a.acts), a.feature)[0]
    base = [dict(acts=a.acts, arch=arch, k=a.k, d_sae=a.d_sae, seed=s, rows=a.rows, batch=a.batch, out=a.out, lr=a.lr,
                 feature=a.feature, dead_tokens=None) for arch in a.archs for s in a.seeds]
    todo = [(run_03, j) for j in base] if a.only in (None, "03") else []
    if a.only in (None, "reference"):    # TopK family: a run per dead window; relu: a run per l1
        todo += [(run_reference, {**j, "dead_tokens": w}) for w in a.dead_tokens for j in base
                 if j["arch"] in ("topk", "batchtopk")]
        todo += [(run_reference, j) for j in base if j["arch"] == "jumprelu"]
        todo += [(run_reference, {**j, "l1": l1}) for l1 in a.l1 for j in base if j["arch"] == "relu"]
    print(f"k {a.k} / {a.d_sae} latents on {a.acts}; reference: {a.rows:,} rows, batch {a.batch}, "
          f"dead window {' and '.join(f'{w:,}' for w in a.dead_tokens)} rows (TopK family); recovered: {feature} features at cos > "
          f"{G.RECOVERY_COS}")
    print(f"{'arch':10s} {'trainer':28s} {'seed':>5s} {'EV':>7s} {'L0':>6s} {'dead':>6s} {'recov':>7s} {'steps':>6s} {'s':>5s}")
    # spawn, not fork: the parent has run torch ops, and a forked child can hang in their thread pool
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        res = [f.result() for f in [ex.submit(fn, j) for fn, j in todo]]
    def label(r):        # the reference's variant: dead window (TopK family) or l1 (relu), lr if not the recipe's
        if r["who"] == "03":
            return "03"
        words = ["reference"]
        if r["arch"] in ("topk", "batchtopk"):
            words.append(f"{r['dead_tokens']:,}")
        elif r["arch"] == "relu":
            words.append(f"l1 {r['l1']:g}")
        return " ".join(words + ([f"lr {r['lr']:g}"] if r["lr"] else []))
    for r in res:
        r["who"] = label(r)
    whos = list(dict.fromkeys(r["who"] for r in sorted(res, key=lambda r: r["who"] != "03")))
    for r in sorted(res, key=lambda r: (r["arch"], whos.index(r["who"]), r["seed"])):
        print(f"{r['arch']:10s} {r['who']:28s} {r['seed']:5d} {r['ev']:7.4f} {r['l0']:6.2f} {100 * r['dead']:5.1f}% "
              f"{100 * r['recovered']:6.1f}% {r['steps']:6d} {r['s']:5.0f}")
    for arch in a.archs:
        for who in whos:
            rs = [r for r in res if r["arch"] == arch and r["who"] == who]
            if rs:
                print(f"{arch:10s} {who:28s} {feature} recovered: lowest seed {100 * min(r['recovered'] for r in rs):.1f}%, "
                      f"mean {100 * sum(r['recovered'] for r in rs) / len(rs):.1f}%; EV mean {sum(r['ev'] for r in rs) / len(rs):.4f}")


if __name__ == "__main__":
    main()
