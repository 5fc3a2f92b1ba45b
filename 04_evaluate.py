"""Stage 04: evaluate SAEs on held-out activations; writes one eval.json per SAE (+ a density histogram PNG).

    python 04_evaluate.py --sae runs/modadd/seed42/sae/topk/seed42 \\
        --acts runs/modadd/seed42/acts/resid_post.safetensors --run runs/modadd/seed42 \\
        --out results/modadd/seed42/eval/topk_seed42/eval.json
    python 04_evaluate.py --sae A B C --acts ... --out a/eval.json b/eval.json c/eval.json   # several, one process

Several SAEs in one call share the opened activations, the ground truth, the model and the
chance levels of each width, so each costs a fraction of a call of its own; each eval.json is
what a call of its own writes.

Every number is one function of metrics.py (formula in its docstring):
  reconstruction  MSE, FVU, explained variance (EV = 1 - sum|x - x_hat|^2 / sum|x - mean x|^2),
                  cosine similarity, L2 ratio; on the SAE-held-out rows (train_mask False)
  sparsity        L0, dead fraction (never active on the eval rows), dense fraction (> 10%),
                  density histogram (log10 firing frequency) as <out stem>_density.png
  downstream      (--run, modular addition) accuracy, CE and KL to the clean logits with the
                  SAE's reconstruction spliced in at its site, against the clean model and zero
                  ablation: loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)
  ground truth    (modular addition: activations over the full p x p grid with a, b) against the
                  site's ground-truth features (lib/ground_truth.py, written by 02 beside the
                  activations: the rows of the value tables, operand and answer, that carry >= 2% of
                  the variance), per feature set: Hungarian MCC of table rows vs decoder rows
                  (signed cosine), the fraction recovered (a decoder row at cos > 0.9), latent
                  selectivity (share of a latent's activation mass on its best value), the
                  fraction recovered by firing (a latent fires on the value's rows at F1 > 0.9:
                  read off the code, so blind to a direction all latents share with b_dec), the
                  rotation-invariant Fourier view (per decoder row, the share of its energy inside
                  one key-frequency plane of the table); each beside random decoders (isotropic, and
                  isotropic inside the data's 99%-variance subspace) and the signed PCA basis.

--acts is opened by lib/activations.py (any of its three kinds, with the held-out rows 03 held out);
a directory with manifest.json (language-model shards) gets its downstream numbers from
lib.lm.lm_downstream and no ground-truth metrics.
SAEs in SAELens's layout (sae_weights.safetensors + cfg.json) load through sae.SAE.load.
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch

from lib import ground_truth as G
from lib import metrics as M
from lib.activations import Acts, check_width, encode_all, open_acts
from lib.common import (ArgumentParser, check, file_sha256, pick_device, provenance, run_main,
                        save_figure, save_json)
from sae import SAE

CHUNK = 4096


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", type=Path, nargs="+", required=True,
                    help="SAE directory (cfg.json + sae_weights.safetensors); several: one --out each")
    ap.add_argument("--acts", type=Path, required=True,
                    help="activations .safetensors (02), a directory holding activations.safetensors, "
                         "or an LM activations directory with manifest.json")
    ap.add_argument("--run", type=Path, default=None,
                    help="modular-addition model directory (01) for the downstream metrics "
                         "(default: the run named in the activations' sidecar, if it exists)")
    ap.add_argument("--no-model", action="store_true", help="skip the downstream metrics")
    ap.add_argument("--out", type=Path, nargs="+", required=True, help="eval.json to write, one per --sae")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="seeded 10%% hold-out when the activations have no train_mask (as 03)")
    ap.add_argument("--max-rows", type=int, default=100_000, help="at most this many held-out rows")
    ap.add_argument("--max-contexts", type=int, default=256, help="LM: contexts for the downstream metrics")
    ap.add_argument("--recovery-cos", type=float, default=0.9, help="a feature is recovered above this cosine")
    ap.add_argument("--n-random", type=int, default=3, help="random decoders drawn per chance level")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    check(len(args.out) == len(args.sae), f"--out names {len(args.out)} file(s) for {len(args.sae)} --sae director"
                                          f"{'y' if len(args.sae) == 1 else 'ies'}: give one eval.json per SAE")
    for out in args.out:
        check(out.suffix == ".json", f"--out {out} must be a .json file")
    check(args.max_rows > 0, "--max-rows must be > 0")
    check(0 < args.recovery_cos < 1, "--recovery-cos must be in (0, 1)")
    check(args.n_random >= 1, "--n-random must be >= 1")
    return args


# ----------------------------------------------------------------------------
# Metric groups

def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    return {"mse": M.mse(x, x_hat), "fvu": M.fvu(x, x_hat), "explained_variance": M.explained_variance(x, x_hat),
            "cosine_similarity": M.cosine_similarity(x, x_hat), "l2_ratio": M.l2_ratio(x, x_hat)}


def sparsity_metrics(acts: torch.Tensor) -> dict:
    freq = M.firing_frequency(acts)
    alive = freq[freq > 0]
    return {"l0": M.l0(acts), "dead_fraction": M.dead_fraction(acts),
            "empty_fraction": M.empty_fraction(acts), "dense_fraction": M.dense_fraction(acts),
            "dense_threshold": 0.1, "n_latents": int(acts.shape[1]), "n_dead": int((freq == 0).sum()),
            "log10_firing_frequency_quantiles": (
                {q: float(alive.log10().quantile(float(q))) for q in ("0.1", "0.5", "0.9")} if len(alive) else {})}


def density_histogram(acts: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    freq = M.firing_frequency(acts)
    n_rows = len(acts)
    alive = freq[freq > 0].log10().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = math.log10(1.0 / n_rows)
    ax.hist(alive, bins=40, range=(lo - 0.05, 0.0), color="tab:blue")
    ax.axvline(math.log10(0.1), color="tab:red", ls="--", lw=1, label="dense (> 10%)")
    ax.set_xlabel("log10 firing frequency (held-out rows)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{int((freq == 0).sum())} dead of {len(freq)} (not shown)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def modadd_downstream(model, site: str, layer: int, recon_fn, tokens: torch.Tensor, labels: torch.Tensor,
                      empty: torch.Tensor | None = None) -> dict:
    """Clean vs spliced (recon_fn(x) at (site, layer), `=` position) vs zero-ablated logits.
    empty: [N] bool, the rows whose code has no active latent; their share of the KL is reported."""
    def run(fn):
        outs = []
        for i in range(0, len(tokens), CHUNK):
            def hook(s, l, x):
                if s == site and l == layer and fn is not None:
                    return fn(x)
            outs.append(model(tokens[i:i + CHUNK], hook=hook).double())
        return torch.cat(outs)
    clean = run(None)
    spliced = run(recon_fn)
    zero = run(lambda x: torch.zeros_like(x))
    ce = {n: M.cross_entropy(lg, labels) for n, lg in (("clean", clean), ("sae", spliced), ("zero", zero))}
    kl_sae, kl_zero = M.kl_divergence(clean, spliced), M.kl_divergence(clean, zero)
    extra = {}
    if empty is not None:
        kl = M.kl_rows(clean, spliced)
        extra = {"empty_rows": int(empty.sum()),
                 "kl_share_empty_rows": float(kl[empty].sum() / kl.sum()) if kl.sum() > 0 else float("nan")}
    return {"rows": len(tokens), **extra,
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
            "loss_recovered": M.loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            "acc_clean": M.accuracy(clean, labels), "acc_sae": M.accuracy(spliced, labels),
            "acc_zero": M.accuracy(zero, labels),
            "kl_sae": kl_sae, "kl_zero": kl_zero,
            "kl_recovered": (kl_zero - kl_sae) / kl_zero if kl_zero > 1e-12 else float("nan")}


def random_decoder_sae(sae: SAE, x: torch.Tensor, k: int, g: torch.Generator) -> SAE:
    """The chance baseline: a TopK SAE of the same shape with k ~ the evaluated SAE's L0, random
    unit decoder rows (isotropic), W_enc = W_dec^T, b_dec = the data mean, b_enc = 0."""
    r = SAE(sae.d_in, sae.d_sae, "topk", k=max(1, min(sae.d_sae, k)))
    with torch.no_grad():
        W = M.random_unit_rows(sae.d_sae, sae.d_in, g).float()
        r.W_dec.copy_(W)
        r.W_enc.copy_(W.T)
        r.b_dec.copy_(x.mean(0))
    return r.eval()


@torch.no_grad()
def ground_truth_metrics(sae: SAE, acts: Acts, gt: G.GroundTruth, l0: float, n_random: int, seed: int,
                         threshold: float, cache: dict, all_codes: torch.Tensor | None = None) -> dict:
    """The SAE against the site's ground-truth features, over the full grid, beside chance (the
    chance levels of a width and the PCA basis computed once per call of 04: `cache`).
    all_codes: the SAE's code of every row of acts, where file_metrics has it already."""
    x, a, b = acts.x, acts.labels["a"], acts.labels["b"]
    codes = encode_all(sae, x)[0] if all_codes is None else all_codes
    W = sae.W_dec.detach().double()
    mine = G.score_decoder(gt, W, acts=codes, a=a, b=b, threshold=threshold)
    for name, F in G.ground_truth_features(gt).items():       # per feature: its best latent and cosine
        best, idx = M.best_feature_match(F, W)
        mine[name]["best_cos"] = [round(float(v), 4) for v in best]
        mine[name]["best_latent"] = [int(v) for v in idx]
    key = ("chance", sae.d_sae)
    if key not in cache:
        cache[key] = G.chance_levels(gt, x, sae.d_sae, seeds=range(seed, seed + n_random), threshold=threshold)
    chance = copy.deepcopy(cache[key])
    # selectivity at chance: a TopK SAE with random unit decoder rows and k = round(L0); the signed PCA codes
    rs = random_decoder_sae(sae, x, int(round(l0)), torch.Generator().manual_seed(seed))
    rand_codes, _ = encode_all(rs, x)
    if "pca" not in cache:
        cache["pca"] = M.pca_basis(x)
    Vh, _, _ = cache["pca"]
    proj = (x.double() - x.double().mean(0)) @ Vh.T
    pca_codes = torch.cat([proj, -proj], 1).relu()
    for name in gt.features:
        vals = G.feature_values(gt, name, a, b)
        for base, c in (("random_isotropic", rand_codes), ("pca_signed", pca_codes)):
            chance[base][name]["selectivity"] = M.mean_selectivity(c, vals, gt.p)
            chance[base][name]["recovered_firing"] = M.firing_recovery(c, vals, gt.p, G.FIRING_F1)
    return {"p": gt.p, "features": gt.features, "recovery_cos": threshold,
            "tables": {n: {k: gt.info["tables"][n][k] for k in ("share", "rank", "key_frequencies")}
                       for n in gt.info["tables"]},
            "additive_share": gt.info.get("additive_share"), "sae": mine, "chance": chance,
            "definitions": {"mcc": "Hungarian matching of table rows to decoder rows on the signed cosine; "
                                   "mean matched cosine over the table's rows",
                            "recovered": f"fraction of table rows with some decoder row at cos > {threshold}",
                            "selectivity": "per latent that fires, the share of its activation mass on its "
                                           "best value of the table's variable; mean over latents",
                            "recovered_firing": f"fraction of the table's values some latent fires on at F1 > "
                                                f"{G.FIRING_F1} (fires vs the row holds the value): recovery read "
                                                "off the code, blind to a direction every latent shares with b_dec",
                            "plane_share": "per decoder row, the largest share of its energy inside one "
                                           "key-frequency plane of the table; mean over rows",
                            "chance": "random_isotropic / random_pca_subspace: random unit decoder rows of the "
                                      "SAE's shape, isotropic / inside the top-r principal subspace (99% of "
                                      "variance), averaged over --n-random draws; pca_signed: the principal "
                                      "directions and their negatives; selectivity and recovered_firing at chance: a TopK "
                                      "SAE with random decoder rows (k = round(L0)) and the signed PCA codes"}}


