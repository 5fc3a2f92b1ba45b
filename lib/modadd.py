"""The modular-addition transformer and its Fourier ground truth (Nanda et al. 2023,
"Progress measures for grokking via mechanistic interpretability").

Shared by 01 (trains it), 02 (reads its activations) and 04 (splices SAE
reconstructions back in and scores latents against the Fourier features).

The task: input [a, b, =] (`=` is token id p), predict c = (a + b) mod p at the
`=` position ONLY. The answer c is never an input token: a public attempt that
read activations at a position whose input was c "grokked" in 1-3 epochs and
everything downstream was noise. `check_no_answer_leak` guards every batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_post", "mlp_out", "resid_post")


# ----------------------------------------------------------------------------
# Data

def all_pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (a, b) in Z_p x Z_p, row index a*p + b: tokens [p^2, 3] and labels [p^2]."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    eq = torch.full_like(a, p)
    return torch.stack([a, b, eq], 1), (a + b) % p


def train_test_split(p: int, train_frac: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of the p^2 row indices (train first)."""
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_frac * p * p))
    return perm[:n_train], perm[n_train:]


def check_no_answer_leak(tokens: torch.Tensor, labels: torch.Tensor, p: int) -> None:
    """Raise if a batch could let the model read the answer.

    The model attends only to its input tokens. A batch is honest when every row
    is exactly [a, b, =] with a, b in Z_p and `=` = p in the last (predicted)
    slot, and the label is (a + b) mod p. A batch that carries c anywhere (as a
    third token, in place of `=`, or as an extra position) fails one of these.
    """
    if tokens.ndim != 2 or tokens.shape[1] != 3:
        raise ValueError(f"answer leak guard: sequences must be [a, b, =], got shape {tuple(tokens.shape)}")
    if not bool((tokens[:, 2] == p).all()):
        raise ValueError("answer leak guard: the predicted position must hold the `=` token")
    if not bool(((tokens[:, :2] >= 0) & (tokens[:, :2] < p)).all()):
        raise ValueError("answer leak guard: a and b must be residues in [0, p)")
    if not bool((labels == (tokens[:, 0] + tokens[:, 1]) % p).all()):
        raise ValueError("answer leak guard: labels are not (a + b) mod p of the inputs")


# ----------------------------------------------------------------------------
# Model: one-layer (by default) attention + ReLU MLP, learned positions, no LayerNorm.

