"""Stage 05: how much do SAEs (different seeds, architectures, or from elsewhere) agree?

    python 05_overlap.py --saes runs/modadd/seed42/sae/topk/seed42 runs/modadd/seed42/sae/topk/seed123 ... \\
        --out results/modadd/seed42/overlap/topk
    python 05_overlap.py --saes DIR_A DIR_B --out results/ab        # any SAEs with the same d_in, weights only

Any two or more SAEs in SAELens's layout with the same d_in can be compared: without
activations (no --acts, and none named by the SAEs' summary.json) 05 reports the decoder and
encoder figures beside isotropic chance; with them it adds the subspace chance, the activation
correlation and, for modular addition, agreement on the site's ground-truth features.

Per pair of SAEs (metrics.py, formulas in the docstrings):
  mean_max_abs_cos   symmetric mean over decoder rows of the max |cos| to the other dictionary
  pw_mcc             Hungarian-matched mean cosine (PW-MCC, Song et al. 2025), matched on the SIGNED
                     cosine (codes are >= 0, so a flipped decoder row is a different latent);
                     pw_mcc_abs matches on |cos| as well, for comparison
  shared_fraction    matched latents with cos > 0.7 on both decoder row and encoder column (Paulo & Belrose 2025)
  act_corr           mean Pearson correlation of matched latents' activations on the same inputs
Each with mean and spread (std, min, max) over pairs, beside random baselines that are computed, not assumed:
  isotropic  random unit dictionaries of the same shapes in R^d_in (mean-max: analytic, exact Beta
             distribution of u_1^2; Hungarian and the rest: Monte Carlo over --n-random draws)
  subspace   the same, drawn isotropically inside the data's effective subspace: the top-r principal
             directions holding --var-frac (99%) of the activations' variance (chance overlap climbs
             steeply as r shrinks). The headline is the overlap in excess of this baseline.
pw_mcc_projected: PW-MCC of the decoder rows projected onto that subspace (a row's part outside it
never meets the data and can keep its random init), beside the same subspace baseline.
Ground truth (modular addition; lib/ground_truth.py, metrics.seed_agreement), per feature set:
  recovered  per SAE, the fraction of features with a decoder row at cos > 0.9
  both       per pair, the fraction recovered by both; every: by every SAE
  pw_mcc_gt  per pair, the mean cosine between the two SAEs' latents matched to the same feature
Writes --out/overlap.json and --out/overlap_heatmaps.png.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch

from lib import ground_truth as G
from lib import metrics as M
from lib.activations import check_width, encode_all, open_acts
from lib.common import ArgumentParser, UserError, check, load_json, provenance, run_main, save_figure, save_json
from sae import SAE


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saes", type=Path, nargs="+", required=True, help="two or more SAE directories")
    ap.add_argument("--out", type=Path, required=True, help="output directory (overlap.json, heatmaps)")
    ap.add_argument("--acts", type=Path, default=None,
                    help="the activations the SAEs were trained on (default: the one their summary.json files "
                         "name, if they agree and it exists; without: decoder and encoder figures only)")
    ap.add_argument("--recovery-cos", type=float, default=0.9, help="ground truth: recovered above this cosine")
    ap.add_argument("--max-rows", type=int, default=20000, help="rows used for activation correlation and PCA")
    ap.add_argument("--var-frac", type=float, default=0.99, help="variance held by the effective subspace")
    ap.add_argument("--threshold", type=float, default=0.7, help="cosine threshold of shared_fraction")
    ap.add_argument("--n-random", type=int, default=5, help="random dictionary pairs per Monte Carlo baseline")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    check(len(args.saes) >= 2, f"--saes needs at least 2 SAE directories to compare (got {len(args.saes)})")
    check(len(set(map(str, args.saes))) == len(args.saes), "--saes lists the same directory twice")
    check(0 < args.var_frac <= 1, "--var-frac must be in (0, 1]")
    check(args.n_random >= 1, "--n-random must be >= 1")
    return args


def find_acts(args) -> tuple[Path | None, str]:
    """--acts, else the activations every SAE's summary.json names (if they agree and it exists)."""
    if args.acts is not None:
        return args.acts, "--acts"
    named = set()
    for d in args.saes:
        s = d / "summary.json"
        acts = load_json(s, "SAE summary").get("config", {}).get("acts") if s.is_file() else None
        named.add(acts)
    if len(named) == 1 and None not in named and Path(next(iter(named))).exists():
        return Path(named.pop()), "named by the SAEs' summary.json"
    why = ("the SAEs' summary.json files name different activations" if len(named - {None}) > 1
           else "no activations given or found")
    return None, why


