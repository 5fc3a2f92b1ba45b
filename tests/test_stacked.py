"""lib/stacked.py: S SAEs stacked into one module are, block for block, the S sae.SAE objects
they came from: the same loss terms, L0, fired latents and gradients, on the sparse and the
plain path, with AuxK (and JumpReLU's pre-activation loss); StackedAdam is torch.optim.Adam
with a learning rate per block."""
from __future__ import annotations

import pytest
import torch

from lib.stacked import StackedAdam, StackedSAE
from sae import SAE

D, DSAE, B = 16, 48, 64


def make(arch, ks, sparse, seed0=0, auxk_raw=None):
    saes = []
    for s, k in enumerate(ks):
        g = torch.Generator().manual_seed(seed0 + s)
        sae = SAE(D, DSAE, arch, k, k_aux=6, bandwidth=0.05, init_threshold=0.05, pre_act_coeff=0.01, sparse=sparse,
                  auxk_raw=auxk_raw,
                  generator=g)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3, generator=g)
            sae.b_enc.normal_(0, 0.1, generator=g)
            sae.b_enc[: 2 * s] = -50.0       # dead below zero on every row: the TopK pre-activation loss
            if arch == "batchtopk":
                sae.threshold.fill_(0.2 + 0.1 * s)
        saes.append(sae.train())
    return saes


CASES = [("topk", [3, 3, 3], True, None), ("topk", [2, 2], False, None),
         ("batchtopk", [3, 3], True, None), ("batchtopk", [3, 3, 3], False, None), ("relu", [3, 3], None, None),
         ("jumprelu", [3, 3, 3], None, None),
         ("topk", [3, 3, 3], True, True), ("batchtopk", [3, 3], True, True), ("topk", [2, 2], False, True)]


@pytest.mark.parametrize("arch,ks,sparse,auxk_raw", CASES)
@pytest.mark.parametrize("with_dead", [None, "few", "some", "most"])
def test_stack_equals_its_saes_in_values_and_gradients(arch, ks, sparse, auxk_raw, with_dead):
    """auxk_raw: the TopK family with AuxK on raw pre-activations (relu and jumprelu's default)."""
    torch.manual_seed(0)
    x = torch.randn(B, D) + 0.5
    saes = make(arch, ks, sparse, auxk_raw=auxk_raw)
    stack = StackedSAE(saes)
    S = len(saes)
    dead = None
    if with_dead:          # block s: the first 2 + s (<= k_aux), 5 + 3s or 30 + 3s (> 4 k_aux: sparse AuxK) are dead
        dead = torch.zeros(S, DSAE, dtype=torch.bool)
        for s in range(S):
            dead[s, : {"few": 2 + s, "some": 5 + 3 * s, "most": 30 + 3 * s}[with_dead]] = True
        if S > 1:
            dead[1] = False                        # a block with nothing dead: its AuxK term is 0
    coeff = torch.tensor([0.01 * (s + 1) for s in range(S)]) if arch in ("relu", "jumprelu") else None
    total, outs = stack(x, dead, coeff)
    total.backward()
    for s, sae in enumerate(saes):
        ref = sae(x, dead_mask=None if dead is None else dead[s], sparsity_coeff=None if coeff is None else float(coeff[s]))
        ref.loss.backward()
        assert set(outs[s].losses) == set(ref.losses)
        for name, v in ref.losses.items():
            assert torch.allclose(outs[s].losses[name], v, rtol=1e-4, atol=1e-6), (s, name)
        assert torch.allclose(outs[s].x_hat, ref.x_hat, atol=1e-5)
        assert float(outs[s].l0) == pytest.approx(float(ref.l0))
        assert torch.equal(outs[s].fired, ref.fired)
        if arch == "batchtopk":
            assert float(outs[s].min_active) == pytest.approx(float(ref.min_active))
        for name, p in sae.named_parameters():
            g = getattr(stack, name).grad[s]
            assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-5), (s, name)