# ----------------------------------------------------------------------------

def find_run(args, sidecar: dict) -> Path | None:
    if args.no_model:
        return None
    if args.run is not None:
        check(args.run.is_dir(), f"--run {args.run} is not a directory")
        return args.run
    r = sidecar.get("run")
    if r and Path(r).is_dir() and (Path(r) / "model.safetensors").is_file():
        return Path(r)
    return None


def lm_metrics(args, sae: SAE, acts: Acts, device) -> dict:
    """A language model's shards: held-out rows, and the loss with the SAE spliced in."""
    from lib import lm                                            # lazily: only LM targets need it
    x_held = acts.heldout_rows(args.max_rows)
    codes, x_hat = encode_all(sae, x_held)
    res = {"target": "lm", "split": acts.split, "rows": {"heldout": len(x_held)},
           "reconstruction": reconstruction_metrics(x_held, x_hat), "sparsity": sparsity_metrics(codes),
           "ground_truth": None}
    down = dict(lm.lm_downstream(sae.to(device), acts.path, device, args.max_contexts))
    sae.cpu()
    if "loss_recovered" not in down and all(k in down for k in ("ce_clean", "ce_sae", "ce_zero")):
        down["loss_recovered"] = M.loss_recovered(down["ce_clean"], down["ce_sae"], down["ce_zero"])
    res["downstream"] = down
    return res, codes


