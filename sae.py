"""Sparse autoencoders in one file: ReLU (L1), TopK, BatchTopK and JumpReLU.

All four share one skeleton (Bricken et al. 2023, "Towards Monosemanticity"):

    pre   = (x - b_dec) @ W_enc + b_enc        [N, d_sae]   pre-activations
    f     = sigma(pre)                         [N, d_sae]   the code: sparse and >= 0
    x_hat = f @ W_dec + b_dec                  [N, d_in]    the reconstruction

with W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (one row per latent: its dictionary
direction). They differ only in sigma and in how sparsity enters the loss:

  relu       f = ReLU(pre)                          L = |x - x_hat|^2 + l1_coeff * sum_i f_i
  topk       f = ReLU(TopK_k(pre)), each row        L = |x - x_hat|^2 + (1/32) * AuxK        (Gao et al. 2024)
  batchtopk  f = ReLU(TopK_{k*B}(pre)), whole batch L = |x - x_hat|^2 + (1/32) * AuxK        (Bussmann et al. 2024)
             at inference f = pre * 1[pre > theta]  (theta learned during training)
  jumprelu   f = pre * H(pre - theta), theta per latent
                                                    L = |x - x_hat|^2 + lambda * sum_i H(pre_i - theta_i)
                                                                                             (Rajamanoharan et al. 2024)

|.|^2 is summed over d_in and averaged over the batch. The tricks, each where it is used:
  * b_dec is subtracted before encoding and initialised to the geometric median of the
    data (Weiszfeld's algorithm)                                 Bricken et al. 2023
  * decoder rows have unit norm: the gradient component parallel to each row is removed
    before the optimiser step and rows are renormalised after it  Bricken et al. 2023
  * init: random unit-norm decoder rows and W_enc = W_dec^T      Gao et al. 2024
    (or `init="orthogonal"`: a semi-orthogonal W_dec, rows then rescaled to unit norm)
  * AuxK: the k_aux most active *dead* latents reconstruct the residual e = x - x_hat;
    loss |e - e_hat|^2 / |e - mean(e)|^2, coefficient 1/32      Gao et al. 2024 (App. A.2)
  * BatchTopK's inference threshold: EMA of the smallest kept activation, so that one
    row's code does not depend on the rest of its batch         Bussmann et al. 2024
  * JumpReLU's straight-through pseudo-gradients, rectangle kernel of width eps; theta is
    stored as is, not as log theta (see SAE.__init__)           Rajamanoharan et al. 2024
  * ReLU: the *constrained* recipe (unit-norm decoder + plain L1), with the L1
    coefficient warmed up from 0 (Conerly et al. 2024, Anthropic's April 2024 update).
    With |W_dec_i| = 1 the update's sum_i f_i |W_dec_i| equals the plain L1, so both
    recipes optimise the same objective and nothing needs folding at export.
  * inputs scaled to unit mean squared norm while training, the scale folded into the
    saved weights (fold_input_scale_)                             Lieberum et al. 2024
  * lr warmup and a final linear decay live in 03_train_sae.py  Conerly et al. 2024

The TopK family trains on a sparse path: only the k active latents of a row are
decoded (embedding_bag) and back-propagated (CSR matmuls), Gao et al. 2024's "sparse
kernels" written with stock PyTorch ops; the dense path does the same maths.

Files: `save(dir)` writes `sae_weights.safetensors` + `cfg.json` in SAELens 6's
layout (relu -> "standard"; BatchTopK -> "jumprelu" with its threshold on every
latent, as SAELens exports it), so `sae_lens.SAE.load_from_disk(dir)` gives the same
codes and reconstructions as ours (checked bit for bit against sae-lens 6.54.12), and
`SAE.load(dir)` reads SAELens's own (standard, topk, jumprelu, batchtopk; pre-6 configs).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_json, load_tensors, save_json, save_tensors

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
# Our name -> the `architecture` SAELens 6 gives the inference model. BatchTopK is
# saved as a JumpReLU whose threshold is the same for every latent (as SAELens does).
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
# SAELens reads a config without metadata.sae_lens_version >= 6 as the pre-6 layout
# (and drops our metadata); this is the on-disk format version we follow.
SAELENS_FORMAT_VERSION = "6.0.0"
NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

# CSR tensors are marked beta; we only use them inside the backward passes below, built
# from indices that are valid by construction (so invariant checks are off on purpose).
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


# ----------------------------------------------------------------------------
# Small pieces: geometric median, row-wise top-k, the sparse pattern.

@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """argmin_y sum_i |x_i - y| by Weiszfeld's algorithm: y <- sum_i w_i x_i / sum_i w_i,
    w_i = 1 / |x_i - y|. Robust to outliers where the mean is not (Bricken et al. 2023)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w @ x) / w.sum()
        done = (y_new - y).norm() <= tol * (1.0 + y.norm())
        y = y_new
        if done:
            break
    return y.float()