@dataclass
class ModelConfig:
    p: int = 113
    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3

    @property
    def d_vocab(self) -> int:  # residues plus `=`
        return self.p + 1


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
        self.n_heads, self.d_head = h, dh
        self.W_Q = nn.Parameter(torch.randn(d, h * dh) / math.sqrt(d))
        self.W_K = nn.Parameter(torch.randn(d, h * dh) / math.sqrt(d))
        self.W_V = nn.Parameter(torch.randn(d, h * dh) / math.sqrt(d))
        self.W_O = nn.Parameter(torch.randn(h * dh, d) / math.sqrt(h * dh))
        self.W_in = nn.Parameter(torch.randn(d, cfg.d_mlp) / math.sqrt(d))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.randn(cfg.d_mlp, d) / math.sqrt(cfg.d_mlp))
        self.b_out = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor, last_only: bool, hook, layer: int) -> torch.Tensor:
        """x [B, T, d]. With last_only, compute queries and the MLP for the final
        position only: the loss is read there, and nothing after needs the rest."""
        B, T, _ = x.shape
        x = _hook(hook, "resid_pre", layer, x)
        q_in = x[:, -1:] if last_only else x
        q = (q_in @ self.W_Q).view(B, q_in.shape[1], self.n_heads, self.d_head).transpose(1, 2)
        k = (x @ self.W_K).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        v = (x @ self.W_V).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        # Causal: with last_only the single query is the final position, which sees all.
        z = F.scaled_dot_product_attention(q, k, v, is_causal=not last_only)
        attn_out = z.transpose(1, 2).reshape(B, q_in.shape[1], -1) @ self.W_O
        attn_out = _hook(hook, "attn_out", layer, attn_out)
        x = (x[:, -1:] if last_only else x) + attn_out
        x = _hook(hook, "resid_mid", layer, x)
        post = F.relu(x @ self.W_in + self.b_in)
        post = _hook(hook, "mlp_post", layer, post)
        mlp_out = post @ self.W_out + self.b_out
        mlp_out = _hook(hook, "mlp_out", layer, mlp_out)
        x = x + mlp_out
        return _hook(hook, "resid_post", layer, x)


    def forward_tables(self, tokens: torch.Tensor, W_E: torch.Tensor, W_pos: torch.Tensor) -> torch.Tensor:
        """The same one-layer forward at `=`, computed per vocabulary entry instead of per row.

        In the first layer, position 0 holds only embed(a) + pos0, position 1 only
        embed(b) + pos1, and position 2 is always `=`: so keys, values (already
        multiplied by W_O) and the attention scores of the one query are tables
        over the p residues, gathered by a and b. Exact, and it removes the
        per-row attention matmuls: training costs little more than the MLP.
        """
        h, dh = self.n_heads, self.d_head
        a, b = tokens[:, 0], tokens[:, 1]
        x01 = W_E[None] + W_pos[:2, None]                  # [2, vocab, d]: every token at pos 0 and 1
        x2 = W_E[tokens[0, 2]] + W_pos[2]                   # [d]: `=` at pos 2 (same for every row)
        q = (x2 @ self.W_Q).view(h, dh)
        W_O = self.W_O.view(h, dh, -1)
        k01 = (x01 @ self.W_K).view(2, -1, h, dh)
        vo01 = torch.einsum("pvhe,hed->pvhd", (x01 @ self.W_V).view(2, -1, h, dh), W_O)
        k2, vo2 = (x2 @ self.W_K).view(h, dh), torch.einsum("he,hed->hd", (x2 @ self.W_V).view(h, dh), W_O)
        s01 = (k01 * q).sum(-1) / math.sqrt(dh)             # [2, vocab, h]
        s2 = (k2 * q).sum(-1) / math.sqrt(dh)               # [h]
        # One table per position: [score (h) | value @ W_O (h*d)], gathered once per row.
        tab = torch.cat([s01, vo01.flatten(2)], -1)         # [2, vocab, h + h*d]
        g0, g1 = F.embedding(a, tab[0]), F.embedding(b, tab[1])
        w = torch.stack([g0[:, :h], g1[:, :h], s2.expand(len(a), h)], -1).softmax(-1)   # [B, h, 3]
        B = len(a)
        attn_out = ((w[..., 0:1] * g0[:, h:].view(B, h, -1)).sum(1) +
                    (w[..., 1:2] * g1[:, h:].view(B, h, -1)).sum(1) + w[..., 2] @ vo2)
        x = x2 + attn_out
        x = x + F.relu(x @ self.W_in + self.b_in) @ self.W_out + self.b_out
        return x