def file_metrics(args, sae: SAE, acts: Acts, cache: dict) -> dict:
    """An activations file: held-out rows and the dead fraction on all rows; for modular addition
    (a and b over the full grid) the ground-truth metrics, and (given the run) the downstream ones."""
    x_held = acts.heldout_rows(args.max_rows)
    check(len(x_held) > 0, f"--acts {acts.path}: no held-out rows (train_mask is all True)")
    codes, x_hat = encode_all(sae, x_held)
    res = {"target": acts.sidecar.get("source", "generic"), "split": acts.split,
           "rows": {"heldout": len(x_held), "total": acts.n_rows},
           "reconstruction": reconstruction_metrics(x_held, x_hat), "sparsity": sparsity_metrics(codes),
           "downstream": None, "ground_truth": None, "_inputs": {}}
    all_codes = None
    if acts.n_rows <= 200_000:          # context for the held-out figure: rare latents miss a small hold-out
        all_codes = encode_all(sae, acts.x)[0]
        res["sparsity"]["dead_fraction_all_rows"] = M.dead_fraction(all_codes)
        res["sparsity"]["empty_fraction_all_rows"] = M.empty_fraction(all_codes)
        res["sparsity"]["all_rows"] = acts.n_rows
    notes = []
    if {"a", "b"} <= set(acts.labels):
        if "gt" not in cache:
            cache["gt"] = G.load_or_fit(acts)
        gt, where = cache["gt"]
        res["ground_truth"] = ground_truth_metrics(sae, acts, gt, res["sparsity"]["l0"], args.n_random, args.seed,
                                                   args.recovery_cos, cache, all_codes)
        res["_inputs"]["ground_truth"] = where
    else:
        notes.append("the activations carry no a, b labels: no ground-truth metrics")
    run = find_run(args, acts.sidecar)
    if run is None:
        notes.append("no model run (--run) given or found: downstream metrics skipped")
    else:
        res["downstream"] = modadd_downstream_metrics(sae, acts, run, cache, all_codes)
        res["run"] = str(run)
        res["_inputs"]["run"] = str(run)
    if notes:
        res["notes"] = notes
    return res, codes


