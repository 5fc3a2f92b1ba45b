"""Write results/REPORT.md from the eval.json (04) and overlap.json (05) files under --results.

    python -m lib.report --results results [--out results/REPORT.md] [--elapsed SECONDS]

The report leads with the answer: per site and architecture, the share of the site's
ground-truth features each SAE seed recovers, the share every seed recovers, and the seeds'
agreement, each beside its chance level, followed by sentences generated from those numbers;
then the (k, width) sweep as heatmaps (any eval.json / overlap.json under a `sweep/` folder);
then per site the full table (reconstruction, sparsity, downstream, ground truth, overlap);
then each language-model target with the table that fits it (model, layer, site, tokens; CE
clean / with the SAE / zero-ablated, loss recovered, KL). Goals are PASS / MISS lines, never
tuned to pass.
"""
from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path

from lib.common import ArgumentParser, check, load_json, run_main, save_figure

ARCH_ORDER = ["topk", "batchtopk", "relu", "jumprelu"]
GOAL_EACH, GOAL_EVERY = 0.95, 0.90           # issue "The study answers its question": answer features
CHOOSE_RULE = ("among the sweep cells whose TopK SAEs leave at most 10% of their latents dead on every seed "
               "(all cells if none do), the one that recovers the most answer features with every seed (ties: "
               "fewer latents, then smaller k)")
CHOOSE_MAX_DEAD = 0.10      # the goal of "Every architecture trained right": a mostly dead dictionary is not a study
ONE_MODEL_NOTE = ("These figures come from one modular-addition model. A model of another seed can answer differently "
                  "(README, \"A second model\": on seed 123 TopK misses the goal that it meets on seed 42, and so "
                  "it does on the model seed 42 grows on torch's AVX-512 CPU kernels, which every stage therefore "
                  "avoids: lib.common.pin_cpu_kernels); "
                  "`MODEL_SEEDS=\"42 123\" bash run_all.sh` studies both.")
FIRING_NOTE = ("Recovered by firing: the share of a table's values on whose rows some latent fires at F1 > 0.9, "
               "read off the code. Unlike the decoder cosine of the headline it does not move when every latent "
               "shares a direction with b_dec, which an exact-k code cannot see (README, \"Which basis\").")


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/REPORT.md")
    ap.add_argument("--elapsed", type=float, default=None, help="wall time of the run (run_all.sh passes it)")
    ap.add_argument("--title", default="SAE study report")
    ap.add_argument("--exclude", type=Path, action="append", default=[], help="skip results under this folder")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's preamble (run_all.sh)")
    ap.add_argument("--choose", action="store_true",
                    help="print the study configuration the sweep under --results picks (CHOOSE_RULE) and exit")
    args = ap.parse_args(argv)
    check(args.results.is_dir(), f"--results {args.results} is not a directory")
    args.out = args.out or args.results / "REPORT.md"
    return args


def mean(vals):
    vals = [v for v in vals if isinstance(v, (int, float)) and v == v]
    return statistics.fmean(vals) if vals else float("nan")


def ms(vals, fmt="{:.3f}", scale=1.0):
    vals = [v * scale for v in vals if isinstance(v, (int, float)) and v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.fmean(vals))} ± {fmt.format(statistics.pstdev(vals))}"


def pct(v) -> str:
    return "n/a" if not isinstance(v, (int, float)) or v != v else f"{100 * v:.0f}%"


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


def arch_label(info: dict) -> str:
    """An SAE's name in the report: its arch, with its init when not 03's default (run_all.sh's
    ARCHS variant "topk-data" is TopK trained with --init data)."""
    init = info.get("init")
    return info["arch"] if init in (None, "tied") else f"{info['arch']}-{init}"


def split_label(label: str) -> tuple[str, str | None]:
    """arch_label's inverse: (arch, init), init None for 03's default."""
    arch, _, init = label.partition("-")
    return arch, init or None


def arch_key(a: str):
    base = split_label(a)[0]
    return (ARCH_ORDER.index(base) if base in ARCH_ORDER else 99, a)


def site_name(e: dict) -> str:
    s = e.get("site") or {}
    if s.get("site"):
        return f"{s['site']}" + (f" (layer {s['layer']})" if s.get("layer") not in (None, 0) else "")
    return Path(e.get("acts", "?")).stem


def config_of(e: dict) -> tuple:
    return (arch_label(e["sae"]), e["sae"].get("k"), e["sae"]["d_sae"])