def topk_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of ReLU(pre): (values >= 0, indices), unsorted; pre [n, d].

    The same code as ReLU(TopK(pre)) (Gao et al. 2024; SAELens): where a row has fewer
    than k positive entries, which zeros fill the rest does not matter. Two CPU tricks,
    both exact, because torch.topk costs ~10 ns per element, more than the encoder
    matmul at d_sae=1024:
      * non-negative floats order like their int32 bit patterns, and int32 top-k skips
        the NaN-aware float comparison (~1.7x faster);
      * two stages: split each row into d/s strided groups of s and keep the k groups
        with the largest maxima. Every top-k element lies in one of them (the k-th
        largest group max is a lower bound on the k-th largest element), so top-k over
        those k*s candidates is exact, touching d/s + k*s values instead of d.
    """
    n, d = pre.shape
    if pre.device.type != "cpu":
        v, i = pre.topk(k, dim=-1, sorted=False)
        return v.relu(), i
    s = 1 << max(0, int(math.log2(math.sqrt(d / max(k, 1)))))      # ~minimises d/s + k*s
    if s < 2 or d % s or d // s + k * s > d // 2:
        r = pre.relu()
        i = r.view(torch.int32).topk(k, dim=-1, sorted=False).indices
        return r.gather(1, i), i
    g = d // s
    group_max = pre.view(n, s, g).amax(1).relu_()                   # group j: entries j, j+g, ...
    top_groups = group_max.view(torch.int32).topk(k, dim=-1, sorted=False).indices
    cand = (top_groups.unsqueeze(-1) + g * torch.arange(s, device=pre.device)).view(n, k * s)
    cv = pre.gather(1, cand).relu_()
    j = cv.view(torch.int32).topk(k, dim=-1, sorted=False).indices
    return cv.gather(1, j), cand.gather(1, j)


class SparsePattern:
    """The active (row, latent) pairs of a batch in CSR order: row r owns
    col[crow[r]:crow[r+1]]. Built once per step; its transpose (latent-major, needed
    for the weight gradients) is built lazily and shared by encoder and decoder."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int, width: int = 0):
        self.crow, self.col, self.n_rows, self.n_cols = crow, col, n_rows, n_cols
        self.width = width          # > 0: every row has exactly `width` entries (TopK)
        self._t = None

    @classmethod
    def from_topk(cls, idx: torch.Tensor, n_cols: int) -> "SparsePattern":
        n, m = idx.shape
        crow = torch.arange(0, n * m + 1, m, device=idx.device)
        return cls(crow, idx.reshape(-1), n, n_cols, width=m)

    @classmethod
    def from_flat(cls, flat: torch.Tensor, n_rows: int, n_cols: int) -> "SparsePattern":
        """From sorted flat indices row * n_cols + col."""
        rows, col = flat // n_cols, flat % n_cols
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=flat.device)
        torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
        return cls(crow, col, n_rows, n_cols)

    @property
    def offsets(self) -> torch.Tensor:
        return self.crow[:-1]

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """[n_rows, n_cols] sparse matrix with this pattern."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.n_rows, self.n_cols),
                                       check_invariants=False)

    def t_matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """S^T @ dense, S the [n_rows, n_cols] matrix with this pattern and `values`.
        Sparse (CSR of the transpose) when S is sparse; a dense matmul once more than
        1/8 of S is filled (AuxK over few dead latents), where that is faster here."""
        if self.width and self.width * 8 > self.n_cols:
            S = torch.zeros(self.n_rows, self.n_cols, dtype=values.dtype, device=values.device)
            S.scatter_(1, self.col.view(self.n_rows, self.width), values.view(self.n_rows, self.width))
            return S.t() @ dense
        return self.csr_t(values) @ dense

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """[n_cols, n_rows] sparse transpose: entries stably sorted by latent."""
        if self._t is None:
            # int32 keys sort ~3x faster than int64 here; latent ids fit easily
            perm = torch.argsort(self.col.to(torch.int32), stable=True)
            crow_t = torch.zeros(self.n_cols + 1, dtype=torch.long, device=self.col.device)
            torch.cumsum(torch.bincount(self.col, minlength=self.n_cols), 0, out=crow_t[1:])
            if self.width:
                rows_t = perm // self.width
            else:
                rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.col.device), self.crow.diff())
                rows_t = rows.index_select(0, perm)
            self._t = (perm, crow_t, rows_t)
        perm, crow_t, rows_t = self._t
        return torch.sparse_csr_tensor(crow_t, rows_t, values.index_select(0, perm),
                                       (self.n_cols, self.n_rows), check_invariants=False)


class _SparseEncode(torch.autograd.Function):
    """vals = pre[pattern], pre = x_c @ W_enc + b_enc computed beforehand without grad,
    x_c = x - b_dec. The backward touches only the active entries. With G the sparse
    [N, d_sae] matrix of d(loss)/d(vals):
        dW_enc = x_c^T G         (CSR: G^T x_c)
        db_enc = column sums of G
        db_dec = -W_enc db_enc   (b_dec is subtracted from every row: a mat-vec, not a matmul)
    """

    @staticmethod
    def forward(ctx, vals, x_c, W_enc, b_enc, b_dec, pat):
        ctx.save_for_backward(x_c, W_enc)
        ctx.pat = pat
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        x_c, W_enc = ctx.saved_tensors
        pat = ctx.pat
        g = g.contiguous()
        dW_enc = pat.t_matmul(g, x_c).t() if ctx.needs_input_grad[2] else None
        db_enc = torch.zeros(pat.n_cols, dtype=g.dtype, device=g.device).index_add_(0, pat.col, g)
        db_dec = -(W_enc @ db_enc) if ctx.needs_input_grad[4] else None
        return None, None, dW_enc, db_enc if ctx.needs_input_grad[3] else None, db_dec, None


class _DenseEncode(torch.autograd.Function):
    """pre = (x - b_dec) @ W_enc + b_enc. Autograd would get b_dec's gradient through
    d x_c = G @ W_enc^T, a full [B, d_sae] x [d_sae, d_in] matmul; it is only summed
    over rows, so db_dec = -W_enc @ db_enc, a mat-vec (openai/sparse_autoencoder does the same)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec):
        x_c = x - b_dec
        ctx.save_for_backward(x_c, W_enc)
        return torch.addmm(b_enc, x_c, W_enc)

    @staticmethod
    def backward(ctx, g):
        x_c, W_enc = ctx.saved_tensors
        db_enc = g.sum(0)
        dx = g @ W_enc.t() if ctx.needs_input_grad[0] else None     # only if x itself needs grad
        dW_enc = x_c.t() @ g if ctx.needs_input_grad[1] else None
        db_dec = -(W_enc @ db_enc) if ctx.needs_input_grad[3] else None
        return dx, dW_enc, db_enc, db_dec


