"""Several SAEs of one architecture, width and k trained as one: the speed path of
`03_train_sae.py --seed 1 2 3 ...`.

S SAEs with d latents each are held as S blocks of every parameter, block axis first:

    W_enc [S, d_in, d]   b_enc [S, d]   W_dec [S, d, d_in]   b_dec [S, d_in]   (threshold [S, d])

and every block reconstructs the same batch x [B, d_in] on its own, with sae.py's maths:

    pre[s]   = (x - b_dec[s]) @ W_enc[s] + b_enc[s]              [S, B, d]   (one batched matmul)
    x_hat[s] = sigma_s(pre[s]) @ W_dec[s] + b_dec[s]             [S, B, d_in]
    loss     = sum_s loss_s           (so the gradient of block s is the gradient of SAE s)

Top-k, the sparse decode and its backward (lib/kernels.py, on "virtual rows" (block s, row
b) whose latent ids are s*d + j), AuxK, the decoder constraint and Adam then run once per
step over all S blocks instead of once per SAE, so small SAEs pay the per-op cost once.
Measured on 2 CPU cores (bench/bench_multi_seed.py): the TopK family's step gains ~1.2-1.5x
while few latents are dead; AuxK over many dead latents runs on the same sparse kernels
(_sparse_auxk); relu and jumprelu (dense) gain nothing at 1,024 latents, so 03 stacks them
only with --stack on.
tests/test_stacked.py checks every loss term, L0, fired latents and gradient against S
separate sae.SAE objects.

Training only: the SAEs are evaluated, checkpointed and saved as the sae.SAE objects they
came from (`export_`), so files, resume and inference are what a single run has. Each block
keeps its own learning rate (its own plateau schedule) through `StackedAdam`, which is
torch.optim.Adam's update with one lr per block. The blocks share arch, width and k: 03 stacks
the SAEs of one (width, k), which differ in seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from lib.kernels import SparsePattern, _SparseDecode, _SparseEncode, topk_relu
from sae import SAE, JumpReLU, SAEOutput

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class _StackedSparseEncode(_SparseEncode):
    """kernels._SparseEncode per block (same forward): vals = pre at the active (virtual row,
    latent) pairs, pre computed beforehand without grad. With G the sparse [S*B, S*d] matrix of
    d loss / d vals and x_c[s*B + b] = x[b] - b_dec[s]: dW_enc[s] = (G^T x_c)[s]^T,
    db_enc = column sums of G, db_dec[s] = -W_enc[s] db_enc[s]."""

    @staticmethod
    def backward(ctx, g):
        x_c, W_enc = ctx.saved_tensors
        pat = ctx.pat
        S, D, d = W_enc.shape
        g = g.contiguous()
        dW_enc = pat.t_matmul(g, x_c).view(S, d, D).transpose(1, 2)
        db_enc = torch.zeros(pat.n_cols, dtype=g.dtype, device=g.device).index_add_(0, pat.col, g).view(S, d)
        db_dec = -torch.bmm(W_enc, db_enc.unsqueeze(2)).squeeze(2)
        return None, None, dW_enc, db_enc, db_dec, None


class _StackedSubEncode(torch.autograd.Function):
    """pre_sub [S, B, n]: each block's pre-activations of n gathered latents, already computed
    without grad (a gather of the step's pre), as a function of their encoder columns W_sub
    [S, d_in, n], b_sub [S, n] and b_dec [S, d_in]. Autograd through a recomputed
    (x - b_dec) @ W_sub + b_sub would pay that batched matmul again plus one more for b_dec's
    gradient; here: dW_sub = x_c^T G, db_sub = column sums of G, db_dec = -W_sub db_sub (a
    mat-vec, as kernels._DenseEncode)."""

    @staticmethod
    def forward(ctx, pre_sub, x_c, W_sub, b_sub, b_dec):
        ctx.save_for_backward(x_c, W_sub)
        return pre_sub.clone()

    @staticmethod
    def backward(ctx, g):
        x_c, W_sub = ctx.saved_tensors
        db_sub = g.sum(1)
        db_dec = -torch.bmm(W_sub, db_sub.unsqueeze(2)).squeeze(2)
        return None, None, torch.bmm(x_c.transpose(1, 2), g), db_sub, db_dec


def _ids_first(mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's latent ids where mask [S, d] is True, first, padded to the most any block
    has: idx [S, n] and valid [S, 1, n] (1.0 for a real id, 0.0 for padding)."""
    count = mask.sum(1)
    n = int(count.max())
    idx = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = (torch.arange(n, device=mask.device) < count.unsqueeze(1)).unsqueeze(1).to(dtype)
    return idx, valid


class StackedSAE(nn.Module):
    """S sae.SAE objects (same arch, d_in, d_sae, k) as one module, for training."""

    def __init__(self, saes: list[SAE]):
        super().__init__()
        a = saes[0]
        for s in saes:
            assert (s.arch, s.d_in, s.d_sae, s.k, s.auxk_raw) == (a.arch, a.d_in, a.d_sae, a.k, a.auxk_raw)
            assert s.apply_b_dec_to_input
        self.arch, self.S, self.d_sae, self.d_in, self.k = a.arch, len(saes), a.d_sae, a.d_in, a.k
        self.k_aux, self.auxk_coeff, self.bandwidth, self.threshold_ema = a.k_aux, a.auxk_coeff, a.bandwidth, a.threshold_ema
        self.auxk_raw = a.auxk_raw
        self.pre_act_coeff = a.pre_act_coeff
        self.unit_decoder = a.unit_decoder                 # sae.SAE's rule: all but relu
        # the TopK family's CPU / size rule (sae.py); relu and jumprelu stack on the dense path
        self.use_sparse = a.use_sparse if a.arch in ("topk", "batchtopk") else (lambda x: False)
        with torch.no_grad():
            for n in NAMES:
                setattr(self, n, nn.Parameter(torch.stack([getattr(s, n) for s in saes])))
            if a.arch == "jumprelu":
                self.threshold = nn.Parameter(torch.stack([s.threshold for s in saes]))
            elif a.arch == "batchtopk":
                self.register_buffer("threshold", torch.stack([s.threshold for s in saes]))

    # -- forward: the loss of every block, and what 03 logs per block ------------------------

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None,
                sparsity_coeff: torch.Tensor | None = None, all_reduce=None) -> tuple[torch.Tensor, list[SAEOutput]]:
        """x [B, d_in]; dead_mask [S, d] bool (AuxK); sparsity_coeff [S] (relu / jumprelu lambda).
        Returns the summed loss and one SAEOutput per block (its loss terms, x_hat, L0, fired)."""
        B, S, d = x.shape[0], self.S, self.d_sae
        losses, self._min_active = {}, None
        if self.use_sparse(x):                             # TopK family: lib/kernels.py on virtual rows
            x_hat, pre, vals, pat, x_c = self._sparse_code(x)
            with torch.no_grad():
                col = pat.col[vals > 0]
                fired = torch.bincount(col, minlength=S * d).view(S, d) > 0
                l0 = torch.bincount(col // d, minlength=S) / B
            e_hat = None if dead_mask is None else self._sparse_auxk(pre, x_c, dead_mask)
        else:
            pre = torch.baddbmm(self.b_enc.unsqueeze(1), x - self.b_dec.unsqueeze(1), self.W_enc)   # [S, B, d]
            acts, l0, extra = self._dense_code(pre, sparsity_coeff)
            losses.update(extra)
            x_hat = torch.baddbmm(self.b_dec.unsqueeze(1), acts, self.W_dec)                       # [S, B, d_in]
            with torch.no_grad():                        # acts >= 0: float ops, not boolean ones
                fired = acts.amax(1) > 0
                if l0 is None:
                    l0 = acts.sign().sum((1, 2)) / B
            e_hat = None if dead_mask is None else self._dense_auxk(pre, dead_mask)
        losses = {"mse": (x_hat - x).pow(2).sum(-1).mean(1), **losses}
        if dead_mask is not None:
            losses["auxk_loss"] = self.auxk_coeff * self._auxk_loss(x, x_hat, e_hat, dead_mask, all_reduce)
            if self.arch == "jumprelu" and self.pre_act_coeff:       # sae.SAE._pre_act_loss per block
                gap = (self.threshold.unsqueeze(1) - pre).relu() * dead_mask.unsqueeze(1)
                losses["pre_act_loss"] = self.pre_act_coeff * gap.sum(-1).mean(1)
            elif self.arch != "relu" and self.pre_act_coeff:
                losses["pre_act_loss"] = self.pre_act_coeff * self._below_zero_loss(pre, x, dead_mask, all_reduce)
        total = sum(v.sum() for v in losses.values())
        outs = []
        for s in range(S):
            o = SAEOutput(x_hat=x_hat[s], losses={k: v[s] for k, v in losses.items()}, l0=l0[s].detach(),
                          fired=fired[s], min_active=None if self._min_active is None else self._min_active[s])
            o.loss = sum(o.losses.values())
            outs.append(o)
        return total, outs

    def _dense_code(self, pre: torch.Tensor, coeff: torch.Tensor | None):
        """sigma of every block on pre [S, B, d] (sae.SAE._forward_dense): (acts, l0 or None, loss terms)."""
        S, B, d = pre.shape
        extra, l0 = {}, None
        if self.arch == "relu":
            acts = pre.relu()              # sae.SAE._l1_loss: lambda * sum_i f_i |W_dec_i|
            extra["l1_loss"] = coeff * (acts.sum(1) * self.W_dec.norm(dim=-1)).sum(-1) / B
        elif self.arch == "jumprelu":       # rows first, as JumpReLU sums theta's gradient over dim 0
            acts, l0_rows = JumpReLU.apply(pre.transpose(0, 1), self.threshold, self.bandwidth)    # l0_rows [B, S]
            acts = acts.transpose(0, 1)
            extra["l0_loss"] = coeff * l0_rows.mean(0)
            l0 = l0_rows.detach().sum(0) / B
        elif self.arch == "topk":
            with torch.no_grad():
                i = pre.topk(self.k, dim=-1).indices
            acts = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu())
        else:                                               # batchtopk: top k*B of each block's [B, d]
            with torch.no_grad():
                v, i = pre.view(S, B * d).topk(self.k * B, dim=-1)
                self._min_active = torch.where(v > 0, v, torch.inf).amin(-1)
            acts = torch.zeros_like(pre).view(S, -1).scatter(1, i, pre.view(S, -1).gather(1, i).relu()).view_as(pre)
        return acts, l0, extra

    def _sparse_code(self, x):
        """The TopK-family step of lib/kernels.py on virtual rows r = s*B + b (block s, row b):
        pattern columns are global latent ids s*d + j, so the sparse decode applies as is.
        Returns x_hat [S, B, d_in], pre [S, B, d] (no grad), vals, pattern, x_c [S*B, d_in] = x - b_dec."""
        B, S, d = x.shape[0], self.S, self.d_sae
        with torch.no_grad():
            x_c = (x - self.b_dec.unsqueeze(1)).view(S * B, -1)                    # [S*B, d_in]
            pre = torch.baddbmm(self.b_enc.unsqueeze(1), x_c.view(S, B, -1), self.W_enc)
            if self.arch == "topk":
                v, i = topk_relu(pre.view(S * B, d), self.k)
                v = v.reshape(-1)
                base = torch.arange(S, device=x.device).repeat_interleave(B).unsqueeze(1) * d
                pat = SparsePattern.from_topk(i + base, S * d)
            else:                                           # batchtopk: top k*B of each block's [B, d]
                v, flat = topk_relu(pre.view(S, B * d), self.k * B)                     # flat = b*d + j
                self._min_active = torch.where(v > 0, v, torch.inf).amin(-1)
                s = torch.arange(S, device=x.device).unsqueeze(1)
                glob, order = ((s * B + flat // d) * (S * d) + s * d + flat % d).view(-1).sort()
                v = v.view(-1).index_select(0, order)
                pat = SparsePattern.from_flat(glob, S * B, S * d)
        vals = _StackedSparseEncode.apply(v, x_c, self.W_enc, self.b_enc, self.b_dec, pat).relu()
        x_hat = _SparseDecode.apply(vals, self.W_dec.view(S * d, -1), pat).view(S, B, -1) + self.b_dec.unsqueeze(1)
        return x_hat, pre, vals, pat, x_c

    # -- AuxK (Gao et al. 2024) per block: sae.SAE._auxk_e_hat and _auxk_loss -----------------

    def _dense_auxk(self, pre: torch.Tensor, dead_mask: torch.Tensor):
        """e_hat [S, B, d_in]: each block's k_aux largest dead pre-activations per row, decoded
        (raw or ReLU'd: sae.SAE.auxk_raw); None when nothing is dead.
        (Masks are float, added or multiplied: boolean masks cost ~10x more on a CPU.)"""
        k_aux = min(self.k_aux, int(dead_mask.sum(1).max()))
        if k_aux == 0:
            return None
        dead = dead_mask.unsqueeze(1).to(pre.dtype)                              # [S, 1, d]
        with torch.no_grad():
            i = (pre + torch.zeros_like(dead).masked_fill_(dead == 0, -torch.inf)).topk(k_aux, dim=-1).indices
            valid = dead.expand_as(pre).gather(-1, i)                            # blocks with fewer dead
        v = pre.gather(-1, i)
        v = (v if self.auxk_raw else v.relu()) * valid
        return torch.bmm(torch.zeros_like(pre).scatter(-1, i, v), self.W_dec)

    def _sparse_auxk(self, pre, x_c, dead_mask):
        """The TopK family's AuxK (kernels.sparse_auxk_e_hat) over each block's dead latents
        (gathered, padded to the most any block has; padding is never picked, or weighted 0),
        keeping the k_aux largest of each (block, row), raw or ReLU'd (auxk_raw). Where k_aux
        is over a quarter of them: dense batched matmuls over the dead sub-dictionary; else the
        sparse kernels of the main code on virtual rows, which
        touch k_aux latents per row (measured: 1.7x faster at 860 of 1024 dead, 1.3x slower
        at 100 of 256). x_c [S*B, d_in]: the step's x - b_dec (_sparse_code)."""
        S, B, d = pre.shape
        x_c = x_c.view(S, B, -1)
        with torch.no_grad():
            idx, valid = _ids_first(dead_mask, pre.dtype)                                  # dead ids first
            n = idx.shape[1]
            k_aux = min(self.k_aux, n)
            if k_aux == 0:
                return None
            keep = valid
            pre_g = pre.gather(2, idx.unsqueeze(1).expand(S, B, n))                       # [S, B, n]
            if k_aux < n:                    # the k_aux most active dead latents of each (block, row)
                if self.auxk_raw:            # padding below every dead latent, whatever its sign
                    v, top = pre_g.masked_fill(valid == 0, -torch.inf).view(S * B, n).topk(k_aux, dim=-1, sorted=False)
                    pick = v.isfinite()      # False: padding, in a block with fewer dead than k_aux
                    v = v.where(pick, 0.0)
                else:
                    v, top = topk_relu(pre_g.relu().mul_(valid).view(S * B, n), k_aux)
        if 4 * k_aux >= n:                   # dense sub-dictionary
            if k_aux < n:
                keep = torch.zeros(S * B, n, dtype=pre.dtype, device=pre.device).scatter_(1, top, 1.0)
                keep = keep.view(S, B, n).mul_(valid)
            pre_sub = _StackedSubEncode.apply(pre_g, x_c, *self._sub_encoder(idx), self.b_dec)
            code = pre_sub if self.auxk_raw else pre_sub.relu()
            return torch.bmm(code * keep, self.W_dec.gather(1, idx.unsqueeze(2).expand(S, n, self.d_in)))
        with torch.no_grad():                # sparse: pattern columns are global latent ids s*d + j
            ids = (idx + torch.arange(S, device=pre.device).unsqueeze(1) * d).unsqueeze(1).expand(S, B, n)
            ids = ids.gather(2, top.view(S, B, k_aux)).view(S * B, k_aux)     # a view: no [S*B, n] copy
            pat = SparsePattern.from_topk(ids, S * d)
        vals = _StackedSparseEncode.apply(v.reshape(-1), x_c.view(S * B, -1), self.W_enc, self.b_enc, self.b_dec, pat)
        vals = vals * pick.reshape(-1) if self.auxk_raw else vals.relu()
        return _SparseDecode.apply(vals, self.W_dec.view(S * d, -1), pat).view(S, B, -1)

    def _below_zero_loss(self, pre, x, dead_mask, all_reduce):
        """The TopK family's pre-activation loss per block (sae.SAE._pre_act_latents): sum of
        ReLU(-pre) over each block's dead latents that are <= 0 on every row, averaged over rows;
        their pre-activations recomputed with gradient over the gathered sub-dictionary."""
        S = pre.shape[0]
        with torch.no_grad():
            above = (pre.amax(1) > 0).double()                 # [S, d]: 1 if > 0 on some row (no bool [S, B, d])
            if all_reduce is not None:
                all_reduce(above)
            idx, valid = _ids_first(dead_mask & (above == 0), pre.dtype)
            if idx.shape[1] == 0:
                return pre.new_zeros(S)
        return ((-self._sub_pre(x, idx)).relu() * valid).sum(-1).mean(1)

    def _sub_encoder(self, idx):
        """Each block's encoder columns W_sub [S, d_in, n] and biases b_sub [S, n] of its latents
        idx [S, n] (gathered: autograd scatters their gradients back)."""
        return self.W_enc.gather(2, idx.unsqueeze(1).expand(-1, self.d_in, -1)), self.b_enc.gather(1, idx)

    def _sub_pre(self, x, idx):
        """Pre-activations [S, B, n] of each block's latents idx [S, n], with their gradient."""
        W_sub, b_sub = self._sub_encoder(idx)
        return torch.baddbmm(b_sub.unsqueeze(1), x - self.b_dec.unsqueeze(1), W_sub)

    def _auxk_loss(self, x, x_hat, e_hat, dead_mask, all_reduce):
        """Per block |e - e_hat|^2 / |e - mean(e)|^2 (sae.SAE._auxk_loss); 0 where nothing is dead."""
        if e_hat is None:
            return x.new_zeros(self.S)
        e = (x - x_hat).detach()                                                  # [S, B, d_in]
        num = (e - e_hat).pow(2).sum(-1).mean(1)
        with torch.no_grad():           # per-block sums in float32 (fast), combined in float64
            n = torch.full((self.S, 1), float(e.shape[1]), dtype=torch.float64, device=e.device)
            stats = torch.cat([e.sum(1).double(), e.pow(2).sum((1, 2)).double().unsqueeze(1), n], 1)  # [S, d_in + 2]
            if all_reduce is not None:
                all_reduce(stats)
            mean, sq = stats[:, :-2] / stats[:, -1:], stats[:, -2] / stats[:, -1]
            var = (sq - mean.pow(2).sum(1)).clamp_min(1e-12).to(e.dtype)
        return torch.where(dead_mask.any(1), num / var, 0.0)

    # -- the step's constraints (sae.SAE's, per block) ----------------------------------------

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        if self.W_dec.grad is not None and self.unit_decoder:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ per block: each SAE's gradients scaled so that their
        global norm is at most max_norm (every parameter's leading dim is the block)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def post_step_(self) -> None:
        if self.unit_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.arch == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_threshold_(self, s: int, min_active: float) -> None:
        """BatchTopK block s: sae.SAE.update_threshold_ on its slice."""
        m = float(min_active)
        if not math.isfinite(m) or m <= 0:
            return
        t = self.threshold[s]
        if float(t[0]) == 0.0:
            t.fill_(m)
        else:
            t.mul_(1 - self.threshold_ema).add_(self.threshold_ema * m)

    # -- back to the SAEs and their optimisers --------------------------------------------------

    @torch.no_grad()
    def export_(self, s: int, sae: SAE, opt: "StackedAdam | None" = None, torch_opt=None) -> None:
        """Copy block s into `sae` (weights, JumpReLU / BatchTopK threshold) and, with `opt`, the
        block's Adam state into `torch_opt` (a torch.optim.Adam over sae.parameters()), so that
        03 evaluates, checkpoints and saves it as a single run's SAE."""
        names = [n for n, _ in self.named_parameters()] + (["threshold"] if self.arch == "batchtopk" else [])
        for n in names:
            getattr(sae, n).copy_(getattr(self, n)[s])
        if opt is not None and torch_opt is not None:
            for n, p in sae.named_parameters():
                torch_opt.state[p] = {"step": torch.tensor(float(opt.steps)), "exp_avg": opt.m[n][s].clone(),
                                      "exp_avg_sq": opt.v[n][s].clone()}


class StackedAdam:
    """torch.optim.Adam's update (no weight decay, no amsgrad) on a StackedSAE, with one
    learning rate per block, so each SAE follows its own schedule (a finished one: lr 0):

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr_s / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, stack: StackedSAE, betas=(0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        self.params = dict(stack.named_parameters())
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.steps = 0
        self.lrs = [0.0] * stack.S                      # set before each step: one lr per block

    @torch.no_grad()
    def load_from(self, saes: list[SAE], torch_opts: list) -> None:
        """Each SAE's own optimiser state (as a checkpoint restores it) into its block."""
        steps = set()
        for s, (sae, o) in enumerate(zip(saes, torch_opts)):
            for n, p in sae.named_parameters():
                st = o.state.get(p)
                if st:
                    steps.add(int(float(st["step"])))
                    self.m[n][s].copy_(st["exp_avg"])
                    self.v[n][s].copy_(st["exp_avg_sq"])
        assert len(steps) <= 1, "the SAEs of one stack were checkpointed at different Adam steps"
        self.steps = steps.pop() if steps else 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        step_size = torch.tensor(self.lrs, dtype=torch.float32) / (1 - b1 ** self.steps)
        bc2_sqrt = math.sqrt(1 - b2 ** self.steps)
        for n, p in self.params.items():
            if p.grad is None:
                continue
            m, v = self.m[n], self.v[n]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            lr = step_size.to(p.device).view(-1, *[1] * (p.dim() - 1))
            p.sub_(m / denom * lr)