def load_saes(dirs: list[Path]) -> tuple[list[SAE], list[str], list[dict]]:
    """The SAEs (one d_in), short names for the tables and figures, and what each one is."""
    for d in dirs:
        check(d.is_dir(), f"--saes: {d} is not a directory")
    saes = [SAE.load(d) for d in dirs]
    if len({s.d_in for s in saes}) > 1:
        raise UserError("--saes have different d_in (" + ", ".join(f"{d}: {s.d_in}" for d, s in zip(dirs, saes))
                        + "); overlap needs SAEs of the same activations")
    names, infos = [], []
    for d, s in zip(dirs, saes):
        seed = s.metadata.get("seed")
        names.append(f"{s.arch}/s{seed}" if seed is not None else d.name)
        infos.append({"path": str(d), "arch": s.arch, "d_in": s.d_in, "d_sae": s.d_sae, "k": s.k, "seed": seed,
                      "init": (s.metadata.get("training_config") or {}).get("init")})
        if len(set(names)) < len(names):
            names[-1] = f"{names[-1]}#{len(names)}"
    return saes, names, infos


def pair_metrics(A: dict, B: dict, threshold: float, basis: torch.Tensor | None = None) -> dict:
    dec_a, dec_b = A["dec"], B["dec"]
    shared, r, c = M.matched_both_fraction(dec_a, dec_b, A["enc"], B["enc"], threshold)
    C = M.cosine_matrix(dec_a, dec_b)
    out = {"mean_max_abs_cos": M.mean_max_abs_cos(dec_a, dec_b),
           "pw_mcc": float(C[r, c].mean()),                       # Hungarian on signed cosine
           "pw_mcc_abs": M.hungarian_mcc(dec_a, dec_b, signed=False),
           "shared_fraction": shared}
    if basis is not None:
        # Decoder rows projected onto the effective subspace (components outside it never meet the
        # data and may keep their random init); compare with the subspace baseline.
        pa, pb = dec_a @ basis.T, dec_b @ basis.T
        out["pw_mcc_projected"] = M.hungarian_mcc(pa, pb, signed=True)
        out["mean_max_abs_cos_projected"] = M.mean_max_abs_cos(pa, pb)
        out["decoder_norm_in_subspace"] = float(0.5 * (pa.norm(dim=1).mean() + pb.norm(dim=1).mean()))
    if A.get("codes") is not None and B.get("codes") is not None:
        out["act_corr"] = M.matched_activation_correlation(A["codes"], B["codes"], r, c)
        perm = torch.randperm(len(c), generator=torch.Generator().manual_seed(1))
        out["act_corr_random_pairs"] = M.matched_activation_correlation(A["codes"], B["codes"], r, c[perm])
    return out


def random_baseline(n_a: int, n_b: int, d: int, n_random: int, g: torch.Generator, threshold: float,
                    basis: torch.Tensor | None = None) -> dict:
    """Overlap of independent random dictionaries (tied: encoder = decoder), averaged over draws."""
    draws = []
    for _ in range(n_random):
        A = M.random_unit_rows(n_a, d, g, basis)
        B = M.random_unit_rows(n_b, d, g, basis)
        shared, r, c = M.matched_both_fraction(A, B, A, B, threshold)
        C = M.cosine_matrix(A, B)
        draws.append({"mean_max_abs_cos": M.mean_max_abs_cos(A, B), "pw_mcc": float(C[r, c].mean()),
                      "pw_mcc_abs": M.hungarian_mcc(A, B, signed=False), "shared_fraction": shared})
    dim = d if basis is None else basis.shape[0]
    out = {k: float(sum(x[k] for x in draws) / len(draws)) for k in draws[0]}
    out["mean_max_abs_cos_mc"] = out.pop("mean_max_abs_cos")
    out["mean_max_abs_cos"] = M.analytic_mean_max_abs_cos(n_a, n_b, dim)
    out["dimension"] = dim
    out["n_draws"] = n_random
    return out


