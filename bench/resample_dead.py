"""03_train_sae.py with Bricken et al. 2023's resampling of dead latents added, then scored as
bench/bench_recipe.py scores a row: is resampling the remedy JumpReLU's remaining dead latents need?

    .venv/bin/python bench/resample_dead.py --resample-every 1000 -- \
        --acts runs/modadd/seed42/acts/resid_post.safetensors --out /tmp/rs --arch jumprelu --k 3 --d-sae 384 --seed 1

Every argument after `--` goes to 03 unchanged. Every --resample-every steps, until the run's
final decay starts, each latent dead by 03's rule (not fired for a pass) is reset: its decoder row
to a training row of the current batch minus b_dec, drawn with probability proportional to the
square of that row's squared reconstruction error, unit norm; its encoder column to the same
direction times 0.2 x the mean encoder-column norm of the live latents; its b_enc to 0;
--resample-theta, if given, its JumpReLU threshold; Adam's moments of all of these to 0; its dead
count to 0 (Bricken et al. 2023, "Neuron resampling"). Single-SAE runs only (JumpReLU and ReLU
never stack). 03 itself does not resample: bench/resample_dead_cpu.txt.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))          # bench_recipe, also when imported
from lib.common import load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use
from bench_recipe import score  # noqa: E402


@torch.no_grad()
def resample_(run, x: torch.Tensor, dead_tokens: int, theta: float | None) -> int:
    """Reset run's dead latents toward badly reconstructed rows of x; how many."""
    sae, dead = run.sae, (run.since_fired >= dead_tokens).nonzero().flatten()
    if len(dead) == 0:
        return 0
    sae.eval()
    err = (x - sae(x).x_hat).pow(2).sum(1)
    sae.train()
    idx = torch.multinomial(err.pow(2), len(dead), replacement=len(dead) > len(x))
    v = x[idx] - sae.b_dec
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)                  # [n_dead, d_in]
    alive = run.since_fired < dead_tokens
    enc_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else 1.0
    sae.W_dec[dead] = v * sae.W_dec[dead].norm(dim=1, keepdim=True)      # keeps relu's free row norms
    sae.W_enc[:, dead] = (0.2 * enc_norm * v).t()
    sae.b_enc[dead] = 0.0
    if theta is not None:
        sae.threshold[dead] = theta
    for p in (sae.W_dec, sae.W_enc, sae.b_enc, getattr(sae, "threshold", None)):
        state = run.opt.state.get(p, {}) if isinstance(p, torch.nn.Parameter) else {}
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state and p is sae.W_enc:
                state[name][:, dead] = 0
            elif name in state:
                state[name][dead] = 0
    run.since_fired[dead] = 0
    return len(dead)


def main():
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resample-every", type=int, default=1000, help="steps between resamplings")
    ap.add_argument("--resample-theta", type=float, default=None, help="jumprelu: a resampled latent's threshold")
    args, stage_argv = ap.parse_args(argv[:cut]), argv[cut + 1:]
    stage = load_stage("03_train_sae.py")
    stage_args = stage.get_args(stage_argv)                   # 03's own parser and checks
    if args.resample_theta is not None and stage_args.arch != "jumprelu":
        raise SystemExit("--resample-theta: only jumprelu has a threshold to reset")
    after_step, counts = stage.after_step, []

    def after_step_resampling(sh, run, out, step, x, *rest, **kw):
        done = step + 1
        if done % args.resample_every == 0 and run.schedule.decay_start is None:
            counts.append((done, resample_(run, x, sh.dead_tokens, args.resample_theta)))
        return after_step(sh, run, out, step, x, *rest, **kw)

    stage.after_step = after_step_resampling
    stage.main(stage_argv)
    s = score(stage_args.acts, Path(stage_args.out))
    print(json.dumps({"resampled (step, latents)": counts, **{k: s[k] for k in
                      ("ev", "l0", "dead", "empty", "rec_answer", "steps", "stop") if k in s}}))


if __name__ == "__main__":
    main()