class _SparseDecode(torch.autograd.Function):
    """x_hat = f @ W_dec for a sparse f (vals on pattern), without materialising f:
    forward  embedding_bag (a weighted sum of the active rows of W_dec),
    backward d vals = (g @ W_dec^T) sampled at the pattern (sampled_addmm),
             dW_dec = f^T g (CSR transpose times dense)."""

    @staticmethod
    def forward(ctx, vals, W_dec, pat):
        ctx.save_for_backward(vals, W_dec)
        ctx.pat = pat
        return F.embedding_bag(pat.col, W_dec, pat.offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, g):
        vals, W_dec = ctx.saved_tensors
        pat = ctx.pat
        g = g.contiguous()
        dvals = dW_dec = None
        if ctx.needs_input_grad[0]:
            dvals = torch.sparse.sampled_addmm(pat.csr(torch.zeros_like(vals)), g, W_dec.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            dW_dec = pat.t_matmul(vals, g)
        return dvals, dW_dec, None


class _JumpReLU(torch.autograd.Function):
    """The JumpReLU layer and its L0, with the straight-through pseudo-gradients of
    Rajamanoharan et al. 2024, K the rectangle kernel of width eps:

        f  = z * H(z - theta)       df/dz = H(z - theta)    df/dtheta = -(theta/eps) K((z - theta)/eps)
        L0 = sum_i H(z_i - theta_i)  dL0/dz = 0              dL0/dtheta = -(1/eps) K((z - theta)/eps)

    Sparsity is learned through theta alone. One function for both, so the kernel
    window is computed once: theta's gradient is -(1/eps) sum_rows K * (theta g_f + g_L0).
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        mask = z > theta
        ctx.save_for_backward(z, theta, mask)
        ctx.eps = eps
        return torch.where(mask, z, 0.0), mask.view(torch.uint8).sum(-1, dtype=torch.int32).to(z.dtype)

    @staticmethod
    def backward(ctx, g_f, g_l0):
        z, theta, mask = ctx.saved_tensors
        eps = ctx.eps
        window = (z > theta - eps / 2) & (z < theta + eps / 2)      # K((z - theta)/eps) != 0
        w = g_f * theta if g_l0 is None else torch.addcmul(g_l0.unsqueeze(-1), g_f, theta)
        dtheta = w.mul_(window).sum(0).div_(-eps)
        return torch.where(mask, g_f, 0.0), dtheta, None


# ----------------------------------------------------------------------------
# The model.

@dataclass
class SAEOutput:
    """What forward() returns. `loss` is the sum of `losses`, the terms by name
    (mse, and l1_loss | l0_loss | auxk_loss). The code is dense `acts` [N, d_sae] on the dense
    path; on the sparse path it is `pattern` + `vals` (see `code()`)."""
    x_hat: torch.Tensor
    loss: torch.Tensor
    losses: dict
    acts: torch.Tensor | None = None
    pattern: SparsePattern | None = None
    vals: torch.Tensor | None = None
    l0: torch.Tensor | None = None            # mean active latents per row (no grad)
    fired: torch.Tensor | None = None         # [d_sae] bool: latent fired on some row (no grad)
    min_active: torch.Tensor | None = None    # batchtopk: smallest kept activation (no grad)
    extra: dict = field(default_factory=dict)

    def code(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        p = self.pattern
        return p.csr(self.vals.detach()).to_dense()


class SAE(nn.Module):
    """A sparse autoencoder; `arch` in relu | topk | batchtopk | jumprelu ("standard" = relu).

    k: active latents per row (topk), on average per row (batchtopk), the target L0
    (relu, jumprelu: 03_train_sae.py steers lambda toward it). l1_coeff / l0_coeff:
    lambda of the relu / jumprelu loss for inputs at unit mean squared norm (the trainer
    schedules it and passes `sparsity_coeff`).
    k_aux (default d_in // 2) and auxk_coeff (1/32): AuxK, Gao et al. 2024.
    bandwidth eps and init_threshold: JumpReLU, defaults 0.001 as in Rajamanoharan et al.
    2024 for inputs scaled to unit mean squared norm. threshold_ema: BatchTopK's EMA rate.
    """

    def __init__(self, d_in: int, d_sae: int, arch: str = "topk", k: int | None = None, *,
                 k_aux: int | None = None, auxk_coeff: float = 1 / 32,
                 l1_coeff: float = 0.05, l0_coeff: float = 1e-3,
                 bandwidth: float = 1e-3, init_threshold: float = 1e-3, threshold_ema: float = 0.01,
                 init: str = "tied", apply_b_dec_to_input: bool = True,
                 normalize_activations: str = "none", sparse: bool | None = None,
                 generator: torch.Generator | None = None, metadata: dict | None = None):
        super().__init__()
        arch = "relu" if arch == "standard" else arch
        if arch not in ARCHS:
            raise UserError(f"unknown SAE architecture {arch!r} (choose from {', '.join(ARCHS)})")
        if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
            raise UserError(f"d_in and d_sae must be positive integers (got {d_in}, {d_sae})")
        if arch in ("topk", "batchtopk") and k is None:
            raise UserError(f"arch {arch} needs k")
        if k is not None and not (0 < k <= d_sae):
            raise UserError(f"k must be in 1..d_sae={d_sae} (got {k})")
        if normalize_activations not in NORMALIZE_MODES:
            raise UserError(f"normalize_activations must be one of {', '.join(NORMALIZE_MODES)} "
                            f"(got {normalize_activations!r})")
        if init not in ("tied", "orthogonal"):
            raise UserError(f"init must be tied or orthogonal (got {init!r})")
        self.d_in, self.d_sae, self.arch, self.k = d_in, d_sae, arch, k
        self.k_aux = d_in // 2 if k_aux is None else k_aux
        self.auxk_coeff, self.l1_coeff, self.l0_coeff = auxk_coeff, l1_coeff, l0_coeff
        self.bandwidth, self.threshold_ema = bandwidth, threshold_ema
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.normalize_activations = normalize_activations
        self.sparse = sparse            # None: decided per batch by use_sparse()
        self.metadata = dict(metadata or {})

        # Gao et al. 2024: unit-norm random decoder rows, encoder = decoder transpose.
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        if init == "orthogonal":      # ~a tight frame: orthonormal columns, then unit rows
            q, r = torch.linalg.qr(W_dec)
            W_dec = q * torch.sign(torch.diagonal(r))
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().contiguous())     # row-major: optimiser state matches it
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if arch == "jumprelu":
            # theta is stored directly (not log theta as in the paper): under Adam a
            # parameter moves ~lr per step whatever its gradient, so log theta moves theta
            # by only ~theta*lr and a small initial threshold barely moves (SAELens issue
            # #494: L0 then sits still). Stored as is, it is also exactly the `threshold`
            # tensor on disk. Kept >= 0 by post_step_().
            self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)))
        elif arch == "batchtopk":
            # Not learned by gradient: an EMA of the smallest kept activation (one value,
            # stored per latent as SAELens's JumpReLU export expects). 0 = not yet set.
            self.register_buffer("threshold", torch.zeros(d_sae))

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}"

    # -- initialisation and the decoder constraint ---------------------------

    @torch.no_grad()
    def init_b_dec_(self, sample: torch.Tensor) -> None:
        """b_dec <- geometric median of a data sample (Bricken et al. 2023)."""
        self.b_dec.copy_(geometric_median(sample))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component along each (unit) decoder row before the
        optimiser step, so the step moves a row's direction, not its norm (Bricken et al.
        2023). Call after the gradients are final (after any all-reduce)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def post_step_(self) -> None:
        """After each optimiser step: decoder rows back to unit norm; JumpReLU theta >= 0."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self.arch == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_threshold_(self, min_active: torch.Tensor | float) -> None:
        """BatchTopK: theta <- (1 - a) theta + a * (smallest kept activation of the batch).
        The first update sets theta outright so a short run is not biased toward 0."""
        m = float(min_active)
        if not math.isfinite(m) or m <= 0:
            return
        t = self.threshold
        if float(t[0]) == 0.0:
            t.fill_(m)
        else:
            t.mul_(1 - self.threshold_ema).add_(self.threshold_ema * m)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """The SAE was trained on s*x; make it take and return x. Pre-activations and the
        code are divided by s (b_enc, b_dec, theta / s; W_enc, W_dec unchanged), so the
        decoder rows stay unit-norm and the code is in the input's own units. Same maths
        as SAELens's fold_activation_norm_scaling_factor up to where s sits."""
        s = float(scale)
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        if self.arch in ("jumprelu", "batchtopk"):
            self.threshold.div_(s)

    # -- inference --------------------------------------------------------------

    def _norm_in(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens's run-time normalisation (only for SAEs loaded from SAELens; ours
        fold any scale into the weights and use "none"). "expected_average_only_in" is
        the identity at inference there too: its scale lives outside the SAE."""
        mode = self.normalize_activations
        if mode == "constant_norm_rescale":
            c = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            self._norm_ctx = ("scale", c)
            return x * c
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            x = x - mu
            std = x.std(-1, keepdim=True)
            self._norm_ctx = ("ln", mu, std)
            return x / (std + 1e-5)
        return x

    def _norm_out(self, x_hat: torch.Tensor) -> torch.Tensor:
        mode = self.normalize_activations
        if mode in ("constant_norm_rescale", "layer_norm"):
            ctx = getattr(self, "_norm_ctx", None)
            if ctx is None:
                raise RuntimeError(f"decode() of a normalize_activations={mode} SAE needs encode() first")
            del self._norm_ctx
            return x_hat / ctx[1] if ctx[0] == "scale" else x_hat * ctx[2] + ctx[1]
        return x_hat

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x - b_dec) @ W_enc + b_enc for training (b_dec's gradient by a mat-vec)."""
        if self.apply_b_dec_to_input:
            return _DenseEncode.apply(x, self.W_enc, self.b_enc, self.b_dec)
        return torch.addmm(self.b_enc, x, self.W_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """sigma at inference: a row's code depends on that row alone (BatchTopK uses theta)."""
        if self.arch == "relu":
            return pre.relu()
        if self.arch == "topk":
            v, i = topk_relu(pre, self.k)
            return torch.zeros_like(pre).scatter_(-1, i, v)
        # jumprelu, and batchtopk exported as a JumpReLU: relu(pre) * 1[pre > theta]
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> code [N, d_sae], dense, inference semantics. Written op for op
        as SAELens does, so our codes and theirs agree bit for bit."""
        x = self._norm_in(x.to(self.W_enc.dtype))
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return self.activation(x @ self.W_enc + self.b_enc)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """code [N, d_sae] -> reconstruction [N, d_in]."""
        return self._norm_out(acts @ self.W_dec + self.b_dec)

    # -- training -----------------------------------------------------------------

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                sparsity_coeff: float | None = None, all_reduce=None) -> SAEOutput:
        """Code, reconstruction and loss terms for a batch x [B, d_in].

        In training mode BatchTopK selects over the batch; in eval mode every arch uses
        its inference code. dead_mask [d_sae] (bool): latents dead long enough for AuxK.
        sparsity_coeff overrides l1_coeff / l0_coeff (warmup, lambda control).
        all_reduce(t): sums t in place over processes (DDP), so that AuxK's normaliser is
        the error variance of the *global* batch and N processes match one.
        """
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            x_in = self._norm_in(x)
            out = self._forward_dense(x_in, None, sparsity_coeff)
            out.x_hat = self._norm_out(out.x_hat)
            return out
        if self.use_sparse(x):
            return self._forward_sparse(x, dead_mask, all_reduce)
        return self._forward_dense(x, dead_mask, sparsity_coeff, all_reduce)

    def use_sparse(self, x: torch.Tensor) -> bool:
        """TopK family only. Measured: on CPU the sparse path wins at every size tried
        (2.5x at 128 -> 1024); on an H200 the dense one wins below d_in * d_sae ~ 4M,
        where kernel launches, not FLOPs, set the pace (bench/bench_sae.py)."""
        if self.arch not in ("topk", "batchtopk"):
            return False
        if self.sparse is not None:
            return self.sparse
        return x.device.type == "cpu" or self.d_in * self.d_sae >= 1 << 22

    def _forward_dense(self, x, dead_mask, sparsity_coeff, all_reduce=None) -> SAEOutput:
        pre = self.pre_acts(x)
        losses, extra = {}, {}
        min_active = None
        if self.arch == "relu":
            acts = pre.relu()
            lam = self.l1_coeff if sparsity_coeff is None else sparsity_coeff
            # sum_i f_i |W_dec_i| (the April update's penalty) == sum_i f_i: rows are unit norm.
            losses["l1_loss"] = lam * acts.sum(-1).mean()
        elif self.arch == "jumprelu":
            acts, l0_rows = _JumpReLU.apply(pre, self.threshold, self.bandwidth)
            lam = self.l0_coeff if sparsity_coeff is None else sparsity_coeff
            losses["l0_loss"] = lam * l0_rows.mean()
            extra["l0_rows"] = l0_rows
        elif self.arch == "topk" or not self.training:
            if self.arch == "batchtopk":
                acts = self.activation(pre)
            else:
                with torch.no_grad():
                    i = topk_relu(pre, self.k)[1]
                acts = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu())
        else:   # batchtopk, training, dense: top k*B over the whole batch
            with torch.no_grad():
                v, i = topk_relu(pre.view(1, -1), self.k * pre.shape[0])
                i = i.view(-1)
                pos = v[v > 0]
                min_active = pos.min() if pos.numel() else None
            acts = torch.zeros_like(pre).view(-1).scatter(0, i, pre.view(-1).gather(0, i).relu()).view_as(pre)
        x_hat = torch.addmm(self.b_dec, acts, self.W_dec)
        losses = {"mse": F.mse_loss(x_hat, x, reduction="sum") / x.shape[0], **losses}
        if self.training and self.arch in ("topk", "batchtopk") and dead_mask is not None:
            losses["auxk_loss"] = self.auxk_coeff * self._auxk_dense(x, x_hat, pre, dead_mask, all_reduce)
        with torch.no_grad():                      # (bool sums cost ~10x a uint8 sum on CPU)
            active = acts > 0
            fired = active.any(0)
            if "l0_rows" in extra:
                l0 = extra.pop("l0_rows").detach().sum() / x.shape[0]
            else:
                l0 = active.view(torch.uint8).sum(-1, dtype=torch.int32).sum() / x.shape[0]
        return SAEOutput(x_hat=x_hat, loss=sum(losses.values()), losses=losses, acts=acts,
                         l0=l0, fired=fired, min_active=min_active, extra=extra)

    def _forward_sparse(self, x, dead_mask, all_reduce) -> SAEOutput:
        B = x.shape[0]
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        with torch.no_grad():
            x_c = x - self.b_dec if self.apply_b_dec_to_input else x
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            min_active = None
            if self.arch == "topk" or not self.training:
                if self.arch == "topk":
                    v, i = topk_relu(pre, self.k)
                    pat, v = SparsePattern.from_topk(i, self.d_sae), v.reshape(-1)
                else:       # batchtopk at inference: pre > theta
                    keep = (pre > self.threshold) & (pre > 0)
                    flat = keep.view(-1).nonzero().squeeze(1)
                    pat, v = SparsePattern.from_flat(flat, B, self.d_sae), pre.view(-1)[flat]
            else:           # batchtopk, training: top k*B over the batch (Bussmann et al. 2024)
                v, flat = topk_relu(pre.view(1, -1), self.k * B)
                flat, order = flat.view(-1).sort()
                v = v.view(-1).index_select(0, order)
                pat = SparsePattern.from_flat(flat, B, self.d_sae)
                pos = v[v > 0]
                min_active = pos.min() if pos.numel() else None
        vals = _SparseEncode.apply(v, x_c, self.W_enc, self.b_enc, b_dec, pat).relu()
        x_hat = _SparseDecode.apply(vals, self.W_dec, pat) + self.b_dec
        losses = {"mse": F.mse_loss(x_hat, x, reduction="sum") / x.shape[0]}
        if self.training and dead_mask is not None:
            losses["auxk_loss"] = self.auxk_coeff * self._auxk_sparse(x, x_hat, x_c, pre, dead_mask, all_reduce)
        with torch.no_grad():
            on = vals > 0
            fired = torch.bincount(pat.col[on], minlength=self.d_sae) > 0
            l0 = on.sum() / B
        return SAEOutput(x_hat=x_hat, loss=sum(losses.values()), losses=losses, pattern=pat,
                         vals=vals, l0=l0, fired=fired, min_active=min_active)

    # -- AuxK (Gao et al. 2024, App. A.2) ----------------------------------------

    @torch.no_grad()
    def _auxk_select(self, pre, dead_mask):
        """The k_aux largest pre-activations among dead latents, per row."""
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.k_aux, dead.numel())
        if k_aux == 0:
            return None, None
        v, j = topk_relu(pre.index_select(1, dead), k_aux)
        return v, dead[j]

    def _auxk_loss(self, e, e_hat, all_reduce):
        """|e - e_hat|^2 / |e - mean(e)|^2 averaged over rows: normalised by the variance of
        the error as openai/sparse_autoencoder's train.py does, so the term does not shrink
        as the main reconstruction improves. The normaliser has no gradient."""
        num = (e - e_hat).pow(2).sum(-1).mean()
        with torch.no_grad():
            n = torch.tensor([float(e.shape[0])], dtype=torch.float64, device=e.device)
            stats = torch.cat([e.double().sum(0), e.double().pow(2).sum().view(1), n])
            if all_reduce is not None:
                all_reduce(stats)
            mean, sq, n = stats[:-2] / stats[-1], stats[-2] / stats[-1], stats[-1]
            var = (sq - mean.pow(2).sum()).clamp_min(1e-12).to(e.dtype)
        return num / var

    def _auxk_dense(self, x, x_hat, pre, dead_mask, all_reduce):
        v, idx = self._auxk_select(pre, dead_mask)
        if v is None:
            return x_hat.new_zeros(())
        aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
        e = (x - x_hat).detach()
        return self._auxk_loss(e, aux @ self.W_dec, all_reduce)   # e_hat has no b_dec: e already lacks it

    def _auxk_sparse(self, x, x_hat, x_c, pre, dead_mask, all_reduce):
        """AuxK as a TopK SAE over the sub-dictionary of dead latents: gather their
        encoder columns and decoder rows (autograd scatters the gradients back)."""
        with torch.no_grad():
            dead = dead_mask.nonzero().squeeze(1)
            k_aux = min(self.k_aux, dead.numel())
            if k_aux == 0:
                return x_hat.new_zeros(())
            v, j = topk_relu(pre.index_select(1, dead), k_aux)
        pat = SparsePattern.from_topk(j, dead.numel())
        W_enc, b_enc, W_dec = self.W_enc.index_select(1, dead), self.b_enc[dead], self.W_dec.index_select(0, dead)
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        vals = _SparseEncode.apply(v.reshape(-1), x_c, W_enc, b_enc, b_dec, pat).relu()
        e_hat = _SparseDecode.apply(vals, W_dec, pat)
        e = (x - x_hat).detach()
        return self._auxk_loss(e, e_hat, all_reduce)

    # -- files (SAELens 6 layout) -----------------------------------------------

    def cfg_dict(self, metadata: dict | None = None) -> dict:
        meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "model_name": None, "hook_name": None, "hook_head_index": None,
                **self.metadata, **(metadata or {}),
                "training_architecture": self.arch if self.arch != "relu" else "standard",
                "training_architecture_details": {
                    "k": self.k, "k_aux": self.k_aux, "auxk_coeff": self.auxk_coeff,
                    "l1_coeff": self.l1_coeff, "l0_coeff": self.l0_coeff, "bandwidth": self.bandwidth,
                    "threshold_ema": self.threshold_ema}}
        cfg = {"architecture": SAELENS_ARCH[self.arch], "d_in": self.d_in, "d_sae": self.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "reshape_activations": "none"}
        if self.arch in ("topk", "batchtopk"):
            cfg["k"] = self.k
        if self.arch == "topk":
            cfg["rescale_acts_by_decoder_norm"] = False
        cfg["metadata"] = meta
        return cfg

    def save(self, path, metadata: dict | None = None) -> Path:
        """Write sae_weights.safetensors + cfg.json (atomically). metadata is merged into
        cfg.json's `metadata` (hook_name, model_name, training config, seed, code_version...)."""
        path = Path(path)
        t = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.arch in ("jumprelu", "batchtopk"):
            t["threshold"] = self.threshold
        save_tensors({k: v.detach().float() for k, v in t.items()}, path / "sae_weights.safetensors")
        save_json(self.cfg_dict(metadata), path / "cfg.json")
        return path

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "SAE":
        """Read an SAE from DIR/cfg.json + DIR/sae_weights.safetensors: ours, or SAELens's
        (standard, topk, jumprelu incl. Gemma Scope conversions, batchtopk; pre-6 configs too).
        Any problem is one UserError line naming the file."""
        path = Path(path)
        check = _checker(path)
        cfg = load_json(path / "cfg.json", "SAE config")
        check(isinstance(cfg, dict), "cfg.json is not a JSON object")
        cfg = _upgrade_pre6_cfg(cfg)
        t = load_tensors(path / "sae_weights.safetensors", "SAE weights")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        arch_name = cfg.get("architecture", "standard")
        if arch_name == "jumprelu" and meta.get("training_architecture") == "batchtopk":
            arch = "batchtopk"
        else:
            arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                    "batchtopk": "batchtopk"}.get(arch_name)
        check(arch is not None, f"unknown architecture {arch_name!r} in cfg.json "
                                f"(supported: standard, topk, batchtopk, jumprelu)")
        for key in ("d_in", "d_sae"):
            check(isinstance(cfg.get(key), int) and cfg[key] > 0, f"cfg.json: {key} must be a positive integer")
        d_in, d_sae = cfg["d_in"], cfg["d_sae"]
        if "log_threshold" in t and "threshold" not in t:           # older SAELens JumpReLU
            t["threshold"] = t.pop("log_threshold").exp()
        if arch == "batchtopk" and "threshold" not in t and "topk_threshold" in t:
            t["threshold"] = torch.full((d_sae,), float(t.pop("topk_threshold")))
        need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch in ("jumprelu", "batchtopk") else [])
        missing = [n for n in need if n not in t]
        check(not missing, f"sae_weights.safetensors lacks {', '.join(missing)}")
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
                  "threshold": (d_sae,)}
        for n in need:
            check(tuple(t[n].shape) == shapes[n],
                  f"{n} has shape {list(t[n].shape)}, but cfg.json says d_in={d_in}, d_sae={d_sae} "
                  f"(expected {list(shapes[n])})")
            check(t[n].dtype.is_floating_point, f"{n} is {t[n].dtype}, not a float tensor")
            bad = ~torch.isfinite(t[n].float())
            if bad.any():
                where = bad.nonzero()[0].tolist()
                check(False, f"{n} holds NaN/inf (first at index {where})")
        details = meta.get("training_architecture_details")
        details = details if isinstance(details, dict) else {}
        k = cfg.get("k", details.get("k"))
        k_ok = isinstance(k, (int, float)) and not isinstance(k, bool) and k == int(k) and 0 < k <= d_sae
        if arch == "topk":
            check(k_ok, f"cfg.json: k={k!r} must be an integer in 1..d_sae={d_sae}")
        elif arch == "batchtopk" and not k_ok:
            arch = "jumprelu"       # same inference code; k only matters for training
        k = int(k) if k_ok else None
        norm = cfg.get("normalize_activations") or "none"
        check(norm in NORMALIZE_MODES, f"cfg.json: unknown normalize_activations {norm!r}")
        extra_scale = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
        check(extra_scale is None or torch.allclose(extra_scale, torch.ones_like(extra_scale)),
              "a finetuning scaling factor other than 1 is not supported")
        kw = {n: details[n] for n in ("k_aux", "auxk_coeff", "l1_coeff", "l0_coeff", "bandwidth", "threshold_ema")
              if isinstance(details.get(n), (int, float)) and not isinstance(details.get(n), bool)}
        sae = cls(d_in, d_sae, arch, k, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                  normalize_activations=norm, metadata=meta, **kw)
        with torch.no_grad():
            for n in need:
                getattr(sae, n).copy_(t[n].float())
            if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm"):
                # SAELens trained it "as if" W_dec were unit norm: fold the norms in
                # (SAELens _fold_norm_topk) so our plain encode gives the same code;
                # a threshold applies to the rescaled pre-activations, so it stays.
                norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
                sae.b_enc.mul_(norms)
                sae.W_enc.mul_(norms)
                sae.W_dec.div_(norms[:, None])
        return sae.to(device).eval()


