"""The fast path of sae.py: the same maths as SAE._forward_dense, computed only where it is
non-zero. sae.py calls it in one place (`if self.use_sparse(x):` in SAE.forward) and for the
encoder's bias gradient; tests/test_kernels.py checks it equals the plain path in values and
gradients.

  * topk_relu: row-wise top-k of ReLU(pre) with two exact CPU tricks (int32 keys, two stages);
  * the sparse TopK-family step (Gao et al. 2024's "sparse kernels", written with stock
    PyTorch ops): only the k active latents of a row are decoded (embedding_bag) and
    back-propagated (CSR matmuls, sampled_addmm), so the step costs one dense encoder matmul
    plus O(B k d) instead of five dense [B, d_sae] x [d_sae, d_in] matmuls. relu and jumprelu
    take the same step once their code is sparse: relu on its positive pre-activations (its L1
    and its gradient live there too), jumprelu on pre > theta - eps/2 (the code and the window
    of theta's pseudo-gradient, _SparseJumpReLU); at L0 = k, 128 -> 1024, 1.8x (relu) and
    2.5x (jumprelu) their dense step (bench/bench_sae_cpu.txt);
  * encode: (x - b_dec) @ W_enc + b_enc whose backward gets b_dec's gradient as a mat-vec.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

# CSR tensors are marked beta; we only use them inside the backward passes below, built
# from indices that are valid by construction (so invariant checks are off on purpose).
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


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


def encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    """(x - b_dec) @ W_enc + b_enc (b_dec None: x @ W_enc + b_enc), b_dec's gradient by a mat-vec."""
    if b_dec is None:
        return torch.addmm(b_enc, x, W_enc)
    return _DenseEncode.apply(x, W_enc, b_enc, b_dec)


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


# ----------------------------------------------------------------------------
# The sparse step: what SAE.forward does, on the active latents (and jumprelu's kernel window).

MAX_FILL = 1 / 10   # relu, jumprelu: above this share of the (row, latent) pairs the dense path is faster
                    # (relu: measured crossover ~12-15% at 128 -> 256 and 1024 on one CPU core)


class _SparseJumpReLU(torch.autograd.Function):
    """sae.JumpReLU on the entries of a pattern (z = their pre-activations, col = their
    latents): f = z * H(z - theta) and the batch's total L0 = sum H(z - theta), with the same
    pseudo-gradients. theta's reaches only entries within eps/2 of it, so the pattern must hold
    every entry with z > theta - eps/2: the code, and the kernel window below it."""

    @staticmethod
    def forward(ctx, z, theta, col, eps):
        th = theta.index_select(0, col)
        mask = z > th
        ctx.save_for_backward(z, th, mask, col)
        ctx.eps, ctx.d = eps, theta.shape[0]
        return torch.where(mask, z, 0.0), mask.sum().to(z.dtype)

    @staticmethod
    def backward(ctx, g_f, g_l0):
        z, th, mask, col = ctx.saved_tensors
        eps = ctx.eps
        window = (z > th - eps / 2) & (z < th + eps / 2)
        w = (g_f * th + g_l0) * window
        dtheta = torch.zeros(ctx.d, dtype=z.dtype, device=z.device).index_add_(0, col, w).div_(-eps)
        return torch.where(mask, g_f, 0.0), dtheta, None, None