# ----------------------------------------------------------------------------
# Collecting

def collect(args):
    evals, overlaps = [], []
    excl = [e.resolve() for e in args.exclude]

    def skip(p: Path) -> bool:
        return any(p.resolve().is_relative_to(e) for e in excl)
    for p in sorted(args.results.rglob("eval.json")):
        e = load_json(p, "eval.json")
        if not skip(p) and isinstance(e, dict) and "sae" in e and "reconstruction" in e:
            e["_path"], e["_sweep"] = str(p), "sweep" in p.relative_to(args.results).parts
            evals.append(e)
    for p in sorted(args.results.rglob("overlap.json")):
        o = load_json(p, "overlap.json")
        if not skip(p) and isinstance(o, dict) and "summary" in o:
            o["_path"], o["_sweep"] = str(p), "sweep" in p.relative_to(args.results).parts
            overlaps.append(o)
    check(evals or overlaps, f"--results {args.results} holds no eval.json or overlap.json")
    return evals, overlaps


def overlap_for(overlaps: list, evals: list) -> dict | None:
    """The overlap study over exactly these SAEs (by path), if there is one."""
    paths = {e["sae"]["path"] for e in evals}
    for o in overlaps:
        if {s["path"] for s in o["saes"]} == paths:
            return o
    return None


# ----------------------------------------------------------------------------
# The answer: ground-truth recovery and seed agreement per site and architecture