def _checker(path: Path):
    def check(cond, msg):
        if not cond:
            raise UserError(f"SAE {path}: {msg}")
    return check


def _upgrade_pre6_cfg(cfg: dict) -> dict:
    """SAELens < 6 kept hook_name etc. at top level and sometimes encoded TopK as
    activation_fn='topk'; bring it to the 6.x layout (as SAELens's handle_pre_6_0_config)."""
    meta = cfg.get("metadata")
    version = (meta or {}).get("sae_lens_version") if isinstance(meta, dict) else None
    version = version or cfg.get("sae_lens_version")
    try:
        major = int(str(version).split(".")[0]) if version else 0
    except ValueError:
        major = 0
    if major >= 6 and isinstance(meta, dict):
        return cfg
    new = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in cfg.items()}
    new.setdefault("architecture", "standard")
    kw = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and kw.get("k") is not None:
        new["architecture"], new["k"] = "topk", kw["k"]
    if isinstance(new.get("normalize_activations"), bool):
        new["normalize_activations"] = "expected_average_only_in" if new["normalize_activations"] else "none"
    if new.get("normalize_activations") is None:
        new["normalize_activations"] = "none"
    keys = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path",
            "sae_lens_version", "sae_lens_training_version")
    new["metadata"] = {**{k: new[k] for k in keys if k in new}, **(meta if isinstance(meta, dict) else {})}
    return new