def spread(vals: list[float]) -> dict:
    vals = [v for v in vals if v == v]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def heatmaps(names: list[str], mats: dict, path: Path) -> Path:
    """One pairwise matrix per panel; each title carries its chance level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(names)
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8))
    axes = [axes] if len(mats) == 1 else axes
    for ax, (title, m) in zip(axes, mats.items()):
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i][j] < 0.6 else "black")
        ax.set_xticks(range(n), names, rotation=60, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def ground_truth_agreement(gt: G.GroundTruth, saes: list[SAE], x: torch.Tensor, threshold: float) -> dict:
    """Per ground-truth feature set: what each SAE recovers, what pairs and all of them share."""
    out = {}
    for name, F in G.ground_truth_features(gt).items():
        ag = M.seed_agreement(F, [s.W_dec.detach().double() for s in saes], threshold)
        chance = G.chance_levels(gt, x, saes[0].d_sae, seeds=(0,), names=[name], threshold=threshold)
        out[name] = {"n_features": len(F), "recovered": ag["recovered"], "recovered_mean": spread(ag["recovered"]),
                     "both": spread([q["both"] for q in ag["pairs"]]), "every": ag["every"],
                     "pw_mcc_gt": spread([q["pw_mcc_gt"] for q in ag["pairs"]]), "pairs": ag["pairs"],
                     "chance_recovered": {b: chance[b][name]["recovered"]
                                          for b in ("random_isotropic", "random_pca_subspace", "pca_signed")}}
    return out


def pair_matrix(n: int, pairs: list, value) -> list:
    mat = [[1.0] * n for _ in range(n)]
    for (i, j), p in zip(itertools.combinations(range(n), 2), pairs):
        mat[i][j] = mat[j][i] = value(p)
    return mat


METRIC_KEYS = ("mean_max_abs_cos", "pw_mcc", "pw_mcc_abs", "shared_fraction")


def compare_pairs(saes, names, dicts, args, basis) -> list[dict]:
    """Every pair of SAEs: pair_metrics, each beside the chance of random decoders of the same
    widths (isotropic, and inside the data's effective subspace when there is one)."""
    d_in, n = saes[0].d_in, len(saes)
    g = torch.Generator().manual_seed(args.seed)
    base_cache = {}

    def baselines(n_a, n_b):
        key = (min(n_a, n_b), max(n_a, n_b))
        if key not in base_cache:
            base_cache[key] = {"isotropic": random_baseline(key[0], key[1], d_in, args.n_random, g, args.threshold)}
            if basis is not None:
                base_cache[key]["subspace"] = random_baseline(key[0], key[1], d_in, args.n_random, g, args.threshold,
                                                              basis)
        return base_cache[key]

    pairs = []
    for i, j in itertools.combinations(range(n), 2):
        m = pair_metrics(dicts[i], dicts[j], args.threshold, basis)
        base = baselines(saes[i].d_sae, saes[j].d_sae)
        if "subspace" in base:
            m["excess_over_subspace"] = {k: m[k] - base["subspace"][k] for k in METRIC_KEYS}
        pairs.append({"a": names[i], "b": names[j], "a_path": str(args.saes[i]), "b_path": str(args.saes[j]),
                      **m, "baselines": base})
        if not args.quiet:
            print(f"{names[i]} vs {names[j]}: mean-max {m['mean_max_abs_cos']:.3f}, PW-MCC {m['pw_mcc']:.3f}, "
                  f"shared {m['shared_fraction']:.3f}, act corr {m.get('act_corr', float('nan')):.3f}")
    return pairs


def draw_heatmaps(names, pairs, agreement, chance_of, subspace: bool, args) -> Path:
    """The pair matrices (decoder agreement, and ground-truth features recovered by both) as one figure."""
    n = len(names)
    mats = {f"{title}\n({'subspace' if subspace else 'isotropic'} chance {chance_of[key]['mean']:.3f})":
            pair_matrix(n, pairs, lambda p, key=key: p[key])
            for title, key in (("mean max |cos|", "mean_max_abs_cos"), ("PW-MCC (signed)", "pw_mcc"),
                               ("shared (cos > %.1f enc & dec)" % args.threshold, "shared_fraction"))}
    for name, a in (agreement or {}).items():
        mats[f"{name} features recovered by both\n(random-decoder chance {a['chance_recovered']['random_isotropic']:.2f})"] = \
            pair_matrix(n, a["pairs"], lambda q: q["both"])
    return heatmaps(names, mats, args.out / "overlap_heatmaps.png")


def main(argv=None):
    args = parse_args(argv)
    saes, names, infos = load_saes(args.saes)
    d_in = saes[0].d_in
    acts, acts_from = find_acts(args)
    x = data = gt = basis = None
    if acts is not None:
        data = open_acts(acts)
        check_width(data, d_in, "the SAEs")
        x = data.sample_rows(args.max_rows)
        comps, ratio, r = M.pca_basis(x, args.var_frac)
        basis = comps[:r]
        if data.kind == "file" and {"a", "b"} <= set(data.labels):
            gt, gt_from = G.load_or_fit(data)
    dicts = [{"dec": s.W_dec.detach().double(), "enc": s.W_enc.detach().T.double(),
              "codes": encode_all(s, x)[0] if x is not None else None} for s in saes]

    pairs = compare_pairs(saes, names, dicts, args, basis)

    summary = {k: spread([p.get(k, float("nan")) for p in pairs])
               for k in METRIC_KEYS + ("act_corr", "act_corr_random_pairs", "pw_mcc_projected",
                                       "mean_max_abs_cos_projected", "decoder_norm_in_subspace")}
    base_iso = {k: spread([p["baselines"]["isotropic"][k] for p in pairs]) for k in METRIC_KEYS}
    base_sub = {k: spread([p["baselines"]["subspace"][k] for p in pairs]) for k in METRIC_KEYS} if basis is not None else None
    excess = {k: spread([p["excess_over_subspace"][k] for p in pairs]) for k in METRIC_KEYS} if basis is not None else None
    agreement = ground_truth_agreement(gt, saes, x, args.recovery_cos) if gt is not None else None

    fig = draw_heatmaps(names, pairs, agreement, base_sub or base_iso, base_sub is not None, args)

    result = {"saes": infos, "acts": str(acts) if acts else None,
              "inputs": {"saes": [str(d) for d in args.saes], "acts": str(acts) if acts else None,
                         "acts_from": acts_from, "ground_truth": gt_from if gt is not None else None},
              "n_rows": len(x) if x is not None else 0, "d_in": d_in,
              "effective_subspace": ({"var_frac": args.var_frac, "r": r, "variance_captured": float(ratio[:r].sum())}
                                     if basis is not None else None),
              "headline": ({"pw_mcc_excess_over_subspace": excess["pw_mcc"],
                            "mean_max_abs_cos_excess_over_subspace": excess["mean_max_abs_cos"]} if excess else
                           {"pw_mcc_excess_over_isotropic": spread([p["pw_mcc"] - p["baselines"]["isotropic"]["pw_mcc"]
                                                                    for p in pairs])}),
              "summary": summary, "baseline_isotropic": base_iso, "baseline_subspace": base_sub,
              "excess_over_subspace": excess, "ground_truth": agreement, "pairs": pairs,
              "definitions": DEFINITIONS | {"shared_fraction": f"pairs matched by pw_mcc's assignment with decoder "
                                                                f"cos > {args.threshold} and encoder cos > {args.threshold}"},
              "figures": {"heatmaps": str(fig)},
              **provenance(argparse.Namespace(**{**vars(args), "saes": [str(d) for d in args.saes]}),
                           seed=args.seed, sae_seeds=[i["seed"] for i in infos])}
    save_json(result, args.out / "overlap.json")
    if not args.quiet:
        print(summary_line(args.out, result))


DEFINITIONS = {
    "pw_mcc": "Hungarian matching on signed decoder cosine; mean matched cosine",
    "pw_mcc_abs": "Hungarian matching on |cos|; mean matched |cos|",
    "pw_mcc_projected": "pw_mcc of the decoder rows projected onto the effective subspace (compare with the "
                        "subspace baseline); decoder_norm_in_subspace: mean norm of those projections (1 = rows "
                        "lie inside it)",
    "act_corr": "mean Pearson correlation of matched latents' codes on the same rows (act_corr_random_pairs: "
                "the same latents paired at random)",
    "mean_max_abs_cos baseline": "analytic (exact Beta distribution of u_1^2, numerical integral)",
    "ground_truth": "per feature set: recovered = a decoder row at cos > recovery_cos; both / every = recovered "
                    "by both SAEs of a pair / by every SAE; pw_mcc_gt = mean cosine of the two SAEs' latents "
                    "matched to the same recovered feature"}


def summary_line(out: Path, result: dict) -> str:
    s, bi, bs = result["summary"], result["baseline_isotropic"], result["baseline_subspace"]
    line = (f"{out / 'overlap.json'}: PW-MCC {s['pw_mcc']['mean']:.3f} +- {s['pw_mcc']['std']:.3f} "
            f"(chance: isotropic {bi['pw_mcc']['mean']:.3f}")
    if bs:
        line += f", subspace r={result['effective_subspace']['r']} {bs['pw_mcc']['mean']:.3f}"
    line += f"); mean-max {s['mean_max_abs_cos']['mean']:.3f}"
    for name, a in (result["ground_truth"] or {}).items():
        line += f"; {name}: recovered by every SAE {a['every']:.2f}, by both (mean) {a['both']['mean']:.2f}"
    return line


if __name__ == "__main__":
    run_main(main)