def answer_rows(es: list, overlaps: list) -> tuple[list, dict]:
    """Per (arch, k, d_sae) of one site: per-seed recovery, every-seed recovery, agreement."""
    by_cfg = defaultdict(list)
    for e in es:
        by_cfg[config_of(e)].append(e)
    rows = {}
    for cfg, group in sorted(by_cfg.items(), key=lambda kv: (arch_key(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        o = overlap_for(overlaps, group)
        feats = get(group[0], "ground_truth", "features", default=[])
        r = {"n": len(group), "seeds": sorted(str(e["sae"].get("seed")) for e in group),
             "ev": [get(e, "reconstruction", "explained_variance") for e in group],
             "l0": [get(e, "sparsity", "l0") for e in group],
             "dead": [get(e, "sparsity", "dead_fraction_all_rows") for e in group], "features": {},
             "empty": [get(e, "sparsity", "empty_fraction_all_rows") for e in group],
             "kl_empty": [get(e, "downstream", "all", "kl_share_empty_rows") for e in group],
             "pw_mcc": get(o, "summary", "pw_mcc", "mean"), "pw_mcc_sub": get(o, "baseline_subspace", "pw_mcc", "mean"),
             "overlap": o}
        for f in feats:
            r["features"][f] = {"each": [get(e, "ground_truth", "sae", f, "recovered") for e in group],
                                "mcc": [get(e, "ground_truth", "sae", f, "mcc") for e in group],
                                "selectivity": [get(e, "ground_truth", "sae", f, "selectivity") for e in group],
                                "firing": [get(e, "ground_truth", "sae", f, "recovered_firing") for e in group],
                                "plane": [get(e, "ground_truth", "sae", f, "plane_share") for e in group],
                                "chance": mean([get(e, "ground_truth", "chance", "random_isotropic", f, "recovered")
                                                for e in group]),
                                "chance_sub": mean([get(e, "ground_truth", "chance", "random_pca_subspace", f,
                                                        "recovered") for e in group]),
                                "chance_pca": mean([get(e, "ground_truth", "chance", "pca_signed", f, "recovered")
                                                    for e in group]),
                                "every": get(o, "ground_truth", f, "every", default=None),
                                "both": get(o, "ground_truth", f, "both", "mean", default=None),
                                "pw_mcc_gt": get(o, "ground_truth", f, "pw_mcc_gt", "mean"),
                                "n_features": get(group[0], "ground_truth", "sae", f, "n_features")}
        for f, x in r["features"].items():        # no 05 over these SAEs (the sweep): from their evals
            if x["every"] is None or x["both"] is None:
                every, both = agreement_from_evals(group, f)
                x["every"] = every if x["every"] is None else x["every"]
                x["both"] = both if x["both"] is None else x["both"]
        rows[cfg] = r
    return list(feats_of(es)), rows


def agreement_from_evals(group: list, f: str) -> tuple[float, float]:
    """Features of set f recovered by every SAE of the group, and by both of a pair (mean over
    pairs), from each eval.json's per-feature best cosine (what 05 reports, without 05)."""
    hits = []
    for e in group:
        best, thr = get(e, "ground_truth", "sae", f, "best_cos", default=None), get(e, "ground_truth", "recovery_cos")
        if not best or len(group) < 2:
            return float("nan"), float("nan")
        hits.append([c > thr for c in best])
    every = statistics.fmean(all(h) for h in zip(*hits))
    pairs = [statistics.fmean(x and y for x, y in zip(hits[i], hits[j]))
             for i in range(len(hits)) for j in range(i + 1, len(hits))]
    return every, statistics.fmean(pairs)


def feats_of(es):
    seen = []
    for e in es:
        for f in get(e, "ground_truth", "features", default=[]):
            if f not in seen:
                seen.append(f)
    return seen


def answer_table(feats: list, rows: dict) -> list[str]:
    head = ["arch", "k / latents", "seeds"]
    for f in feats:
        head += [f"{f}: recovered per seed", f"{f}: by every seed", f"{f}: by both of a pair",
                 f"{f}: PW-MCC of matched latents"]
    head += ["chance (random decoders / in data subspace / ±PCA)", "all-latent PW-MCC (subspace chance)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arch, k, d_sae), r in rows.items():
        cells = [arch, f"{k} / {d_sae}", str(r["n"])]
        chance = []
        for f in feats:
            x = r["features"].get(f)
            if x is None:
                cells += ["n/a"] * 4
                continue
            cells += [ms(x["each"], "{:.0f}%", 100), pct(x["every"]), pct(x["both"]),
                      "n/a" if x["pw_mcc_gt"] != x["pw_mcc_gt"] else f"{x['pw_mcc_gt']:.3f}"]
            chance.append(f"{f} {pct(x['chance'])} / {pct(x['chance_sub'])} / {pct(x['chance_pca'])}")
        cells += ["; ".join(chance) or "n/a",
                  "n/a" if r["pw_mcc"] != r["pw_mcc"] else f"{r['pw_mcc']:.3f} ({r['pw_mcc_sub']:.3f})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_lines(rows: dict) -> list[str]:
    out = []
    for (arch, k, d_sae), r in rows.items():
        x = r["features"].get("answer")
        if x is None:
            continue
        each = [v for v in x["each"] if v == v]
        ok1 = bool(each) and min(each) >= GOAL_EACH
        ok2 = x["every"] == x["every"] and x["every"] >= GOAL_EVERY
        out.append(f"- **{'PASS' if ok1 else 'MISS'}** {arch} (k {k}, {d_sae} latents): every seed recovers "
                   f">= {GOAL_EACH:.0%} of the answer features: lowest seed {pct(min(each) if each else None)} "
                   f"(random decoders {pct(x['chance'])})")
        if r["n"] >= 2:
            out.append(f"- **{'PASS' if ok2 else 'MISS'}** {arch} (k {k}, {d_sae} latents): the {r['n']} seeds "
                       f"together recover >= {GOAL_EVERY:.0%} of them: {pct(x['every'])}")
    return out


def init_note(rows: dict) -> list[str]:
    """What a variant's name means, when the study holds one (arch_label)."""
    inits = sorted({split_label(a)[1] for (a, _, _) in rows} - {None})
    if not inits:
        return []
    return [f"`ARCH-{i}`: the architecture trained with `03_train_sae.py --init {i}`" for i in inits] + \
           ["(every other row starts from 03's default, `--init tied`).", ""]


def sentences(site: str, shares: dict, rows: dict) -> list[str]:
    """What the SAEs found at this site, in words generated from the numbers."""
    out = []
    if shares:
        parts = ", ".join(f"the {n} table {pct(s)}" for n, s in shares.items())
        out.append(f"At {site} the model's own value tables explain the variance as follows: {parts}.")
    for (arch, k, d_sae), r in rows.items():
        bits = []
        for f, x in r["features"].items():
            each, firing = mean(x["each"]), mean(x["firing"])
            by_firing = "" if firing != firing else f"; by firing {pct(firing)}"
            bits.append(f"{pct(each)} of the {x['n_features']} {f} features per seed ({pct(x['every'])} with every "
                        f"seed; random decoders {pct(x['chance'])}{by_firing})")
        if bits:
            out.append(f"{arch} with k {k} and {d_sae} latents recovers " + "; ".join(bits) + ".")
        empty, kl_share = mean(r["empty"]), mean(r["kl_empty"])
        if empty >= 1e-3:                    # a thresholded code can leave a row with no latent at all
            share = "" if kl_share != kl_share else f"; they carry {pct(kl_share)} of its KL over all inputs"
            out.append(f"{arch} leaves {100 * empty:.2f}% of the rows with no active latent (reconstructed as "
                       f"b_dec alone: README, \"Rows with no latent\"){share}.")
    for (label, k, d_sae), r in rows.items():         # a variant beside its architecture's default
        arch, init = split_label(label)
        base, x = rows.get((arch, k, d_sae)), r["features"].get("answer")
        if init and base and x and "answer" in base["features"]:
            y = base["features"]["answer"]
            lo = [min([v for v in z["each"] if v == v], default=None) for z in (x, y)]
            out.append(f"Started from `--init {init}`, {arch} recovers "
                       f"{pct(lo[0])} of the answer features with its lowest seed and {pct(x['every'])} "
                       f"with every seed, against {pct(lo[1])} and {pct(y['every'])} from 03's default init.")
    return out


# ----------------------------------------------------------------------------
# The sweep: heatmaps over (k, width)

def sweep_section(es: list, overlaps: list, site: str, base: Path, figdir: Path) -> list[str]:
    es = [e for e in es if arch_label(e["sae"]) == "topk"] or es      # the sweep is TopK's
    _, rows = answer_rows(es, overlaps)
    feats = feats_of(es)
    if not rows or "answer" not in feats and not feats:
        return []
    f = "answer" if "answer" in feats else feats[0]
    ks = sorted({k for (_, k, _) in rows})
    ws = sorted({w for (_, _, w) in rows})
    grids = {"recovered per seed (mean)": {}, "recovered by every seed": {}}
    for (arch, k, w), r in rows.items():
        x = r["features"].get(f, {})
        grids["recovered per seed (mean)"][(k, w)] = mean(x.get("each", []))
        grids["recovered by every seed"][(k, w)] = x.get("every", float("nan"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(4.6 * 2, 0.5 * len(ks) + 2.2))
    for ax, (title, grid) in zip(axes, grids.items()):
        m = [[grid.get((k, w), float("nan")) for w in ws] for k in ks]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, k in enumerate(ks):
            for j, w in enumerate(ws):
                v = m[i][j]
                label = "" if v != v else f"{100 * v:.0f}"
                if (k, w) == (32, 1024):
                    label += "\nguide"
                ax.text(j, i, label, ha="center", va="center", fontsize=7, color="white" if v != v or v < 0.6 else "black")
        ax.set_xticks(range(len(ws)), [str(w) for w in ws])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("latents (width)")
        ax.set_ylabel("k")
        ax.set_title(f"{site}: {f} features {title} (%)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = save_figure(fig, figdir / f"sweep_{site.split()[0]}.png")
    lines = [f"![sweep {site}]({rel(path, base)})", "",
             f"TopK over k × width at {site}, seeds per cell: {max(r['n'] for r in rows.values())}; "
             f"cells hold the % of the {f} features recovered at cos > 0.9 (chance: random decoders "
             f"{pct(mean([r['features'].get(f, {}).get('chance', float('nan')) for r in rows.values()]))}); "
             "'guide' marks the seed guide's k 32 / 1024 latents. The sweep is a screen: its SAEs train for a "
             "budget (their 03 flags are in the notes above), and a cell whose SAEs reached the --max-tokens cap "
             "before their plateau reads low (README, \"Timing\").", ""]
    lines += sweep_table(rows, f, ks, ws)
    guide = rows.get(("topk", 32, 1024))
    if guide is not None:
        lines += [f"At the seed guide's k 32 / 1024 latents: {pct(mean(guide['features'].get(f, {}).get('each', [])))} "
                  f"of the {f} features per seed, {pct(guide['features'].get(f, {}).get('every'))} by both seeds.", ""]
    if f == "answer":
        lines += choice_lines(rows)
    return lines


def sweep_table(rows: dict, f: str, ks: list, ws: list) -> list[str]:
    """The heatmaps' numbers as text, with each cell's worst-seed dead share (what CHOOSE_RULE reads)."""
    lines = [f"The same cells: {f} features recovered per seed (mean) / by every seed, and the most latents dead on "
             "any seed (all rows):", "", "| k | " + " | ".join(f"{w} latents" for w in ws) + " |",
             "|---|" + "---|" * len(ws)]
    for k in ks:
        cells = []
        for w in ws:
            r = rows.get(("topk", k, w))
            if r is None:
                cells.append("")
                continue
            x = r["features"].get(f, {})
            cells.append(f"{pct(mean(x.get('each', [])))} / {pct(x.get('every'))} ({pct(worst_dead(r))} dead)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def choice_lines(rows: dict) -> list[str]:
    """The study configuration CHOOSE_RULE picks from these cells, and the better-recovering cells it passes over."""
    k, d, every = choose_rows(rows)
    over = [f"k {ck} / {cd} ({pct(e)} by every seed, {pct(dead)} dead)"
            for (_, ck, cd), (e, dead) in sorted(((c, cell_score(r)) for c, r in rows.items()), key=lambda t: (t[0][2], t[0][1]))
            if e > every and dead > CHOOSE_MAX_DEAD]
    text = (f"The study's configuration by the rule (lib/report.py CHOOSE_RULE: {CHOOSE_RULE}): "
            f"k {k} / {d} latents, {pct(every)} of the answer features by every seed.")
    if over:
        text += (f" Cells that recover more but leave more than {pct(CHOOSE_MAX_DEAD)} of their latents dead: "
                 + "; ".join(over) + ".")
    return [text, ""]


def choose(evals: list, overlaps: list) -> tuple[int, int, float]:
    """CHOOSE_RULE over the sweep's TopK cells: (k, d_sae, answer features recovered by every seed)."""
    es = [e for e in evals if arch_label(e["sae"]) == "topk"]
    check(bool(es), "no TopK sweep results to choose from")
    return choose_rows(answer_rows(es, overlaps)[1])


def cell_score(r: dict) -> tuple[float, float]:
    """What CHOOSE_RULE reads of a cell: answer features recovered by every seed (a lone seed: its own) and
    the worst seed's dead share."""
    x = r["features"].get("answer", {})
    every = x.get("every", float("nan"))
    if every != every:                                  # one seed only: its own recovery
        every = min(x.get("each", [0.0]) or [0.0])
    dead = worst_dead(r)
    return every, 0.0 if dead != dead else dead


def worst_dead(r: dict) -> float:
    """A cell's dead share on its worst seed (all rows); nan when no eval recorded one."""
    return max((v for v in r["dead"] if v == v), default=float("nan"))


def choose_rows(rows: dict) -> tuple[int, int, float]:
    """CHOOSE_RULE over answer_rows' cells (one architecture's): (k, d_sae, recovered by every seed)."""
    scored = []
    for (arch, k, d_sae), r in rows.items():
        every, dead = cell_score(r)
        n = r["features"].get("answer", {}).get("n_features") or 113
        scored.append((dead <= CHOOSE_MAX_DEAD, round(every * n), -d_sae, -k, every, k, d_sae))
    allowed = [c for c in scored if c[0]] or scored
    best = max(c[1:] for c in allowed)
    return best[4], best[5], best[3]


# ----------------------------------------------------------------------------
# Full tables

def modadd_table(es: list) -> list[str]:
    by_cfg = defaultdict(list)
    for e in es:
        by_cfg[config_of(e)].append(e)
    lines = ["| arch | k / latents | seeds | EV (held-out) | L0 | dead % (all rows) | dead % (held-out rows) | "
             "rows with no latent % (all rows) | loss recovered | KL (SAE / zero) | selectivity (answer / operand) | "
             "recovered by firing (answer / operand) | plane share (answer) |",
             "|" + "---|" * 13]
    for (arch, k, d_sae), g in sorted(by_cfg.items(), key=lambda kv: (arch_key(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        def col(*path):
            return [get(e, *path) for e in g]
        lines.append("| " + " | ".join([
            arch, f"{k} / {d_sae}", str(len(g)), ms(col("reconstruction", "explained_variance")),
            ms(col("sparsity", "l0"), "{:.1f}"), ms(col("sparsity", "dead_fraction_all_rows"), "{:.1f}", 100),
            ms(col("sparsity", "dead_fraction"), "{:.1f}", 100),
            ms(col("sparsity", "empty_fraction_all_rows"), "{:.2f}", 100), ms(col("downstream", "heldout", "loss_recovered")),
            f"{ms(col('downstream', 'heldout', 'kl_sae'), '{:.4f}')} / {ms(col('downstream', 'heldout', 'kl_zero'), '{:.2f}')}",
            f"{ms(col('ground_truth', 'sae', 'answer', 'selectivity'), '{:.2f}')} / "
            f"{ms(col('ground_truth', 'sae', 'operand', 'selectivity'), '{:.2f}')}",
            f"{ms(col('ground_truth', 'sae', 'answer', 'recovered_firing'), '{:.0f}%', 100)} / "
            f"{ms(col('ground_truth', 'sae', 'operand', 'recovered_firing'), '{:.0f}%', 100)}",
            ms(col("ground_truth", "sae", "answer", "plane_share"), "{:.2f}")]) + " |")
    return lines


def lm_table(es: list) -> list[str]:
    by_cfg = defaultdict(list)
    for e in es:
        by_cfg[config_of(e)].append(e)
    lines = ["| arch | k / latents | seeds | EV (held-out) | L0 | dead % (held-out) | CE clean | CE with SAE | "
             "CE zero-ablated | loss recovered | KL (SAE / zero) | contexts |", "|" + "---|" * 12]
    for (arch, k, d_sae), g in sorted(by_cfg.items(), key=lambda kv: (arch_key(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        def col(*path):
            return [get(e, *path) for e in g]
        lines.append("| " + " | ".join([
            arch, f"{k} / {d_sae}", str(len(g)), ms(col("reconstruction", "explained_variance")),
            ms(col("sparsity", "l0"), "{:.1f}"), ms(col("sparsity", "dead_fraction"), "{:.1f}", 100),
            ms(col("downstream", "ce_clean"), "{:.3f}"), ms(col("downstream", "ce_sae"), "{:.3f}"),
            ms(col("downstream", "ce_zero"), "{:.3f}"), ms(col("downstream", "loss_recovered")),
            f"{ms(col('downstream', 'kl_sae'), '{:.3f}')} / {ms(col('downstream', 'kl_zero'), '{:.2f}')}",
            ms(col("downstream", "contexts"), "{:.0f}")]) + " |")
    return lines


def overlap_table(overlaps: list) -> list[str]:
    lines = ["| SAEs | pairs | PW-MCC (signed) | chance: subspace / isotropic | mean max \\|cos\\| | "
             "chance: subspace / isotropic | shared (cos > 0.7 enc & dec) | matched act. corr (random pairs) | r (99% var) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in overlaps:
        archs = sorted({arch_label(s) for s in o["saes"]}, key=arch_key)
        s, bs, bi = o["summary"], o.get("baseline_subspace") or {}, o["baseline_isotropic"]

        def f(d, k, fmt="{:.3f}"):
            m, sd = get(d, k, "mean"), get(d, k, "std")
            if m != m:
                return "n/a"
            return f"{fmt.format(m)} ± {fmt.format(sd)}" if get(d, k, "n", default=1) > 1 else fmt.format(m)
        lines.append("| " + " | ".join([
            f"{'+'.join(archs)} × {len(o['saes'])}", str(len(o["pairs"])), f(s, "pw_mcc"),
            f"{get(bs, 'pw_mcc', 'mean'):.3f} / {get(bi, 'pw_mcc', 'mean'):.3f}", f(s, "mean_max_abs_cos"),
            f"{get(bs, 'mean_max_abs_cos', 'mean'):.3f} / {get(bi, 'mean_max_abs_cos', 'mean'):.3f}",
            f(s, "shared_fraction"), f"{f(s, 'act_corr')} ({get(s, 'act_corr_random_pairs', 'mean'):.3f})",
            str(get(o, "effective_subspace", "r", default="n/a"))]) + " |")
    return lines


# ----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    base = args.out.parent
    evals, overlaps = collect(args)
    if args.choose:
        k, d_sae, every = choose([e for e in evals if e["_sweep"]] or evals, overlaps)
        print(f"{k} {d_sae} {every:.4f}")
        return
    md = [f"# {args.title}", ""]
    if args.elapsed is not None:
        md += [f"Wall time of the run that wrote this: {args.elapsed / 60:.1f} min ({args.elapsed:.0f} s).", ""]
    md += [f"- {n}" for n in args.note] + ([""] if args.note else [])
    md += ["Ground truth (`lib/ground_truth.py`): over all p² inputs each modular-addition site is fitted as "
           "value tables x ≈ μ + O[a] + O[b] + C[(a+b) mod p] (+ other lines); a table with ≥ 2% of the site's "
           "variance is a ground-truth feature set, its p rows the features. A feature is recovered when some "
           "decoder row has cosine > 0.9 with it; chance = the same for random unit decoder rows of the SAE's shape "
           "(isotropic / inside the top principal subspace holding 99% of the variance) and for the ± principal "
           "directions. Seed agreement: features recovered by every seed, by both of a pair, and the cosine "
           "between two seeds' latents matched to the same feature; the all-latent PW-MCC (Hungarian on signed "
           "decoder cosine) stands beside its subspace chance. Every metric is defined once in `lib/metrics.py`.", ""]
    groups = defaultdict(list)
    for e in evals:
        groups[(e.get("target", "?"), e.get("acts", "?"))].append(e)
    modadd_groups = {key: es for key, es in groups.items() if key[0] != "lm"}
    lm_groups = {key: es for key, es in groups.items() if key[0] == "lm"}

    if modadd_groups:
        md += ["## The answer: does an SAE recover the model's own features, and do seeds agree?", ""]
        if len({Path(acts).parent.parent for _, acts in modadd_groups}) == 1:
            md += [ONE_MODEL_NOTE, ""]
    detail = []
    for (target, acts), es in sorted(modadd_groups.items(), key=lambda kv: kv[0][1]):
        site = site_name(es[0])
        study = [e for e in es if not e["_sweep"]]
        sweep = [e for e in es if e["_sweep"]]
        ov_study = sorted((o for o in overlaps if not o["_sweep"] and o.get("acts") == acts),
                          key=lambda o: min(arch_key(arch_label(s)) for s in o["saes"]))
        ov_sweep = [o for o in overlaps if o["_sweep"] and o.get("acts") == acts]
        shares = {n: get(es[0], "ground_truth", "tables", n, "share") for n in get(es[0], "ground_truth", "features",
                                                                                  default=[])}
        md += [f"### {site}", ""]
        if study:
            feats, rows = answer_rows(study, ov_study)
            md += answer_table(feats, rows) + [""] + init_note(rows) + sentences(site, shares, rows) + [""]
            md += goal_lines(rows) + [""]
        if sweep:
            md += [f"#### Where in (k, width) TopK finds them at {site}", ""]
            md += sweep_section(sweep, ov_sweep, site, base, base / "figures")
        detail += [f"### {site}: {rel(acts, base)}", "", "Per configuration (mean ± std over SAE seeds):", ""]
        detail += modadd_table(study or es) + ["", FIRING_NOTE, ""]
        if ov_study:
            detail += ["Seed-to-seed overlap over all latents:", ""] + overlap_table(ov_study) + [""]
            detail += [f"![{'+'.join(sorted({arch_label(s) for s in o['saes']}))} overlap]"
                       f"({rel(o['figures']['heatmaps'], base)})" for o in ov_study if o.get("figures")] + [""]
    if detail:
        md += ["## Details per site", ""] + detail
    for (target, acts), es in sorted(lm_groups.items(), key=lambda kv: kv[0][1]):
        s = es[0].get("site") or {}
        d = es[0].get("downstream") or {}
        md += [f"## Language model: {d.get('model') or s.get('model')}, layer {s.get('layer', d.get('layer'))}, "
               f"{s.get('site', d.get('site'))}", "",
               f"Activations {rel(acts, base)}: {s.get('tokens') or 'n/a'} token rows; held-out rows and contexts "
               f"as extracted. CE is next-token cross-entropy on held-out contexts with the site's output replaced by "
               f"the SAE's reconstruction (with SAE) or by zeros (zero-ablated); loss recovered = (CE_zero − CE_sae) / "
               f"(CE_zero − CE_clean).", ""] + lm_table(es) + [""]
        ov = [o for o in overlaps if o.get("acts") == acts]
        if ov:
            md += ["Seed-to-seed overlap:", ""] + overlap_table(ov) + [""]
    md += ["## Sources", ""] + [f"- {rel(e['_path'], base)}" for e in evals] + \
          [f"- {rel(o['_path'], base)}" for o in overlaps] + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(md))
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(evals)} evaluations, {len(overlaps)} overlap studies)")


if __name__ == "__main__":
    run_main(main)
