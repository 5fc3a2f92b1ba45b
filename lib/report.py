"""Write results/REPORT.md from the eval.json (04) and overlap.json (05) files under --results.

    python -m lib.report --results results [--out results/REPORT.md] [--elapsed SECONDS]

One table per (target, model run): a row per architecture with mean +- std over SAE seeds of
EV, L0, dead %, dense %, loss recovered, and the Fourier purity / key coverage / recovery MCC
each beside its random-decoder and PCA baselines; then seed-to-seed overlap beside its isotropic
and subspace chance levels. The checks the study promises (TopK: EV > 0.9, L0 in 10-50, dead < 10%,
Fourier MCC well above chance) are printed as PASS / MISS lines, never tuned to pass.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from lib.common import ArgumentParser, check, load_json, run_main

ARCH_ORDER = ["topk", "batchtopk", "relu", "jumprelu"]


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/REPORT.md")
    ap.add_argument("--elapsed", type=float, default=None, help="wall time of the run (run_all.sh passes it)")
    ap.add_argument("--title", default="SAE study report")
    ap.add_argument("--exclude", type=Path, action="append", default=[], help="skip results under this folder")
    args = ap.parse_args(argv)
    check(args.results.is_dir(), f"--results {args.results} is not a directory")
    args.out = args.out or args.results / "REPORT.md"
    return args


def ms(vals, fmt="{:.3f}", scale=1.0):
    vals = [v * scale for v in vals if isinstance(v, (int, float)) and v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.fmean(vals))} ± {fmt.format(statistics.pstdev(vals))}"


def mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and v == v]
    return statistics.fmean(vals) if vals else float("nan")


def get(d, *path, default=float("nan")):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def rel(path, base: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), base.resolve())
    except ValueError:
        return str(path)


def group_key(e: dict) -> tuple[str, str]:
    return (e.get("target", "?"), e.get("run") or str(Path(e.get("acts", "?")).parent))


def eval_table(evals: list[dict]) -> tuple[list[str], dict]:
    by_arch = defaultdict(list)
    for e in evals:
        by_arch[e["sae"]["arch"]].append(e)
    archs = sorted(by_arch, key=lambda a: (ARCH_ORDER.index(a) if a in ARCH_ORDER else 99, a))
    lines = ["| arch | SAEs (seeds) | d_sae | EV | L0 | dead % (held-out rows) | dead % (all rows) | dense % | loss recovered | KL (SAE / zero) | "
             "pure latents: SAE / random / PCA | key coverage: SAE / random / PCA | Fourier MCC: SAE / random / PCA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    stats = {}
    for arch in archs:
        es = by_arch[arch]
        seeds = sorted(str(e["sae"].get("seed")) for e in es)
        def col(*path):
            return [get(e, *path) for e in es]
        down = "heldout" if any(get(e, "downstream", "heldout", default=None) for e in es) else None
        lr = col("downstream", down, "loss_recovered") if down else col("downstream", "loss_recovered")
        kls = col("downstream", down, "kl_sae") if down else col("downstream", "kl_sae")
        klz = col("downstream", down, "kl_zero") if down else col("downstream", "kl_zero")
        row = [arch, f"{len(es)} ({', '.join(seeds)})", str(es[0]["sae"]["d_sae"]),
               ms(col("reconstruction", "explained_variance")), ms(col("sparsity", "l0"), "{:.1f}"),
               ms(col("sparsity", "dead_fraction"), "{:.1f}", 100),
               ms(col("sparsity", "dead_fraction_all_rows"), "{:.1f}", 100),
               ms(col("sparsity", "dense_fraction"), "{:.1f}", 100),
               ms(lr), f"{ms(kls, '{:.4f}')} / {ms(klz, '{:.2f}')}"]
        for key in ("fraction_pure", "key_coverage", "mcc"):
            row.append(f"{ms(col('fourier', key))} / {ms(col('fourier', 'random_baseline', key, 'mean'))} / "
                       f"{ms(col('fourier', 'pca_baseline', key))}")
        lines.append("| " + " | ".join(row) + " |")
        stats[arch] = {"ev": mean(col("reconstruction", "explained_variance")), "l0": mean(col("sparsity", "l0")),
                       "dead": mean(col("sparsity", "dead_fraction")), "lr": mean(lr),
                       "mcc": mean(col("fourier", "mcc")), "mcc_rand": mean(col("fourier", "random_baseline", "mcc", "mean")),
                       "mcc_rand_max": max([v for v in col("fourier", "random_baseline", "mcc", "max") if v == v],
                                           default=float("nan")),
                       "mcc_pca": mean(col("fourier", "pca_baseline", "mcc")),
                       "pure": mean(col("fourier", "fraction_pure")),
                       "pure_rand": mean(col("fourier", "random_baseline", "fraction_pure", "mean")),
                       "coverage": mean(col("fourier", "key_coverage")), "n": len(es),
                       "density": [e.get("figures", {}).get("density") for e in es]}
    return lines, stats


def overlap_table(overlaps: list[dict]) -> list[str]:
    lines = ["| SAEs | pairs | PW-MCC (signed) | chance: subspace / isotropic | excess over subspace | "
             "mean max \\|cos\\| | chance: subspace / isotropic | shared (cos > 0.7 enc & dec) | chance (subspace) | "
             "matched act. corr (random pairs) | r (99% var) | PW-MCC of decoders projected on the subspace "
             "(mean row norm inside it) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for o in overlaps:
        archs = sorted({s["arch"] for s in o["saes"]})
        s, bs, bi, ex = o["summary"], o["baseline_subspace"], o["baseline_isotropic"], o["excess_over_subspace"]
        def f(d, k, fmt="{:.3f}"):
            m, sd = get(d, k, "mean"), get(d, k, "std")
            if m != m:
                return "n/a"
            return f"{fmt.format(m)} ± {fmt.format(sd)}" if get(d, k, "n", default=1) > 1 else fmt.format(m)
        lines.append("| " + " | ".join([
            f"{'+'.join(archs)} × {len(o['saes'])}", str(len(o["pairs"])),
            f(s, "pw_mcc"), f"{get(bs, 'pw_mcc', 'mean'):.3f} / {get(bi, 'pw_mcc', 'mean'):.3f}", f(ex, "pw_mcc"),
            f(s, "mean_max_abs_cos"),
            f"{get(bs, 'mean_max_abs_cos', 'mean'):.3f} / {get(bi, 'mean_max_abs_cos', 'mean'):.3f}",
            f(s, "shared_fraction"), f"{get(bs, 'shared_fraction', 'mean'):.3f}",
            f"{f(s, 'act_corr')} ({get(s, 'act_corr_random_pairs', 'mean'):.3f})",
            str(get(o, "effective_subspace", "r")),
            f"{f(s, 'pw_mcc_projected')} ({get(s, 'decoder_norm_in_subspace', 'mean'):.2f})"]) + " |")
    return lines


def checks(stats: dict) -> list[str]:
    out = []
    t = stats.get("topk")
    if t is None:
        return ["- (no TopK SAEs in this group: the TopK checks do not apply)"]
    def line(ok, text):
        out.append(f"- **{'PASS' if ok else 'MISS'}** {text}")
    line(t["ev"] > 0.9, f"TopK EV > 0.9: mean {t['ev']:.4f}")
    line(10 <= t["l0"] <= 50, f"TopK L0 within 10-50: mean {t['l0']:.1f}")
    line(t["dead"] < 0.10, f"TopK dead < 10% (never active on the held-out rows): mean {100 * t['dead']:.1f}%")
    if t["mcc"] == t["mcc"]:
        well = t["mcc"] > t["mcc_rand_max"] + 0.1
        line(well, f"TopK Fourier-recovery MCC well above its random baseline (> the highest random draw + 0.1): "
                   f"{t['mcc']:.3f} vs random {t['mcc_rand']:.3f} (max draw {t['mcc_rand_max']:.3f}); "
                   f"PCA basis {t['mcc_pca']:.3f}")
    return out


def main(argv=None):
    args = parse_args(argv)
    base = args.out.parent
    evals, overlaps = [], []
    excl = [e.resolve() for e in args.exclude]

    def skip(p: Path) -> bool:
        return any(p.resolve().is_relative_to(e) for e in excl)
    for p in sorted(args.results.rglob("eval.json")):
        if skip(p):
            continue
        e = load_json(p, "eval.json")
        if isinstance(e, dict) and "sae" in e and "reconstruction" in e:
            e["_path"] = str(p)
            evals.append(e)
    for p in sorted(args.results.rglob("overlap.json")):
        if skip(p):
            continue
        o = load_json(p, "overlap.json")
        if isinstance(o, dict) and "summary" in o:
            o["_path"] = str(p)
            overlaps.append(o)
    check(evals or overlaps, f"--results {args.results} holds no eval.json or overlap.json")

    md = [f"# {args.title}", ""]
    if args.elapsed is not None:
        md += [f"Wall time of the run that wrote this: {args.elapsed / 60:.1f} min ({args.elapsed:.0f} s).", ""]
    md += ["Metrics are defined once in `metrics.py` (formula in each docstring). EV = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² "
           "(SAEBench, pooled over dimensions) on the SAE-held-out rows; dead = never active on those rows; "
           "dense = active on > 10%. Loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) with the "
           "reconstruction spliced in at its site (held-out rows). Purity: share of a latent's non-constant variance "
           "over the p × p grid carried by one frequency (`modadd.grid_frequency_purity`); pure = purity ≥ 0.8; "
           "coverage = share of the model's key frequencies with ≥ 1 pure latent; Fourier MCC = ground-truth "
           "cos/sin directions of k·a, k·b, k·(a+b) per key k, Hungarian-matched to decoder rows on |cos|. "
           "Random = TopK SAEs of the same shape with random unit decoder rows (k ≈ the SAE's L0); PCA = the "
           "activations' principal directions. Overlap: PW-MCC is Hungarian on the *signed* decoder cosine; "
           "chance levels are random unit dictionaries of the same shape, isotropic in R^d and inside the top-r "
           "principal subspace holding 99% of the variance (mean-max: analytic; the rest: Monte Carlo).", ""]

    groups = defaultdict(list)
    for e in evals:
        groups[group_key(e)].append(e)
    ov_groups = defaultdict(list)
    for o in overlaps:
        ov_groups[str(Path(o["_path"]).parent.parent.parent)].append(o)
    for (target, run), es in sorted(groups.items()):
        md += [f"## {target}: {run}", ""]
        if run and (Path(run) / "fourier.json").is_file():
            fj = load_json(Path(run) / "fourier.json")
            md += [f"Model key frequencies (fourier.json): {fj.get('key_frequencies')}; "
                   f"restricted loss {get(fj, 'restricted_loss'):.4g}, excluded loss {get(fj, 'excluded_loss'):.4g}.", ""]
            if (Path(run) / "fourier.png").is_file():
                md += [f"![model Fourier structure]({rel(Path(run) / 'fourier.png', base)})", ""]
        lines, stats = eval_table(es)
        md += ["### Per architecture (mean ± std over SAE seeds)", ""] + lines + [""]
        md += ["### Checks", ""] + checks(stats) + [""]
        figs = []
        for arch, st in stats.items():
            d = next((x for x in st["density"] if x), None)
            if d:
                figs.append(f"![{arch} density]({rel(d, base)})")
        if figs:
            md += ["### Latent density (first seed per architecture)", ""] + figs + [""]
    if overlaps:
        md += ["## Seed-to-seed overlap", ""] + overlap_table(overlaps) + [""]
        md += ["Headline: PW-MCC in excess of the subspace chance level (column 5).", ""]
        for o in overlaps:
            h = o.get("figures", {}).get("heatmaps")
            if h:
                archs = "+".join(sorted({s["arch"] for s in o["saes"]}))
                md += [f"![{archs} overlap]({rel(h, base)})"]
        md += [""]
    md += ["## Sources", ""] + [f"- {rel(e['_path'], base)}" for e in evals] + \
          [f"- {rel(o['_path'], base)}" for o in overlaps] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(evals)} evaluations, {len(overlaps)} overlap studies)")


if __name__ == "__main__":
    run_main(main)
