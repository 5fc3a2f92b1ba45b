"""Ground truth for a modular-addition site, read off the model: the value tables it writes.

At the `=` position every activation is a function of (a, b), so over the full p x p grid

    x(a, b) = mu + sum over the p + 1 lines L of T_L[(u_L a + w_L b) mod p]          (exact)

where the lines are the variables a, b, a + b, a - b, a + 2b, ... (one per direction
(u, w) in Z_p^2 up to scale; p prime). This is the 2-D Fourier transform grouped by line:
the character (k1, k2) != 0 lies on exactly one line, so the p + 1 tables are mutually
orthogonal over the grid and their variance shares add up to 1. The tables that matter:

    operand_a  T[a]            operand_b  T[b]
    answer     T[(a + b) % p]  difference T[(a - b) % p]

Each table is the per-value mean of the centred activations, T[v] = mean_{n: var_n = v} (x_n - mu):
on the full grid that IS the least-squares fit of x ~ mu + A[a] + B[b] + C[c] (+ D[a - b] ...),
because every value occurs p times and any two of the line variables are independent and
uniform over the grid (a balanced design). So "what the additive fit leaves" (the residual of
mu + A + B + C) is exactly the sum of the other p - 2 line tables; the difference table and the
largest other line are reported from it.

Rules (stated once, here; every number below is also written into the JSON):
- share of a table   share(T) = sum_n ||T[var_n]||^2 / sum_n ||x_n - mu||^2 = p sum_v ||T[v]||^2 / SS.
- rank               the smallest r whose top-r singular values of the [p, d] table hold
                     >= RANK_ENERGY (99%) of its energy sum_v ||T[v]||^2.
- key frequencies    Fourier energy of the table over the value index v (orthonormal real basis,
                     modadd.fourier_basis); frequency k is key when it holds >= KEY_SHARE_FACTOR / (p // 2)
                     of the non-constant energy (the same rule as the embedding's key frequencies).
- operand merge      when median_v cos(A[v], B[v]) >= MERGE_COS (0.9) the operands are one feature set,
                     "operand", table O = (A + B) / 2: the least-squares O of x ~ mu + O[a] + O[b] + C[c]
                     on the balanced grid; its share is that of O[a] + O[b], 2 p sum_v ||O[v]||^2 / SS.
                     Otherwise "operand_a" and "operand_b" are separate feature sets. A and B are fitted
                     and reported (shares, cosines) either way.
- material           a table is a ground-truth feature set when its share >= MATERIAL_SHARE (2%) of the
                     site's variance; its features are its p rows, as unit vectors (ground_truth_features).

Files: beside the activations, `<stem>.ground_truth.safetensors` (mu and the tables, float64) and
`<stem>.ground_truth.json` (every scalar: shares, ranks, key frequencies, cosines, the rules and
the feature list). Loading reads only those two (safetensors + JSON, never pickle); a missing or
bad file gives one UserError line naming it.

Typical use (02 writes, 04/05 read):

    gt = fit_acts_file("runs/.../acts/resid_post.safetensors")       # or fit_value_tables(x, a, b, p)
    save_ground_truth(gt, ground_truth_path(acts_path))
    gt = load_ground_truth(ground_truth_path(acts_path))
    feats = ground_truth_features(gt)                                  # {"answer": [p, d], "operand": [p, d]}
    scores = score_decoder(gt, W_dec, acts=codes, a=a, b=b)            # per feature set: mcc, recovered, ...
    chance = chance_levels(gt, x, n_latents=W_dec.shape[0])            # the same numbers for baselines
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import metrics as M
from lib import modadd
from lib.common import UserError, check, load_json, load_tensors, save_json, save_tensors

FORMAT = "modadd-ground-truth/1"
MATERIAL_SHARE = 0.02        # a table with >= 2% of the site's variance is a ground-truth feature set
RANK_ENERGY = 0.99           # rank = smallest r holding 99% of a table's energy
MERGE_COS = 0.9              # merge A and B into "operand" when median_v cos(A[v], B[v]) >= 0.9
RECOVERY_COS = 0.9           # a feature is recovered when some decoder row has cos > 0.9 with it
FIRING_F1 = 0.9              # ... or, read off the code, some latent fires on its rows at F1 > 0.9
CHANCE_VAR_FRAC = 0.99       # the principal subspace random baseline lives in (top-r holding 99%)

# The named lines: name -> (u, w), variable (u a + w b) mod p. "difference" is (1, p - 1), filled per p.
NAMED = {"operand_a": (1, 0), "operand_b": (0, 1), "answer": (1, 1), "difference": (1, -1)}
VARIABLE = {"operand_a": "a", "operand_b": "b", "answer": "(a+b)%p", "difference": "(a-b)%p",
            "operand": "a or b"}


@dataclass
class GroundTruth:
    """A fitted site. tables: name -> [p, d] float64 centred tables (operand_a, operand_b, answer,
    difference, operand = (A + B) / 2, plus any other material line "line_a+<m>b"); mu: [d];
    info: every scalar (JSON-able), including info["features"], the names of the feature sets."""
    p: int
    mu: torch.Tensor
    tables: dict
    info: dict = field(default_factory=dict)

    @property
    def features(self) -> list:
        return list(self.info.get("features", []))

    def coef(self, name: str) -> tuple:
        """(u, w) of a line table: its variable is (u a + w b) mod p. Not defined for 'operand'."""
        return tuple(self.info["tables"][name]["coef"])


# ----------------------------------------------------------------------------
# Fitting

def _line_variable(a: torch.Tensor, b: torch.Tensor, u: int, w: int, p: int) -> torch.Tensor:
    return (u * a.long() + w * b.long()) % p


def _group_mean(xc: torch.Tensor, idx: torch.Tensor, p: int) -> torch.Tensor:
    """T[v] = mean of the rows of xc with idx == v ([p, d])."""
    T = torch.zeros(p, xc.shape[1], dtype=torch.float64)
    T.index_add_(0, idx, xc)
    cnt = torch.bincount(idx, minlength=p).double().clamp_min(1)
    return T / cnt[:, None]


def table_rank(table: torch.Tensor, energy: float = RANK_ENERGY) -> int:
    """Smallest r with sum_{i <= r} s_i^2 >= energy * sum_i s_i^2 (s: singular values of the [p, d] table); 0 for a zero table."""
    s2 = torch.linalg.svdvals(table.double()).pow(2)
    tot = float(s2.sum())
    if tot <= 1e-30:
        return 0
    return min(int((s2.cumsum(0) < energy * tot * (1 - 1e-12)).sum()) + 1, len(s2))


def frequency_shares(table: torch.Tensor, p: int) -> torch.Tensor:
    """Share of a table's non-constant energy at each frequency k = 1 .. p // 2, over the value index:
    coef = F T (F the orthonormal real Fourier basis of R^p), E_k = sum of ||coef_row||^2 over the
    cos and sin rows of k, share_k = E_k / sum_k E_k. [p // 2] (index k - 1)."""
    Fb, _, freqs = modadd.fourier_basis(p)
    coef = Fb @ table.double()
    e = torch.zeros(p // 2 + 1, dtype=torch.float64)
    e.index_add_(0, torch.tensor(freqs), coef.pow(2).sum(1))
    e = e[1:]
    return e / e.sum().clamp_min(1e-30)


def key_frequencies(table: torch.Tensor, p: int) -> list:
    """Frequencies holding >= KEY_SHARE_FACTOR / (p // 2) of the table's non-constant energy,
    sorted by decreasing energy."""
    share = frequency_shares(table, p)
    thr = modadd.KEY_SHARE_FACTOR / len(share)
    keys = [k + 1 for k in range(len(share)) if share[k] >= thr]
    return sorted(keys, key=lambda k: -float(share[k - 1]))


def _table_info(T: torch.Tensor, p: int, ss: float, mult: int = 1) -> dict:
    share = frequency_shares(T, p)
    keys = key_frequencies(T, p)
    order = share.argsort(descending=True)
    n99 = int((share[order].cumsum(0) < RANK_ENERGY * (1 - 1e-12)).sum()) + 1
    return {"share": float(mult * p * T.pow(2).sum() / ss),
            "rank": table_rank(T),
            "rank_90": table_rank(T, 0.9),
            "key_frequencies": keys,
            "key_energy_share": float(share[[k - 1 for k in keys]].sum()) if keys else 0.0,
            "frequencies_99": [int(k) + 1 for k in order[:n99]],   # fewest frequencies holding 99% of the energy
            "frequency_shares": [round(float(s), 6) for s in share],
            "row_norm_mean": float(T.norm(dim=1).mean())}


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % q for q in range(2, int(math.isqrt(p)) + 1))


def check_full_grid(a: torch.Tensor, b: torch.Tensor, p: int) -> None:
    """UserError unless the rows cover every (a, b) in Z_p x Z_p exactly once."""
    check(a.ndim == 1 and a.shape == b.shape, f"a and b must be 1-D of the same length (got {tuple(a.shape)}, {tuple(b.shape)})")
    check(len(a) == p * p, f"the ground truth is fitted over the full grid: need {p * p} rows (p = {p}), got {len(a)}")
    check(bool(((a >= 0) & (a < p) & (b >= 0) & (b < p)).all()), f"a and b must be residues in [0, {p})")
    cnt = torch.bincount(a.long() * p + b.long(), minlength=p * p)
    check(bool((cnt == 1).all()), "the rows do not cover every (a, b) pair exactly once")


def fit_value_tables(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: int,
                     min_share: float = MATERIAL_SHARE, merge_cos: float = MERGE_COS,
                     check_lines: bool = True) -> GroundTruth:
    """Fit the value tables of one site over the full grid (x [p^2, d], a, b [p^2]) and pick the
    material ones (see the module docstring for every rule). check_lines: also fit the other p - 2
    lines (a + m b) to check that nothing else carries a material share (cheap: p group-means; prime p
    only, where the p + 1 lines decompose the grid exactly; otherwise other_lines_share is None). A, B, C
    are orthogonal for any p (every pair of a, b, c is uniform over the grid); D needs p odd."""
    check(x.ndim == 2 and len(x) == len(a), f"activations must be [N, d] with one row per (a, b) (got {tuple(x.shape)} and {len(a)} rows)")
    check_full_grid(a, b, p)
    check(bool(torch.isfinite(x).all()), "activations hold NaN or inf")
    X = x.double()
    mu = X.mean(0)
    xc = X - mu
    ss = float(xc.pow(2).sum())
    check(ss > 0, "activations are constant over the grid: nothing to fit")
    a, b = a.long(), b.long()

    tables, info_t = {}, {}
    for name, (u, w) in NAMED.items():
        T = _group_mean(xc, _line_variable(a, b, u, w, p), p)
        tables[name] = T
        info_t[name] = {"variable": VARIABLE[name], "coef": [u % p, w % p], **_table_info(T, p, ss)}

    A, B, C = tables["operand_a"], tables["operand_b"], tables["answer"]
    c = _line_variable(a, b, 1, 1, p)
    resid = xc - A[a] - B[b] - C[c]
    additive = 1.0 - float(resid.pow(2).sum()) / ss
    cos_ab = M.cosine_matrix(A, B).diagonal()
    merged = float(cos_ab.median()) >= merge_cos
    O = 0.5 * (A + B)
    tables["operand"] = O
    info_t["operand"] = {"variable": VARIABLE["operand"], "coef": None, **_table_info(O, p, ss, mult=2)}
    resid_o = xc - O[a] - O[b] - C[c]
    operand_additive = 1.0 - float(resid_o.pow(2).sum()) / ss

    # What the additive fit leaves, by line (orthogonal on the grid, so fitted on the residual
    # directly): the difference and every other line a + m b, m = 2 .. p - 2.
    d_res = _group_mean(resid, _line_variable(a, b, 1, -1, p), p)
    resid_share = 1.0 - additive
    check_lines = check_lines and _is_prime(p)      # the p + 1 lines partition the grid's characters only for prime p
    lines = _other_lines(resid, a, b, p, ss) if check_lines else {}
    other_total = sum(s for s, _ in lines.values())
    lines_total = additive + info_t["difference"]["share"] + other_total if check_lines else None
    for m, (s, T) in lines.items():
        if s >= min_share:
            nm = f"line_a+{m}b"
            tables[nm] = T
            info_t[nm] = {"variable": f"(a+{m}b)%p", "coef": [1, m], **_table_info(T, p, ss)}
    feats = _feature_sets(info_t, merged, min_share)

    site_keys = []
    for n in feats:
        site_keys += [k for k in info_t[n]["key_frequencies"] if k not in site_keys]
    top_other = sorted(((s, m) for m, (s, _) in lines.items()), reverse=True)[:5]
    info = {
        "format": FORMAT, "p": p, "d": int(x.shape[1]), "n_rows": int(len(x)), "total_ss": ss,
        "features": feats,
        "site_key_frequencies": site_keys,                # union of the feature sets' key frequencies: the planes
        "tables": info_t,
        "additive_share": additive,                       # mu + A[a] + B[b] + C[c]
        "operand_additive_share": operand_additive,       # mu + O[a] + O[b] + C[c]
        "operand_cos": {"median": float(cos_ab.median()), "mean": float(cos_ab.mean()),
                        "min": float(cos_ab.min()), "max": float(cos_ab.max())},
        "operands_merged": merged,
        "residual_share": resid_share,                    # 1 - additive_share
        "difference_share_of_residual": (float(p * d_res.pow(2).sum() / ss) / resid_share) if resid_share > 1e-12 else None,
        "other_lines_share": other_total if check_lines else None,
        "other_lines_top": [{"line": f"(a+{m}b)%p", "share": s} for s, m in top_other],
        "lines_total_share": lines_total,                 # = 1 up to rounding: the decomposition is exact
        "rules": {
            "fit": "per-value means of the centred activations over the full p x p grid "
                   "(= least squares of x ~ mu + A[a] + B[b] + C[(a+b)%p] + D[(a-b)%p] + ..., balanced design)",
            "share": "p * sum_v ||T[v]||^2 / sum_n ||x_n - mu||^2 (operand: 2 p sum_v ||O[v]||^2 / SS)",
            "material_share": min_share,
            "rank_energy": RANK_ENERGY,
            "key_share_factor": modadd.KEY_SHARE_FACTOR,
            "key_rule": f"frequency share of the table's non-constant energy >= {modadd.KEY_SHARE_FACTOR} / {p // 2}",
            "merge_cos": merge_cos,
            "merge_rule": "operand = (A + B) / 2 when median_v cos(A[v], B[v]) >= merge_cos, else operand_a and operand_b",
        },
    }
    return GroundTruth(p=p, mu=mu, tables=tables, info=info)


def _other_lines(resid: torch.Tensor, a, b, p: int, ss: float) -> dict:
    """{m: (share of SS, table)} for every other line a + m b, m = 2 .. p - 2, fitted on the
    additive fit's residual (the lines are orthogonal on the grid)."""
    lines = {}
    for m in range(2, p - 1):
        T = _group_mean(resid, _line_variable(a, b, 1, m, p), p)
        lines[m] = (float(p * T.pow(2).sum() / ss), T)
    return lines


def _feature_sets(info_t: dict, merged: bool, min_share: float) -> list[str]:
    """The material tables (share >= min_share): the operand as one set where A and B point the
    same way (merged), else operand_a and operand_b; then the answer, difference and other lines."""
    feats = []
    if merged:
        if info_t["operand"]["share"] >= min_share:
            feats.append("operand")
    else:
        feats += [n for n in ("operand_a", "operand_b") if info_t[n]["share"] >= min_share]
    return feats + [n for n in info_t if n not in ("operand", "operand_a", "operand_b") and info_t[n]["share"] >= min_share]


def fit_acts_file(acts_path, p: int | None = None, **kw) -> GroundTruth:
    """Read an activations file as 02 writes it (`activations`, `a`, `b`) and fit it.
    p defaults to sqrt(number of rows)."""
    t = load_tensors(acts_path, "activations")
    for k in ("activations", "a", "b"):
        check(k in t, f"activations {acts_path} has no '{k}' tensor (not a modular-addition site?)")
    n = len(t["activations"])
    if p is None:
        p = int(round(math.sqrt(n)))
    check(p * p == n, f"activations {acts_path}: {n} rows is not a full {p} x {p} grid")
    gt = fit_value_tables(t["activations"], t["a"], t["b"], p, **kw)
    gt.info["source"] = str(acts_path)
    return gt


# ----------------------------------------------------------------------------
# Features, variables per row, Fourier planes

def ground_truth_features(gt: GroundTruth, names=None) -> dict:
    """name -> unit rows [p, d] (float64) of each material table (gt.features), or of `names`.
    Row v is the direction the site writes when the table's variable equals v."""
    names = gt.features if names is None else list(names)
    out = {}
    for n in names:
        check(n in gt.tables, f"ground truth has no table {n!r} (has {sorted(gt.tables)})")
        T = gt.tables[n].double()
        out[n] = T / T.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out


def feature_values(gt: GroundTruth, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The value(s) of a table's variable on each row: [N] for a line table ((u a + w b) mod p),
    [N, 2] = (a, b) for "operand" (value v occurs on a row when a = v or b = v).
    What metrics.latent_selectivity takes as `values`."""
    a, b = a.long(), b.long()
    if name == "operand":
        return torch.stack([a, b], 1)
    check(name in gt.info.get("tables", {}), f"ground truth has no table {name!r}")
    u, w = gt.info["tables"][name]["coef"]
    return _line_variable(a, b, u, w, gt.p)


def planes(table: torch.Tensor, p: int, keys=None) -> tuple[torch.Tensor, list]:
    """The key-frequency planes of a table, in activation space: for each key k,
    c_k = sum_v cos(2 pi k v / p) T[v] and s_k = sum_v sin(2 pi k v / p) T[v], orthonormalised
    (Gram-Schmidt; a direction with < 1e-9 of the plane's energy is left as a zero row, so a table
    that is a line, not a circle, at k gives a 1-D "plane"). keys default to key_frequencies(table).
    Returns (planes [K, 2, d] float64, keys)."""
    keys = key_frequencies(table, p) if keys is None else [int(k) for k in keys]
    T = table.double()
    v = torch.arange(p, dtype=torch.float64)
    out = torch.zeros(len(keys), 2, T.shape[1], dtype=torch.float64)
    for i, k in enumerate(keys):
        ang = 2 * math.pi * k * v / p
        cs = torch.stack([torch.cos(ang) @ T, torch.sin(ang) @ T])
        scale = cs.pow(2).sum().sqrt()
        if scale <= 1e-30:
            continue
        cs = cs / scale
        j = 0
        for vec in cs:
            for q in out[i, :j]:
                vec = vec - (vec @ q) * q
            nv = vec.norm()
            if nv > 1e-9 ** 0.5:             # the plane's norm is 1 here: keep >= 1e-9 of its energy
                out[i, j] = vec / nv
                j += 1
    return out, keys


def table_planes(gt: GroundTruth, name: str, keys=None) -> tuple[torch.Tensor, list]:
    """planes() of a fitted table at the site's key frequencies (info["site_key_frequencies"], the union
    of the feature sets' keys: a frequency that is key for one table is a plane of every table, e.g. on
    resid_post k = 10 holds 11% of the operand table but 4.7% of the answer table, under the 5.4% rule,
    while the answer table's rank 10 needs all five circles), or at `keys`."""
    check(name in gt.tables, f"ground truth has no table {name!r}")
    if keys is None:
        keys = gt.info.get("site_key_frequencies") or None
    return planes(gt.tables[name], gt.p, keys)


# ----------------------------------------------------------------------------
# Files

def ground_truth_path(acts_path) -> Path:
    """<dir>/<stem>.ground_truth.safetensors beside <dir>/<stem>.safetensors (the JSON: same stem, .json)."""
    acts_path = Path(acts_path)
    return acts_path.with_name(f"{acts_path.stem}.ground_truth.safetensors")


def _pair(path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json")


def save_ground_truth(gt: GroundTruth, path) -> tuple[Path, Path]:
    """Write mu and the tables to `path` (.safetensors, float64) and gt.info to the .json beside it."""
    st, js = _pair(path)
    tensors = {"mu": gt.mu.double()}
    tensors.update({f"table.{n}": T.double() for n, T in gt.tables.items()})
    save_tensors(tensors, st, metadata={"format": FORMAT, "p": str(gt.p)})
    save_json({**gt.info, "p": gt.p, "table_names": sorted(gt.tables)}, js)
    return st, js


def load_ground_truth(path) -> GroundTruth:
    """Read what save_ground_truth wrote (either file's path). One UserError line naming the file
    when either is missing, unreadable or inconsistent."""
    st, js = _pair(path)
    info = load_json(js, "ground truth")
    check(isinstance(info, dict) and info.get("format") == FORMAT,
          f"ground truth {js} is not a {FORMAT} file")
    try:
        p, names, feats = int(info["p"]), list(info["table_names"]), list(info["features"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"ground truth {js} lacks a field ({e})")
    t = load_tensors(st, "ground truth")
    check("mu" in t and t["mu"].ndim == 1, f"ground truth {st} has no 'mu' vector")
    d = len(t["mu"])
    tables = {}
    for n in names:
        key = f"table.{n}"
        check(key in t, f"ground truth {st} has no tensor {key!r} (listed in {js.name})")
        check(tuple(t[key].shape) == (p, d), f"ground truth {st}: {key} has shape {tuple(t[key].shape)}, expected ({p}, {d})")
        tables[n] = t[key].double()
    missing = [f for f in feats if f not in tables]
    check(not missing, f"ground truth {js} lists features {missing} with no table")
    return GroundTruth(p=p, mu=t["mu"].double(), tables=tables, info=info)


# ----------------------------------------------------------------------------
# Scoring a decoder, and the chance levels

def load_or_fit(acts) -> tuple[GroundTruth, str]:
    """For an opened modular-addition activations file (lib.activations.Acts with a, b over the
    full grid): the ground truth 02 wrote beside it, or, for a file without one, fitted now.
    Returns (ground truth, where it came from)."""
    path = ground_truth_path(acts.path)
    if path.is_file():
        return load_ground_truth(path), str(path)
    p = int(round(math.sqrt(acts.n_rows)))
    return fit_value_tables(acts.x, acts.labels["a"], acts.labels["b"], p), "fitted from the activations (no file)"


def score_decoder(gt: GroundTruth, decoder: torch.Tensor, acts: torch.Tensor | None = None,
                  a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  names=None, threshold: float = RECOVERY_COS) -> dict:
    """Per feature set (gt.features, or names): metrics of decoder rows [m, d] against its unit rows.
    - mcc: metrics.feature_mcc; recovered: metrics.recovery_fraction (cos > threshold);
      mean_max_cos: mean over table rows of the best signed cosine;
    - plane_share: mean over the decoder rows of metrics.plane_share against the table's key planes
      (chance for isotropic rows: 2 / d); plane_share_ge_0.9: fraction of rows with share >= 0.9;
    - selectivity (with acts [N, m] codes and a, b [N]): metrics.mean_selectivity over the latents
      that fire, on the table's variable (feature_values); recovered_firing: the fraction of the
      table's values some latent fires on at metrics.firing_f1 > FIRING_F1, the code's view of
      recovery, blind to a direction all latents share with b_dec."""
    feats = ground_truth_features(gt, names)
    out = {}
    for n, F in feats.items():
        best, _ = M.best_feature_match(F, decoder)
        P, _ = table_planes(gt, n)
        share, _ = M.plane_share(decoder, P)
        s = {"n_features": len(F), "mcc": M.feature_mcc(F, decoder),
             "recovered": float((best > threshold).double().mean()),
             "mean_max_cos": float(best.mean()),
             "plane_share": float(share.mean()) if len(share) else float("nan"),
             "plane_share_ge_0.9": float((share >= 0.9).double().mean()) if len(share) else float("nan")}
        if acts is not None:
            check(a is not None and b is not None, "selectivity needs a and b with acts")
            vals = feature_values(gt, n, a, b)
            s["selectivity"] = M.mean_selectivity(acts, vals, gt.p)
            s["recovered_firing"] = M.firing_recovery(acts, vals, gt.p, FIRING_F1)
        out[n] = s
    return out


def chance_decoders(x: torch.Tensor, n_latents: int, seed: int = 0,
                    var_frac: float = CHANCE_VAR_FRAC, pca=None) -> tuple[dict, int]:
    """Baseline decoders for site activations x [N, d]:
    - random_isotropic: n_latents unit rows uniform on S^{d-1} (same shape as the SAE's decoder);
    - random_pca_subspace: n_latents unit rows uniform on the unit sphere of the top-r principal
      subspace of x, r the smallest holding var_frac (99%) of the variance;
    - pca_signed: the d principal directions AND their negatives (2d rows): an SAE's codes are
      >= 0, so it needs two latents to cover +/- one direction; the signed basis is the fair PCA dictionary.
    pca: M.pca_basis(x, var_frac), when the caller has it already. Returns (decoders by name, r)."""
    g = torch.Generator().manual_seed(seed)
    Vh, _, r = pca or M.pca_basis(x, var_frac)
    d = x.shape[1]
    return {"random_isotropic": M.random_unit_rows(n_latents, d, g),
            "random_pca_subspace": M.random_unit_rows(n_latents, d, g, basis=Vh[:r]),
            "pca_signed": torch.cat([Vh, -Vh]).double()}, r


def chance_levels(gt: GroundTruth, x: torch.Tensor, n_latents: int, seeds=(0, 1, 2),
                  var_frac: float = CHANCE_VAR_FRAC, names=None, threshold: float = RECOVERY_COS) -> dict:
    """score_decoder (without selectivity) for each chance_decoders baseline; the random ones
    averaged over `seeds` (the PCA basis is deterministic). -> {baseline: {feature set: {metric: value}}, "r": r}."""
    acc, r = {}, None
    pca = M.pca_basis(x, var_frac)                     # the same for every seed
    for i, seed in enumerate(seeds):
        decs, r = chance_decoders(x, n_latents, seed, var_frac, pca)
        for bname, D in decs.items():
            if bname == "pca_signed" and i > 0:
                continue
            sc = score_decoder(gt, D, names=names, threshold=threshold)
            for fn, s in sc.items():
                slot = acc.setdefault(bname, {}).setdefault(fn, {})
                for k, v in s.items():
                    slot.setdefault(k, []).append(v)
    out = {b: {fn: {k: sum(v) / len(v) for k, v in s.items()} for fn, s in fs.items()} for b, fs in acc.items()}
    out["r"] = r
    out["n_latents"] = n_latents
    out["seeds"] = list(seeds)
    return out