def sparse_forward(sae, x: torch.Tensor) -> dict | None:
    """For a TopK-family, relu or jumprelu `sae` (sae.py) in training or eval mode: x_hat, the
    code (pattern + vals), L0, fired latents and BatchTopK's smallest kept activation (the
    fields of sae.SAEOutput), plus x_c = x - b_dec and the pre-activations, which AuxK reuses,
    and jumprelu's L0 summed over the batch, with theta's gradient (l0_sum). relu's code is
    pre > 0 and jumprelu's pre > theta, as dense as the batch makes them: None (use the plain
    path) while more than MAX_FILL of the pairs are in, as at the start of training."""
    B = x.shape[0]
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    with torch.no_grad():
        x_c = x - sae.b_dec if sae.apply_b_dec_to_input else x
        pre = torch.addmm(sae.b_enc, x_c, sae.W_enc)
        min_active = None
        if sae.arch == "topk":
            v, i = topk_relu(pre, sae.k)
            pat, v = SparsePattern.from_topk(i, sae.d_sae), v.reshape(-1)
        elif sae.arch == "batchtopk" and sae.training:      # top k*B over the batch (Bussmann et al. 2024)
            v, flat = topk_relu(pre.view(1, -1), sae.k * B)
            flat, order = flat.view(-1).sort()
            v = v.view(-1).index_select(0, order)
            pat = SparsePattern.from_flat(flat, B, sae.d_sae)
            pos = v[v > 0]
            min_active = pos.min() if pos.numel() else None
        else:           # a code by comparison: relu pre > 0; jumprelu and batchtopk at inference pre > theta
            if sae.arch == "relu":
                keep = pre > 0
            elif sae.training:              # jumprelu: the code and theta's kernel window
                keep = pre > sae.threshold - sae.bandwidth / 2
            else:
                keep = (pre > sae.threshold) & (pre > 0)
            flat = keep.view(-1).nonzero().squeeze(1)
            if sae.arch != "batchtopk" and flat.numel() > MAX_FILL * pre.numel():
                return None
            pat, v = SparsePattern.from_flat(flat, B, sae.d_sae), pre.view(-1)[flat]
    vals = _SparseEncode.apply(v, x_c, sae.W_enc, sae.b_enc, b_dec, pat)
    l0_sum = None
    if sae.arch == "jumprelu" and sae.training:
        vals, l0_sum = _SparseJumpReLU.apply(vals, sae.threshold, pat.col, sae.bandwidth)
    else:
        vals = vals.relu()
    x_hat = _SparseDecode.apply(vals, sae.W_dec, pat) + sae.b_dec
    with torch.no_grad():
        on = vals > 0
        fired = torch.bincount(pat.col[on], minlength=sae.d_sae) > 0
        l0 = on.sum() / B
    return dict(x_hat=x_hat, pattern=pat, vals=vals, l0=l0, fired=fired, min_active=min_active, x_c=x_c, pre=pre,
                l0_sum=l0_sum)


def dead_pre(sae, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Pre-activations [B, n_dead] of the latents `dead` (ids), with their gradient: jumprelu's
    pre-activation loss on the sparse path, whose pre has none."""
    return encode(x, sae.W_enc.index_select(1, dead), sae.b_enc[dead], sae.b_dec if sae.apply_b_dec_to_input else None)


def sparse_auxk_e_hat(sae, x: torch.Tensor, x_c: torch.Tensor, pre: torch.Tensor,
                      dead_mask: torch.Tensor) -> torch.Tensor | None:
    """AuxK's e_hat (SAE._auxk_e_hat) as a TopK SAE over the sub-dictionary of dead latents:
    gather their encoder columns and decoder rows (autograd scatters the gradients back);
    raw or ReLU'd (sae.auxk_raw), as there. None when no latent is dead.
    With no more dead latents than k_aux every one is decoded: its code is a dense [B, n] matrix,
    so two plain matmuls (dead_pre's encode, then the decode) beat the selection and the sparse
    kernels (AuxK's share of the step at 128 -> 256 with 64 dead: ~48% against ~58%,
    bench/bench_vs_saelens_cpu.txt); else those, on the k_aux picked a row."""
    raw = sae.auxk_raw
    with torch.no_grad():
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(sae.k_aux, dead.numel())
        if k_aux == 0:
            return None
    W_dec = sae.W_dec.index_select(0, dead)
    if k_aux == dead.numel():
        z = dead_pre(sae, x, dead)
        return (z if raw else z.relu()) @ W_dec
    with torch.no_grad():
        sub = pre.index_select(1, dead)
        v, j = sub.topk(k_aux, dim=-1, sorted=False) if raw else topk_relu(sub, k_aux)
    pat = SparsePattern.from_topk(j, dead.numel())
    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    vals = _SparseEncode.apply(v.reshape(-1), x_c, sae.W_enc.index_select(1, dead), sae.b_enc[dead], b_dec, pat)
    return _SparseDecode.apply(vals if raw else vals.relu(), W_dec, pat)