def test_export_gives_back_each_sae_and_its_adam_state():
    saes = make("topk", [2, 2, 2], True)
    stack = StackedSAE(saes)
    opt = StackedAdam(stack)
    x = torch.randn(B, D)
    for _ in range(3):
        total, _ = stack(x)
        opt.zero_grad()
        total.backward()
        stack.remove_parallel_grad_()
        opt.lrs = [1e-2, 0.0, 1e-3]
        opt.step()
        stack.post_step_()
    fresh = make("topk", [2, 2, 2], True)
    for s in range(3):
        target = make("topk", [2], True, seed0=99)[0]
        topt = torch.optim.Adam(target.parameters(), lr=1e-3)
        stack.export_(s, target, opt, topt)
        for name, p in target.named_parameters():
            assert torch.equal(p, getattr(stack, name)[s])
            assert float(topt.state[p]["step"]) == 3
        if s == 1:                                 # lr 0: the block did not move
            for name, p in target.named_parameters():
                assert torch.allclose(p, dict(fresh[1].named_parameters())[name], atol=1e-6)
    # and back: a stack rebuilt from exported SAEs and optimisers continues where this one is
    outs_saes, opts = [], []
    for s in range(3):
        t = make("topk", [2], True, seed0=7)[0]
        o = torch.optim.Adam(t.parameters(), lr=1e-3)
        stack.export_(s, t, opt, o)
        outs_saes.append(t)
        opts.append(o)
    again = StackedSAE(outs_saes)
    opt2 = StackedAdam(again)
    opt2.load_from(outs_saes, opts)
    assert opt2.steps == 3
    for n in opt.m:
        assert torch.equal(opt.m[n], opt2.m[n]) and torch.equal(opt.v[n], opt2.v[n])


def test_stacked_adam_is_torch_adam_per_block():
    saes = make("relu", [3, 3], None)
    twins = make("relu", [3, 3], None)
    stack = StackedSAE(saes)
    opt = StackedAdam(stack)
    topts = [torch.optim.Adam(t.parameters(), lr=lr) for t, lr in zip(twins, (3e-3, 1e-3))]
    x = torch.randn(B, D)
    coeff = torch.tensor([0.01, 0.01])
    for _ in range(5):
        total, _ = stack(x, None, coeff)
        opt.zero_grad()
        total.backward()
        opt.lrs = [3e-3, 1e-3]
        opt.step()
        for t, o in zip(twins, topts):
            out = t(x, sparsity_coeff=0.01)
            o.zero_grad()
            out.loss.backward()
            o.step()
    for s, t in enumerate(twins):
        for name, p in t.named_parameters():
            assert torch.allclose(getattr(stack, name)[s], p, atol=1e-5), name


def test_clip_grad_norm_is_torchs_per_block():
    """Each block clipped to its own global norm, as sae.SAE.clip_grad_norm_ clips one SAE:
    block 0's gradient (scaled up 100x) is cut to norm 1, block 1's (below 1) is left exactly as is."""
    saes = make("relu", [3, 3], None)
    stack = StackedSAE(saes)
    x = torch.randn(B, D)
    total, _ = stack(x, None, torch.tensor([0.01, 0.01]))
    total.backward()
    with torch.no_grad():
        for p in stack.parameters():
            p.grad[0] *= 100 / p.grad[0].norm().clamp_min(1e-6)     # block 0: norm 100 * sqrt(4 params) = 200
            p.grad[1] *= 0.1 / p.grad[1].norm().clamp_min(1e-6)     # block 1: norm 0.2
    before = {n: p.grad.clone() for n, p in stack.named_parameters()}
    for s, sae in enumerate(saes):
        for n, p in sae.named_parameters():
            p.grad = before[n][s].clone()
        sae.clip_grad_norm_(1.0)
    stack.clip_grad_norm_(1.0)
    norm0 = torch.stack([p.grad[0].norm() for p in stack.parameters()]).norm()
    assert float(norm0) == pytest.approx(1.0, rel=1e-5)
    for n, p in stack.named_parameters():
        assert torch.equal(p.grad[1], before[n][1]), n
        for s, sae in enumerate(saes):
            assert torch.allclose(p.grad[s], dict(sae.named_parameters())[n].grad, rtol=1e-5, atol=1e-8), (s, n)