def _hook(hook, site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Let `hook(site, layer, x_eq)` read (and optionally replace) the `=` position."""
    if hook is None:
        return x
    new = hook(site, layer, x[:, -1])
    if new is None:
        return x
    if x.shape[1] == 1:
        return new[:, None]
    return torch.cat([x[:, :-1], new[:, None]], 1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.randn(cfg.d_vocab, cfg.d_model) / math.sqrt(cfg.d_model))
        self.W_pos = nn.Parameter(torch.randn(cfg.n_ctx, cfg.d_model) / math.sqrt(cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.W_U = nn.Parameter(torch.randn(cfg.d_model, cfg.p) / math.sqrt(cfg.d_model))

    def forward(self, tokens: torch.Tensor, hook=None) -> torch.Tensor:
        """Logits over the p residues at the `=` position only: [B, p].

        hook(site, layer, x) sees each site at `=` ([B, width]) and may return a
        replacement (how 02 reads activations and 04 splices reconstructions in).
        """
        if hook is None and len(self.blocks) == 1 and tokens.shape[1] == 3:
            return self.blocks[0].forward_tables(tokens, self.W_E, self.W_pos) @ self.W_U
        x = self.W_E[tokens] + self.W_pos[: tokens.shape[1]]
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=(i == n - 1), hook=hook, layer=i)
        return x[:, -1] @ self.W_U


def site_width(cfg: ModelConfig, site: str) -> int:
    return cfg.d_mlp if site == "mlp_post" else cfg.d_model


@torch.no_grad()
def run_with_cache(model: Transformer, tokens: torch.Tensor, site: str, layer: int,
                   batch_size: int = 4096) -> torch.Tensor:
    """Activations at `=` for one (site, layer), batched: [N, width]."""
    outs = []
    for i in range(0, len(tokens), batch_size):
        got = {}

        def hook(s, l, x):
            if s == site and l == layer:
                got["x"] = x.clone()
        model(tokens[i:i + batch_size], hook=hook)
        outs.append(got["x"])
    return torch.cat(outs)


def load_run(run_dir, map_location="cpu") -> tuple[Transformer, dict]:
    """Load a trained model from a 01 run directory (safetensors + JSON only)."""
    from pathlib import Path

    from lib.common import UserError, check, load_json, load_tensors
    run_dir = Path(run_dir)
    check(run_dir.is_dir(), f"--run {run_dir} is not a directory")
    cfg_json = load_json(run_dir / "config.json", "run config")
    check("model" in cfg_json, f"run config {run_dir / 'config.json'} has no 'model' section")
    cfg = ModelConfig(**cfg_json["model"])
    model = Transformer(cfg)
    sd = load_tensors(run_dir / "model.safetensors", "model weights")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"model weights {run_dir / 'model.safetensors'} do not match config.json ({str(e).splitlines()[0]})")
    return model.to(map_location).eval(), cfg_json


# ----------------------------------------------------------------------------
# Fourier analysis over Z_p: the ground truth the SAEs are judged against.

def fourier_basis(p: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """Orthonormal real Fourier basis of R^p: rows [1/sqrt p, cos(2pi k x/p), sin(2pi k x/p) ...].

    Returns (F [p, p] with orthonormal rows, row names, frequency of each row; 0 = constant).
    For even p the Nyquist frequency has a cosine row only.
    """
    x = torch.arange(p, dtype=torch.float64)
    rows, names, freqs = [torch.ones(p, dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p)); names.append(f"cos{k}"); freqs.append(k)
        if 2 * k != p:
            rows.append(torch.sin(2 * math.pi * k * x / p)); names.append(f"sin{k}"); freqs.append(k)
    Fb = torch.stack(rows)
    Fb = Fb / Fb.norm(dim=1, keepdim=True)
    return Fb, names, freqs


def n_frequencies(p: int) -> int:
    return p // 2


def embedding_frequency_norms(W_E: torch.Tensor, p: int) -> torch.Tensor:
    """Norm of the embedding of the p residues along each frequency k (index 0 = constant): [p//2 + 1]."""
    Fb, _, freqs = fourier_basis(p)
    coef = Fb @ W_E[:p].double()                      # [p, d_model]
    energy = torch.zeros(n_frequencies(p) + 1, dtype=torch.float64)
    energy.index_add_(0, torch.tensor(freqs), coef.pow(2).sum(1))
    return energy.sqrt()


# A frequency is "key" when it holds at least KEY_SHARE_FACTOR times its fair share
# (1 / number of frequencies) of the embedding's non-constant Fourier energy.
KEY_SHARE_FACTOR = 3.0


def key_frequencies_from_embedding(W_E: torch.Tensor, p: int) -> tuple[list[int], torch.Tensor]:
    norms = embedding_frequency_norms(W_E, p)
    energy = norms[1:].pow(2)
    share = energy / energy.sum().clamp_min(1e-30)
    keys = [k + 1 for k in range(len(share)) if share[k] >= KEY_SHARE_FACTOR / len(share)]
    return keys, share


def grid_frequency_purity(grid: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For functions on the (a, b) grid, the share of non-constant variance carried by one frequency.

    grid: [..., p, p] (value at (a, b)). 2-D DFT in the orthonormal basis; the
    coefficient at basis rows (i, j) has frequencies (k_i, k_j). Frequency k is
    credited with every term whose non-zero frequencies are all k: linear in a
    (k, 0), linear in b (0, k), and the products (k, k), which span cos/sin of
    k(a + b) and k(a - b). Returns (purity [...], best k [...]).
    """
    Fb, _, freqs = fourier_basis(p)
    Fb = Fb.to(grid.device)
    coef = torch.einsum("ia,...ab,jb->...ij", Fb, grid.double(), Fb)
    power = coef.pow(2)
    fr = torch.tensor(freqs, device=grid.device)
    fi, fj = fr[:, None], fr[None, :]
    total = power.sum((-1, -2)) - power[..., 0, 0]
    K = n_frequencies(p)
    per_k = []
    for k in range(1, K + 1):
        mask = ((fi == k) & (fj == 0)) | ((fi == 0) & (fj == k)) | ((fi == k) & (fj == k))
        per_k.append((power * mask).sum((-1, -2)))
    per_k = torch.stack(per_k, -1)                    # [..., K]
    best = per_k.max(-1)
    purity = best.values / total.clamp_min(1e-30)
    purity = torch.where(total > 1e-20, purity, torch.zeros_like(purity))
    return purity, best.indices + 1


def key_direction_basis(p: int, keys: list[int]) -> torch.Tensor:
    """Orthonormal columns over the p^2 grid: constant + cos/sin of k(a + b) for each key k. [p^2, 1 + 2K]."""
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    cols = [torch.ones(p * p, dtype=torch.float64)]
    for k in keys:
        w = 2 * math.pi * k / p
        cols += [torch.cos(w * (a + b)), torch.sin(w * (a + b))]
    Q, _ = torch.linalg.qr(torch.stack(cols, 1))
    return Q


@torch.no_grad()
def fourier_analysis(model: Transformer, train_idx: torch.Tensor | None = None,
                     neuron_purity_min: float = 0.5) -> dict:
    """Key frequencies and how much of the model they explain (Nanda et al. 2023 §4-5).

    - embedding: each frequency's share of the non-constant Fourier energy of W_E;
      key frequencies hold >= KEY_SHARE_FACTOR x a fair share.
    - neurons: each layer-0 MLP neuron's activation over the (a, b) grid, its 2-D
      DFT, its dominant frequency and purity (see grid_frequency_purity).
    - restricted loss: logits projected (per output c, over the p^2 grid) onto
      constant + cos/sin k(a+b) for key k; excluded loss: those key directions removed.
    """
    cfg = model.cfg
    p = cfg.p
    model = model.cpu().double()
    tokens, labels = all_pairs(p)
    keys, share = key_frequencies_from_embedding(model.W_E, p)

    post = run_with_cache(model, tokens, "mlp_post", 0).double()   # [p^2, d_mlp]
    grid = post.T.reshape(cfg.d_mlp, p, p)
    purity, kbest = grid_frequency_purity(grid, p)
    alive = post.std(0) > 1e-6
    neuron_counts = {}
    for k, pu, al in zip(kbest.tolist(), purity.tolist(), alive.tolist()):
        if al and pu >= neuron_purity_min:
            neuron_counts[k] = neuron_counts.get(k, 0) + 1
    neuron_keys = sorted(k for k, n in neuron_counts.items() if n >= max(2, 0.02 * cfg.d_mlp))

    logits = model(tokens)
    idx = torch.arange(p * p) if train_idx is None else train_idx
    def ce(lg):
        return float(F.cross_entropy(lg[idx], labels[idx]))
    out = {
        "p": p,
        "key_frequencies": keys,
        "key_rule": f"embedding share >= {KEY_SHARE_FACTOR} / {len(share)} of non-constant Fourier energy",
        "embedding_energy_share": {str(k + 1): round(float(s), 6) for k, s in enumerate(share)},
        "key_energy_fraction": float(share[[k - 1 for k in keys]].sum()) if keys else 0.0,
        "neuron_key_frequencies": neuron_keys,
        "neuron_frequency_counts": {str(k): n for k, n in sorted(neuron_counts.items())},
        "neuron_purity_min": neuron_purity_min,
        "fraction_neurons_pure": float(((purity >= neuron_purity_min) & alive).sum() / alive.sum().clamp_min(1)),
        "loss": ce(logits),
    }
    if keys:
        Q = key_direction_basis(p, keys)
        restricted = Q @ (Q.T @ logits)
        Qk = Q[:, 1:]
        excluded = logits - Qk @ (Qk.T @ logits)
        out["restricted_loss"] = ce(restricted)
        out["excluded_loss"] = ce(excluded)
    out["loss_split"] = "train" if train_idx is not None else "all"
    model.float()
    return out


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