def modadd_downstream_metrics(sae: SAE, acts: Acts, run: Path, cache: dict,
                              all_codes: torch.Tensor | None = None) -> dict:
    """The SAE's reconstruction spliced in at its site of the modular-addition model (`=` position).
    all_codes: the SAE's code of every row of acts, where file_metrics has it already."""
    from lib import modadd
    if ("model", run) not in cache:
        cache[("model", run)] = modadd.load_run(run)[0]
    model = cache[("model", run)]
    p, x = model.cfg.p, acts.x
    site, layer = acts.sidecar.get("site"), acts.sidecar.get("layer")
    check(site in modadd.SITES and isinstance(layer, int),
          f"--acts {acts.path}: its sidecar {acts.path.with_suffix('.json').name} does not name the "
          f"site and layer (02_extract_activations.py writes them)")
    width = modadd.site_width(model.cfg, site)
    check(width == sae.d_in, f"--run {run}: site {site} has width {width}, but the SAE's d_in is {sae.d_in}")
    check(width == x.shape[1], f"--acts {acts.path} has width {x.shape[1]}, but {site} of --run {run} has {width}")
    for key in ("a", "b"):
        check(key in acts.labels, f"--acts {acts.path} has no '{key}' tensor (02 writes a, b, c for modular addition)")
    check(len(x) == p * p, f"--acts {acts.path} has {len(x)} rows, but p = {p} needs p^2 = {p * p}")
    a, b = acts.labels["a"], acts.labels["b"]
    tokens, labels = modadd.all_pairs(p)
    order = a * p + b                                         # row n of acts is pair order[n]
    toks, labs = tokens[order], labels[order]

    def recon(z):
        return sae.decode(sae.encode(z)).to(z.dtype)
    held = ~acts.train
    if all_codes is None:
        all_codes = encode_all(sae, x)[0]
    empty = (all_codes == 0).all(1)                            # rows reconstructed as b_dec alone
    return {"heldout": modadd_downstream(model, site, layer, recon, toks[held], labs[held], empty[held]),
            "all": modadd_downstream(model, site, layer, recon, toks, labs, empty),
            "site": site, "layer": layer, "zero_ablation": "the site's activation at `=` replaced by zeros"}


