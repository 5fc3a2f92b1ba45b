"""A site with its ground truth and nothing else: is a goal the trainer's to meet, or the site's?

    .venv/bin/python bench/idealised_site.py --run runs/modadd/seed42 --out runs/idealised/seed42
    .venv/bin/python bench/bench_recipe.py --run runs/idealised/seed42 --out runs/bench_recipe_idealised

For each site of the model run it writes `<out>/acts/<site>.safetensors`: the same rows, labels and
train/held-out split, with every activation replaced by the site's material value tables alone,

    x'(a, b) = mu + sum over the feature sets F of T_F[var_F(a, b)]     (resid_mid: mu + O[a] + O[b])

(lib/ground_truth.py: the tables are the per-value means over the full grid, and a feature set is a
table holding >= 2% of the variance). What the model writes besides them (2.4% of resid_mid's
variance on the seed-42 model, 4.3% of resid_post's: the non-additive rest and the tables under 2%)
is left out. So the site's ground-truth dictionary reconstructs x' exactly: at resid_mid 113 decoder
rows, O[v] / |O[v]|, two active per row with coefficients |O[v]|. Trained there with 03's defaults,
an SAE's dead share, EV and recovery say what the site's structure allows: a latent left dead on x'
has no ground-truth feature of its own to take, and a gap in EV between architectures there is
theirs, not the model's non-additive rest's. `--rest shuffled` adds each row the rest of another row
(a seeded permutation): the rest's distribution without its tie to (a, b), to tell which of the two
a difference comes from; `--rest gaussian` adds isotropic noise of the rest's total variance
instead, and `--rest keep --noise S` the model's activations plus isotropic noise holding S of the site's
variance. Beside each file: its sidecar (with "idealised_from" and the share of the site's variance
the tables hold, "share_kept") and the ground truth refitted on x'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import ground_truth as G  # noqa: E402
from lib.common import load_json, load_tensors, run_main, save_json, save_tensors  # noqa: E402


def idealise(x: torch.Tensor, gt: G.GroundTruth, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mu + the material tables at each row's values ([N, d] float32)."""
    out = gt.mu.expand(len(x), -1).clone()
    for name in gt.features:
        v = G.feature_values(gt, name, a, b)
        T = gt.tables[name]
        out += T[v].sum(1) if v.ndim == 2 else T[v]      # operand: O[a] + O[b]
    return out.float()


def _noise(shape, variance: torch.Tensor, seed: int) -> torch.Tensor:
    """Isotropic Gaussian noise whose mean squared row norm is `variance` x d (float64)."""
    g = torch.Generator().manual_seed(seed)
    return variance.sqrt() * torch.randn(shape, generator=g, dtype=torch.float64)


def write_site(src: Path, dst: Path, rest: str = "none", seed: int = 0, noise: float = 0.0) -> dict:
    t = load_tensors(src, "--run activations")
    gt = G.fit_value_tables(t["activations"], t["a"], t["b"], int(round(len(t["a"]) ** 0.5)))
    x = t["activations"].double()
    tables = idealise(x, gt, t["a"], t["b"]).double()
    the_rest, site_ss = x - tables, (x - gt.mu).pow(2).sum()
    kept = 1.0 - float(the_rest.pow(2).sum() / site_ss)
    if rest == "shuffled":          # another row's rest: its distribution kept, its tie to (a, b) broken
        out = tables + the_rest[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]
    elif rest == "gaussian":        # isotropic noise of the rest's total variance: no structure at all
        out = tables + _noise(x.shape, the_rest.pow(2).sum() / x.numel(), seed)
    elif rest == "keep":            # the model's own activations (to add --noise to)
        out = x
    else:
        out = tables
    if noise > 0:                   # isotropic noise holding `noise` x the site's variance
        out = out + _noise(x.shape, noise * site_ss / x.numel(), seed + 1)
    out = out.float()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({**t, "activations": out}, dst)
    side = load_json(src.with_suffix(".json"), "activations sidecar") if src.with_suffix(".json").is_file() else {}
    info = {"idealised_from": str(src), "features": gt.features, "share_kept": kept, "rest": rest,
            "rest_seed": None if rest == "none" else seed, "noise": noise}
    save_json({**side, **info}, dst.with_suffix(".json"))
    G.save_ground_truth(G.fit_value_tables(out, t["a"], t["b"], gt.p), G.ground_truth_path(dst))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42", help="a model run with acts/")
    ap.add_argument("--sites", nargs="+", default=["resid_mid", "resid_post"])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "idealised" / "seed42")
    ap.add_argument("--rest", choices=["none", "shuffled", "gaussian", "keep"], default="none",
                    help="what stands for the site's non-additive rest: nothing, another row's rest (a seeded "
                         "permutation), isotropic Gaussian noise of the same total variance, or the rest itself (keep)")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="then add isotropic Gaussian noise holding this share of the site's variance")
    ap.add_argument("--seed", type=int, default=0, help="the permutation's or the noise's seed")
    a = ap.parse_args()
    for site in a.sites:
        src = a.run / "acts" / f"{site}.safetensors"
        if not src.is_file():
            raise SystemExit(f"{src} is missing: extract it with 02_extract_activations.py --site {site}")
        info = write_site(src, a.out / "acts" / f"{site}.safetensors", a.rest, a.seed, a.noise)
        print(f"{site}: features {', '.join(info['features'])}; the tables hold {100 * info['share_kept']:.1f}% "
              f"of the site's variance; rest: {a.rest} -> {a.out / 'acts' / (site + '.safetensors')}")


if __name__ == "__main__":
    run_main(main)
