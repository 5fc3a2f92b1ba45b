"""Sparse autoencoders in one file: ReLU (L1), TopK, BatchTopK and JumpReLU.

All four share one skeleton (Bricken et al. 2023, "Towards Monosemanticity"):

    pre   = (x - b_dec) @ W_enc + b_enc        [N, d_sae]   pre-activations
    f     = sigma(pre)                         [N, d_sae]   the code: sparse and >= 0
    x_hat = f @ W_dec + b_dec                  [N, d_in]    the reconstruction

with W_enc [d_in, d_sae] and W_dec [d_sae, d_in] (one row per latent: its dictionary
direction). They differ only in sigma and in how sparsity enters the loss:

  relu       f = ReLU(pre)                          L = |x - x_hat|^2 + l1_coeff * sum_i f_i |W_dec_i|
  topk       f = ReLU(TopK_k(pre)), each row        L = |x - x_hat|^2                        (Gao et al. 2024)
  batchtopk  f = ReLU(TopK_{k*B}(pre)), whole batch L = |x - x_hat|^2                        (Bussmann et al. 2024)
             at inference f = pre * 1[pre > theta]  (theta learned during training)
  jumprelu   f = pre * H(pre - theta), theta per latent
                                                    L = |x - x_hat|^2 + lambda * sum_i H(pre_i - theta_i)
                                                                                             (Rajamanoharan et al. 2024)
and every architecture adds (1/32) * AuxK while some latents are dead (below).

|.|^2 is summed over d_in and averaged over the batch. The tricks, each where it is used:
  * b_dec is subtracted before encoding and initialised to the geometric median of the
    data (Weiszfeld's algorithm)                                 Bricken et al. 2023
  * decoder rows have unit norm (all but relu, below): the gradient component parallel to
    each row is removed before the optimiser step and rows are renormalised after it
                                                                  Bricken et al. 2023
  * init: random unit-norm decoder rows (relu: norm 0.1) and W_enc = W_dec^T
                                                                  Gao et al. 2024
    (or `init="orthogonal"`: a semi-orthogonal W_dec, rows then rescaled to unit norm)
  * AuxK: the k_aux most active *dead* latents reconstruct the residual e = x - x_hat;
    loss |e - e_hat|^2 / |e - mean(e)|^2, coefficient 1/32      Gao et al. 2024 (App. A.2)
    k_aux is their d_in / 2, but d_in / 4 for batchtopk: on modular addition (d_in 128) at
    k 3 / 384, seeds 0-2, that leaves 1-2% of its latents dead where d_in / 2 left 2-16%, at
    the same EV (bench/auxk_size.py; measured on modular addition only). JumpReLU keeps d_in / 2:
    d_in / 4 helped it at k 3 / 384 but cost one study seed of five 40% of the answer features.
    For relu and jumprelu the dead latents' raw pre-activations are used, not ReLU'd: a
    dead ReLU latent has pre <= 0 on every row, so only the raw value gives it a gradient
    toward the residual (the dead-latent remedy measured best here: bench/sweep_sae_recipe.py;
    Bricken et al. 2023's resampling, also tried, revived fewer and cost reconstruction).
    auxk_raw=True does the same for the TopK family (an option: it reaches their dead latents
    below zero, but leaves more dead at k 3, bench/dead_pre_cpu.txt).
  * JumpReLU's pre-activation loss on dead latents: pre_act_coeff * sum_i ReLU(theta_i - pre_i)
    (times |W_dec_i| = 1), which lifts a dead latent's pre-activations toward its threshold
    until it fires again                          Anthropic's January 2025 update; SAELens
    and, as an option (sparsity_loss="tanh"), the same update's smooth sparsity loss
    lambda * sum_i tanh(c f_i |W_dec_i|) in place of lambda * L0
  * the TopK family: the same pre-activation loss with theta = 0, on the dead latents below
    zero on every row of the batch, which the ReLU'd AuxK cannot reach (ours, after the above:
    at k 32 / 1024 TopK leaves 1.4% of its latents dead instead of 54%, BatchTopK 15-18%
    instead of 90%, bench/dead_pre.py; 03 turns it on for both)
  * BatchTopK's inference threshold: EMA of the smallest kept activation, so that one
    row's code does not depend on the rest of its batch         Bussmann et al. 2024
  * JumpReLU's straight-through pseudo-gradients, rectangle kernel of width eps; theta is
    stored as is, not as log theta (see SAE.__init__)           Rajamanoharan et al. 2024
  * ReLU: Anthropic's April 2024 recipe (Conerly et al. 2024): decoder rows are *free*
    (no unit-norm constraint; they start at norm 0.1, W_enc = W_dec^T), the penalty is
    l1_coeff * sum_i f_i |W_dec_i|, and l1_coeff is warmed up from 0. The objective is the
    unit-norm one in other units, but Adam gets further through it this way: at k 2 / 256
    latents on modular addition, held-out EV 0.84 at the plateau where unit rows reach 0.80
    at the 24M-row cap (resid_post), 0.42 against 0.34 (resid_mid), in about half the
    steps (bench/relu_param.py). fold_decoder_norm_() makes the rows unit norm at export,
    the same function, so a saved relu SAE looks like the other three.
  * inputs scaled to unit mean squared norm while training, the scale folded into the
    saved weights (fold_input_scale_)                             Lieberum et al. 2024
  * lr warmup and a final linear decay live in 03_train_sae.py, and so does relu's gradient
    clipping at norm 1 (clip_grad_norm_)                         Conerly et al. 2024

Speed tricks live beside this file, not in it: lib/kernels.py trains the TopK family, and relu
and jumprelu once their code is sparse, on the active latents only (one visible call in
SAE.forward, tested equal to the plain path here).
Files: `save(dir)` / `SAE.load(dir)` read and write SAELens 6's layout (lib/saelens_format.py),
so `sae_lens.SAE.load_from_disk(dir)` gives the same codes and reconstructions as ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import kernels, saelens_format
from lib.common import UserError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
RELU_INIT_NORM = 0.1      # relu's free decoder rows start at this norm (Conerly et al. 2024)


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


class JumpReLU(torch.autograd.Function):
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


@dataclass
class SAEOutput:
    """What forward() returns. `loss` is the sum of `losses`, the terms by name (mse, and
    l1_loss | l0_loss | auxk_loss). The code is dense `acts` [N, d_sae] on the plain path;
    on the fast path it is `pattern` + `vals` (see `code()`)."""
    x_hat: torch.Tensor
    loss: torch.Tensor | None = None
    losses: dict | None = None
    acts: torch.Tensor | None = None
    pattern: kernels.SparsePattern | None = None
    vals: torch.Tensor | None = None
    l0: torch.Tensor | None = None            # mean active latents per row (no grad)
    fired: torch.Tensor | None = None         # [d_sae] bool: latent fired on some row (no grad)
    min_active: torch.Tensor | None = None    # batchtopk: smallest kept activation (no grad)

    def code(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        return self.pattern.csr(self.vals.detach()).to_dense()


class SAE(nn.Module):
    """A sparse autoencoder; `arch` in relu | topk | batchtopk | jumprelu ("standard" = relu).

    k: active latents per row (topk), on average per row (batchtopk), the target L0
    (relu, jumprelu: 03_train_sae.py steers lambda toward it). l1_coeff / l0_coeff:
    lambda of the relu / jumprelu loss for inputs at unit mean squared norm (the trainer
    schedules it and passes `sparsity_coeff`).
    k_aux (default d_in // 2; batchtopk d_in // 4) and auxk_coeff (1/32): AuxK, Gao et al.
    2024. auxk_raw: AuxK decodes the dead latents' raw pre-activations (default for relu,
    jumprelu) or their ReLU (default for the TopK family, as Gao et al.).
    pre_act_coeff: the pre-activation loss on dead latents (jumprelu, topk, batchtopk; 0 = off).
    sparsity_loss (jumprelu): "step", lambda * L0 through the threshold's pseudo-gradient
    (Rajamanoharan et al. 2024), or "tanh", lambda * sum_i tanh(tanh_scale * f_i |W_dec_i|), a
    smooth count that also reaches the active pre-activations (Anthropic's January 2025
    update; SAELens's jumprelu_sparsity_loss_mode, tanh_scale 4).
    bandwidth eps and init_threshold: JumpReLU, defaults 0.001 as in Rajamanoharan et al.
    2024 for inputs scaled to unit mean squared norm. threshold_ema: BatchTopK's EMA rate.
    """
    normalize_activations = "none"      # ours fold any input scale into the weights

    def __init__(self, d_in: int, d_sae: int, arch: str = "topk", k: int | None = None, *,
                 k_aux: int | None = None, auxk_coeff: float = 1 / 32, auxk_raw: bool | None = None,
                 pre_act_coeff: float = 0.0,
                 l1_coeff: float = 0.05, l0_coeff: float = 1e-3, sparsity_loss: str = "step", tanh_scale: float = 4.0,
                 bandwidth: float = 1e-3, init_threshold: float = 1e-3, threshold_ema: float = 0.01,
                 init: str = "tied", apply_b_dec_to_input: bool = True, sparse: bool | None = None,
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
        if init not in ("tied", "orthogonal"):
            raise UserError(f"init must be tied or orthogonal (got {init!r})")
        if sparsity_loss not in ("step", "tanh"):
            raise UserError(f"sparsity_loss must be step or tanh (got {sparsity_loss!r})")
        self.d_in, self.d_sae, self.arch, self.k = d_in, d_sae, arch, k
        if k_aux is None:             # Gao et al.'s d_in / 2; BatchTopK revives more at d_in / 4
            k_aux = max(1, d_in // 4) if arch == "batchtopk" else d_in // 2
        self.k_aux = k_aux
        self.auxk_raw = arch in ("relu", "jumprelu") if auxk_raw is None else bool(auxk_raw)
        self.auxk_coeff, self.l1_coeff, self.l0_coeff = auxk_coeff, l1_coeff, l0_coeff
        self.pre_act_coeff, self.sparsity_loss, self.tanh_scale = pre_act_coeff, sparsity_loss, tanh_scale
        self.bandwidth, self.threshold_ema = bandwidth, threshold_ema
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.sparse = sparse            # None: decided per batch by use_sparse()
        self.metadata = dict(metadata or {})

        # Gao et al. 2024: unit-norm random decoder rows, encoder = decoder transpose.
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        if init == "orthogonal":      # ~a tight frame: orthonormal columns, then unit rows
            q, r = torch.linalg.qr(W_dec)
            W_dec = q * torch.sign(torch.diagonal(r))
        self.unit_decoder = arch != "relu"                 # relu's rows are free (module docstring)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * self._init_norm()
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

    def _init_norm(self) -> float:
        return 1.0 if self.unit_decoder else RELU_INIT_NORM

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}"

    # -- initialisation and the decoder constraint ---------------------------

    @torch.no_grad()
    def init_b_dec_(self, sample: torch.Tensor) -> None:
        """b_dec <- geometric median of a data sample (Bricken et al. 2023)."""
        self.b_dec.copy_(geometric_median(sample))

    @torch.no_grad()
    def init_from_data_(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Decoder rows <- d_sae random rows of the data minus b_dec, unit norm (relu: its start
        norm); W_enc = W_dec^T.
        Every latent starts inside the data's span, as dictionary learning starts from training
        samples (Mairal et al. 2010) and as Bricken et al. 2023 resample dead latents: on data of
        low rank (modular addition: 99% of the variance in ~18 of 128 dims) random directions
        mostly point outside it, never win a top-k and die. Call after init_b_dec_."""
        idx = torch.randint(len(sample), (self.d_sae,), generator=generator)
        rows = (sample[idx.to(sample.device)] - self.b_dec.to(sample.device)).float()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * self._init_norm()
        self.W_dec.copy_(rows)
        self.W_enc.copy_(rows.t())

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component along each (unit) decoder row before the
        optimiser step, so the step moves a row's direction, not its norm (Bricken et al.
        2023). Call after the gradients are final (after any all-reduce). Not relu: free rows."""
        if self.W_dec.grad is not None and self.unit_decoder:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """All gradients scaled so that their global norm is at most max_norm (03 does it for
        relu, as Conerly et al. 2024 do: a rare outsized step otherwise starts a loss spike)."""
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

    @torch.no_grad()
    def post_step_(self) -> None:
        """After each optimiser step: decoder rows back to unit norm (not relu); JumpReLU theta >= 0."""
        if self.unit_decoder:
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
        decoder rows keep their norms and the code is in the input's own units. Same maths
        as SAELens's fold_activation_norm_scaling_factor up to where s sits."""
        s = float(scale)
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        if self.arch in ("jumprelu", "batchtopk"):
            self.threshold.div_(s)

    @torch.no_grad()
    def fold_decoder_norm_(self) -> None:
        """relu at export: decoder rows to unit norm, each row's norm n_i moved into its latent
        (W_enc[:, i] and b_enc[i] times n_i). ReLU commutes with a positive scale, so the code
        is f_i n_i and x_hat is unchanged; the saved SAE has unit rows like the other three
        (SAELens's fold_W_dec_norm). No-op for the others."""
        if self.unit_decoder:
            return
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(n.unsqueeze(1))
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)

    # -- inference: a row's code depends on that row alone ---------------------

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """sigma at inference (BatchTopK uses its threshold theta, not the batch)."""
        if self.arch == "relu":
            return pre.relu()
        if self.arch == "topk":
            v, i = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, i, v.relu())
        # jumprelu, and batchtopk exported as a JumpReLU: relu(pre) * 1[pre > theta]
        return pre.relu() * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d_in] -> code [N, d_sae], dense. Written op for op as SAELens does, so our
        codes and theirs agree bit for bit."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return self.activation(x @ self.W_enc + self.b_enc)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """code [N, d_sae] -> reconstruction [N, d_in]."""
        return acts @ self.W_dec + self.b_dec

    # -- training ---------------------------------------------------------------

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                sparsity_coeff: float | None = None, all_reduce=None) -> SAEOutput:
        """Code, reconstruction and loss terms for a batch x [B, d_in].

        In training mode BatchTopK selects over the batch; in eval mode every arch uses
        its inference code. dead_mask [d_sae] (bool): latents dead long enough for AuxK.
        sparsity_coeff overrides l1_coeff / l0_coeff (warmup, lambda control).
        all_reduce(t): sums t in place over processes (DDP), so that AuxK's normaliser is
        the error variance of the *global* batch and N processes match one.
        """
        parts = kernels.sparse_forward(self, x) if self.use_sparse(x) else None
        fast = parts is not None
        if fast:                          # the same maths on the active latents only
            x_c, pre, l0_sum = parts.pop("x_c"), parts.pop("pre"), parts.pop("l0_sum")
            out = SAEOutput(losses={}, **parts)
            if self.arch == "relu":
                per_latent = torch.zeros_like(self.b_enc).index_add(0, out.pattern.col, out.vals)
                out.losses["l1_loss"] = self._l1_loss(per_latent, sparsity_coeff, x.shape[0])
            elif self.arch == "jumprelu" and self.training:
                out.losses["l0_loss"] = self._lambda(sparsity_coeff) * l0_sum / x.shape[0]
        else:
            out, pre = self._forward_dense(x, sparsity_coeff)
        losses = {"mse": F.mse_loss(out.x_hat, x, reduction="sum") / x.shape[0], **out.losses}
        if self.training and dead_mask is not None:
            if fast:
                e_hat = kernels.sparse_auxk_e_hat(self, x, x_c, pre, dead_mask)
            else:
                e_hat = self._auxk_e_hat(pre, dead_mask)
            e = (x - out.x_hat).detach()
            aux = self._auxk_loss(e, e_hat, all_reduce) if e_hat is not None else out.x_hat.new_zeros(())
            losses["auxk_loss"] = self.auxk_coeff * aux
            if self.arch != "relu" and self.pre_act_coeff:
                dead = self._pre_act_latents(pre, dead_mask, all_reduce)
                pre_dead = kernels.dead_pre(self, x, dead) if fast else pre.index_select(1, dead)
                theta = self.threshold[dead] if self.arch == "jumprelu" else pre_dead.new_zeros(len(dead))
                losses["pre_act_loss"] = self.pre_act_coeff * self._pre_act_loss(pre_dead, theta)
        out.losses, out.loss = losses, sum(losses.values())
        return out

    def use_sparse(self, x: torch.Tensor) -> bool:
        """Every arch (relu and jumprelu only once their code is sparse: kernels.sparse_forward).
        Measured: on CPU the sparse path wins at every size tried (TopK 2.5x at 128 -> 1024;
        relu 1.8x and jumprelu 2.5x at L0 = k, bench/bench_sae_cpu.txt); on an H200 the dense one wins
        below d_in * d_sae ~ 4M, where kernel launches, not FLOPs, set the pace."""
        if self.arch == "jumprelu" and self.sparsity_loss != "step":
            return False                  # the kernels compute the step loss only: even with sparse=True
        if self.sparse is not None:
            return self.sparse
        return x.device.type == "cpu" or self.d_in * self.d_sae >= 1 << 22

    def _forward_dense(self, x, sparsity_coeff):
        """The plain path: every latent's pre-activation, sigma, decode; returns (out, pre)."""
        b_dec = self.b_dec if self.apply_b_dec_to_input else None
        pre = kernels.encode(x, self.W_enc, self.b_enc, b_dec)       # (x - b_dec) @ W_enc + b_enc
        losses, min_active, l0 = {}, None, None
        if self.arch == "relu":
            acts = pre.relu()
            losses["l1_loss"] = self._l1_loss(acts.sum(0), sparsity_coeff, x.shape[0])
        elif self.arch == "jumprelu":
            acts, l0_rows = JumpReLU.apply(pre, self.threshold, self.bandwidth)
            if self.sparsity_loss == "tanh":
                count = torch.tanh(self.tanh_scale * acts * self.W_dec.norm(dim=1)).sum(-1)
            else:
                count = l0_rows
            losses["l0_loss"] = self._lambda(sparsity_coeff) * count.mean()
            l0 = l0_rows.detach().sum() / x.shape[0]
        elif self.arch == "topk":
            with torch.no_grad():
                i = pre.topk(self.k, dim=-1).indices
            acts = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu())
        elif not self.training:           # batchtopk at inference: its threshold
            acts = self.activation(pre)
        else:                             # batchtopk, training: top k*B over the whole batch
            with torch.no_grad():
                v, i = pre.view(-1).topk(self.k * pre.shape[0])
                pos = v[v > 0]
                min_active = pos.min() if pos.numel() else None
            acts = torch.zeros_like(pre).view(-1).scatter(0, i, pre.view(-1).gather(0, i).relu()).view_as(pre)
        x_hat = torch.addmm(self.b_dec, acts, self.W_dec)
        with torch.no_grad():                      # (bool sums cost ~10x a uint8 sum on CPU)
            active = acts > 0
            fired = active.any(0)
            if l0 is None:
                l0 = active.view(torch.uint8).sum(-1, dtype=torch.int32).sum() / x.shape[0]
        return SAEOutput(x_hat=x_hat, losses=losses, acts=acts, l0=l0, fired=fired, min_active=min_active), pre

    def _l1_loss(self, per_latent: torch.Tensor, sparsity_coeff, batch: int) -> torch.Tensor:
        """relu: lambda * sum_i f_i |W_dec_i| averaged over the batch (Conerly et al. 2024);
        per_latent [d_sae] = sum over the batch's rows of f_i."""
        return self._lambda(sparsity_coeff) * (per_latent @ self.W_dec.norm(dim=1)) / batch

    def _lambda(self, sparsity_coeff):
        """lambda: sparsity_coeff (the trainer's schedule) or l1_coeff (relu) / l0_coeff (jumprelu)."""
        if sparsity_coeff is not None:
            return sparsity_coeff
        return self.l1_coeff if self.arch == "relu" else self.l0_coeff

    # -- AuxK (Gao et al. 2024, App. A.2) ----------------------------------------

    def _auxk_e_hat(self, pre, dead_mask):
        """e_hat = the k_aux largest pre-activations among dead latents, per row, decoded
        (no b_dec: the residual e already lacks it); raw or ReLU'd (auxk_raw, see the module
        docstring). None when no latent is dead."""
        k_aux = min(self.k_aux, int(dead_mask.sum()))
        if k_aux == 0:
            return None
        with torch.no_grad():
            i = torch.where(dead_mask, pre, -torch.inf).topk(k_aux, dim=-1).indices
        v = pre.gather(-1, i)
        aux = torch.zeros_like(pre).scatter(-1, i, v if self.auxk_raw else v.relu())
        return aux @ self.W_dec

    def _pre_act_latents(self, pre, dead_mask, all_reduce=None) -> torch.Tensor:
        """Ids of the latents the pre-activation loss lifts: every dead one (jumprelu); for the
        TopK family those whose pre-activation is <= 0 on every row of the global batch, to
        which the ReLU'd AuxK gives no gradient (the fast path's pre has none either: the
        loss recomputes theirs)."""
        dead = dead_mask.nonzero().squeeze(1)
        if self.arch == "jumprelu":
            return dead
        with torch.no_grad():
            above = (pre.index_select(1, dead).amax(0) > 0).double()     # per dead latent: 1 if > 0 somewhere
            if all_reduce is not None:
                all_reduce(above)
            return dead[above == 0]

    def _pre_act_loss(self, pre_dead, theta_dead):
        """sum over dead latents of ReLU(theta - pre), averaged over rows (pre_dead [B, n_dead]):
        zero once a latent fires, a push up on its encoder bias and direction until it does
        (Anthropic, Jan 2025)."""
        return (theta_dead - pre_dead).relu().sum(-1).mean()

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

    # -- files: SAELens 6's layout (lib/saelens_format.py) --------------------------

    def save(self, path, metadata: dict | None = None):
        """Write DIR/sae_weights.safetensors + DIR/cfg.json; metadata goes into cfg.json."""
        return saelens_format.save(self, path, metadata)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "SAE":
        """Read ours or SAELens's (standard, topk, batchtopk, jumprelu; pre-6 configs too)."""
        return saelens_format.load(path, device, cls)
