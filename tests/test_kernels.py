"""lib/kernels.py, the fast path of sae.py: it equals the plain path in values and gradients."""
from __future__ import annotations

import pytest
import torch

from lib import kernels
from lib.kernels import topk_relu
from test_sae import data, make


@pytest.mark.parametrize("n,d,k", [(64, 1024, 32), (50, 256, 8), (10, 64, 16), (1, 4096, 512), (7, 48, 5)])
def test_topk_relu_is_relu_of_torch_topk(n, d, k):
    pre = torch.randn(n, d, generator=torch.Generator().manual_seed(d))
    pre[0, : d - k // 2] = -1.0 - torch.rand(d - k // 2)   # a row with fewer than k positives
    v, i = topk_relu(pre, k)
    ref = torch.zeros_like(pre).scatter_(1, pre.topk(k, dim=-1).indices, pre.topk(k, dim=-1).values.relu())
    got = torch.zeros_like(pre).scatter_(1, i, v)
    assert torch.equal(got, ref)
    assert (v >= 0).all() and torch.equal(pre.gather(1, i).relu(), v)


@pytest.mark.parametrize("auxk_raw,pre_act", [(None, 0.0), (True, 0.0), (None, 0.01)])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_path_matches_dense_path(arch, auxk_raw, pre_act):
    """Same losses and gradients from the embedding_bag / CSR path as from dense autograd,
    AuxK included (no more dead latents than k_aux -> two dense matmuls; a few more -> the
    sparse kernels over a sub-dictionary filled more than 1/8, many -> CSR), and the
    pre-activation loss on two dead latents held below zero."""
    x = data(300)
    for n_dead in (5, 20, 100):
        a, b = (make(arch, sparse=s, auxk_raw=auxk_raw, pre_act_coeff=pre_act) for s in (None, False))
        assert a.use_sparse(x) and not b.use_sparse(x)
        dead = torch.zeros(a.d_sae, dtype=torch.bool)
        dead[torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        with torch.no_grad():
            for sae in (a, b):
                sae.b_enc[dead.nonzero()[:2, 0]] = -50.0
        terms = {"mse", "auxk_loss"} | ({"pre_act_loss"} if pre_act else set())
        assert_paths_agree(a, b, x, dead, None, terms)


def assert_paths_agree(a, b, x, dead, coeff, terms):
    """SAE a (sparse path) and b (dense path), the same weights: the same loss terms, code, L0,
    fired latents and gradients on x."""
    oa, ob = a(x, dead_mask=dead, sparsity_coeff=coeff), b(x, dead_mask=dead, sparsity_coeff=coeff)
    assert oa.acts is None and oa.pattern is not None and ob.acts is not None     # the two paths ran
    assert oa.losses.keys() == ob.losses.keys() == terms
    for name in oa.losses:
        assert torch.allclose(oa.losses[name], ob.losses[name], rtol=1e-5, atol=1e-7), name
    assert torch.equal(oa.code(), ob.acts)
    assert torch.equal(oa.fired, ob.fired) and oa.l0 == ob.l0
    oa.loss.backward()
    ob.loss.backward()
    for name, p in a.named_parameters():
        q = dict(b.named_parameters())[name]
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
        assert q.grad.abs().max() > 0, name              # every parameter's gradient is exercised
    return oa


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_relu_jumprelu_sparse_path_matches_dense_path_and_falls_back_while_dense(arch):
    """relu and jumprelu on the sparse path (their code: pre > 0, pre > theta; jumprelu's pattern
    also holds theta's kernel window): the same loss terms (L1 or L0 with theta's pseudo-gradient,
    raw-valued AuxK, jumprelu's pre-activation loss), code, L0 and gradients as dense autograd once
    the code is sparse; while more than MAX_FILL of it is in, the plain path runs (the start of
    training)."""
    x = data(300)
    kw = dict(bandwidth=1.0, pre_act_coeff=0.01) if arch == "jumprelu" else {}
    terms = {"mse", "auxk_loss"} | ({"l0_loss", "pre_act_loss"} if arch == "jumprelu" else {"l1_loss"})
    for n_dead in (5, 20, 100):
        a, b = make(arch, sparse=True, **kw), make(arch, sparse=False, **kw)
        for s in (a, b):
            with torch.no_grad():                  # a sparse code: ~1.5% of (row, latent) pairs
                s.b_enc.sub_(4.0 if arch == "jumprelu" else 2.0)     # (relu's rows start at norm 0.1)
        dead = torch.zeros(a.d_sae, dtype=torch.bool)
        dead[torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        oa = assert_paths_agree(a, b, x, dead, 0.3, terms)
        assert 0 < float(oa.l0) < a.d_sae * kernels.MAX_FILL
    dense = make(arch, sparse=True, **kw)           # make()'s own b_enc: a third or more of the code active
    out = dense(x, sparsity_coeff=0.3)
    assert out.acts is not None and float(out.l0) > dense.d_sae * kernels.MAX_FILL


def test_encode_kernel_equals_autograd_of_the_formula():
    """kernels.encode: (x - b_dec) @ W_enc + b_enc, with b_dec's gradient as a mat-vec; the same
    values and gradients as autograd through the formula written out."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    W, b, c = (torch.randn(16, 40, generator=g), torch.randn(40, generator=g), torch.randn(16, generator=g))
    ours = [t.clone().requires_grad_() for t in (W, b, c)]
    ref = [t.clone().requires_grad_() for t in (W, b, c)]
    x2 = x.detach().clone().requires_grad_()
    up = torch.randn(50, 40, generator=g)
    (kernels.encode(x, *ours) * up).sum().backward()
    ((x2 - ref[2]) @ ref[0] + ref[1]).mul(up).sum().backward()
    assert torch.allclose(kernels.encode(x, *ours), (x2 - ref[2]) @ ref[0] + ref[1], atol=1e-5)
    for a, r in zip(ours, ref):
        assert torch.allclose(a.grad, r.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    # no b_dec: a plain affine map
    assert torch.allclose(kernels.encode(x, W, b, None), x @ W + b, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_fast_path_in_eval_mode_is_the_inference_code(arch):
    """In eval mode the sparse step gives exactly encode()'s code and decode()'s reconstruction."""
    sae = make(arch, sparse=True)
    if arch in ("relu", "jumprelu"):
        with torch.no_grad():
            sae.b_enc.sub_(4.0)                        # sparse enough for the sparse path
    sae.eval()
    x = data(120)
    with torch.no_grad():
        out = sae(x)
        assert out.acts is None and out.pattern is not None                  # the sparse path ran
        assert torch.equal(out.code() > 0, sae.encode(x) > 0)
        assert torch.allclose(out.code(), sae.encode(x), atol=1e-6)
        assert torch.allclose(out.x_hat, sae.decode(sae.encode(x)), atol=1e-5)