def summary_line(out: Path, result: dict) -> str:
    r, s = result["reconstruction"], result["sparsity"]
    line = f"{out}: EV {r['explained_variance']:.4f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.1%}"
    d = result.get("downstream")
    if d:
        lr = d["heldout"]["loss_recovered"] if "heldout" in d else d.get("loss_recovered")
        line += f", loss recovered {lr:.4f}"
    g = result.get("ground_truth")
    for name in (g or {}).get("features", []):
        m, c = g["sae"][name], g["chance"]["random_isotropic"][name]
        line += (f", {name}: recovered {m['recovered']:.2f} (chance {c['recovered']:.2f}), "
                 f"MCC {m['mcc']:.3f} (chance {c['mcc']:.3f})")
    return line


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    for path in args.sae:
        check(path.is_dir(), f"--sae {path} is not a directory")
    saes = [SAE.load(path, device="cpu") for path in args.sae]          # every input checked before any output
    acts = open_acts(args.acts, args.split_seed)
    for path, sae in zip(args.sae, saes):
        check_width(acts, sae.d_in, f"the SAE {path}")
    cache = {}
    for path, sae, out in zip(args.sae, saes, args.out):
        result = evaluate(args, path, sae, acts, out, device, cache)
        if not args.quiet:
            print(summary_line(out, result))


def evaluate(args, path: Path, sae: SAE, acts: Acts, out: Path, device, cache: dict) -> dict:
    """One SAE's eval.json."""
    meta = sae.metadata
    sae_info = {"path": str(path), "arch": sae.arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
                "init": (meta.get("training_config") or {}).get("init"), "seed": meta.get("seed"),
                "hook_name": meta.get("hook_name"), "model_name": meta.get("model_name")}
    side = acts.sidecar
    result = {"sae": sae_info, "acts": str(acts.path), "inputs": {"sae": str(path), "acts": str(acts.path)},
              "site": {"site": side.get("site"), "layer": side.get("layer"), "hook_name": side.get("hook_name"),
                       "model": side.get("model") or side.get("run"), "tokens": side.get("token_count")}}
    if acts.kind == "shards":
        part, codes = lm_metrics(args, sae, acts, device)
    else:
        part, codes = file_metrics(args, sae, acts, cache)
        if "acts_sha256" not in cache:
            cache["acts_sha256"] = file_sha256(acts.path)
        result["inputs"]["acts_sha256"] = cache["acts_sha256"]
    result["inputs"].update(part.pop("_inputs", {}))
    result.update(part)
    title = f"{path.name if path.name else path} ({sae.arch}, d_sae={sae.d_sae})"
    result["figures"] = {"density": str(density_histogram(codes, out.with_name(out.stem + "_density.png"), title))}
    one = argparse.Namespace(**{**vars(args), "sae": path, "out": out})      # the config of this SAE's evaluation
    result.update(provenance(one, seed=sae_info["seed"], baseline_seed=args.seed))
    save_json(result, out)
    return result


if __name__ == "__main__":
    run_main(main)
