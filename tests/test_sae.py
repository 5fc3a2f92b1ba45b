"""sae.py: the maths of each architecture, the sparse path, and the SAELens file layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lib.common import UserError
from sae import ARCHS, SAE, geometric_median


def make(arch, d_in=32, d_sae=128, k=6, seed=0, **kw):
    sae = SAE(d_in, d_sae, arch, k=k, generator=torch.Generator().manual_seed(seed), **kw)
    with torch.no_grad():                      # move off the symmetric init so tests see generic weights
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_enc.add_(0.1 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d_in, generator=g))
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.fill_(0.3)
    return sae


def data(n=256, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


# ----------------------------------------------------------------------------
# building blocks

def test_geometric_median_is_robust_and_stationary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    x[:20] += 1000.0                                      # 4% gross outliers drag the mean, not the median
    m = geometric_median(x)
    assert m.norm() < 0.5 < x.mean(0).norm()
    u = (x.double() - m.double())                         # optimality: the unit vectors to the points sum to ~0
    assert (u / u.norm(dim=1, keepdim=True)).sum(0).norm() < 1e-3 * len(x)


@pytest.mark.parametrize("init", ["tied", "orthogonal"])
def test_init_unit_decoder_rows_and_tied_encoder(init):
    sae = SAE(16, 64, "topk", k=4, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.shape == (16, 64) and sae.W_dec.shape == (64, 16) and sae.b_enc.shape == (64,)
    if init == "orthogonal":    # close to a tight frame, W_dec^T W_dec ~ (d_sae/d_in) I, far closer than random
        tied = SAE(16, 64, "topk", k=4, generator=torch.Generator().manual_seed(0))
        dev = [((s.W_dec.t() @ s.W_dec) - 4.0 * torch.eye(16)).norm() for s in (sae, tied)]
        assert dev[0] < 0.3 * dev[1]


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_parallel_gradient_removed_and_rows_renormalised(arch):
    sae = make(arch)
    x = data()
    sae(x, sparsity_coeff=0.01).loss.backward()
    sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    opt.step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-3
    sae.post_step_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-6)


def test_relu_decoder_rows_are_free_and_folded_to_unit_norm_at_export():
    """Conerly et al. 2024: relu's rows start at norm 0.1 and are not constrained; at export
    fold_decoder_norm_ makes them unit norm with the same x_hat (the code scaled by each norm)."""
    sae = make("relu")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((sae.d_sae,), 0.1), atol=1e-6)
    x = data()
    sae(x).loss.backward()
    g = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    assert torch.equal(sae.W_dec.grad, g)                    # no projection
    torch.optim.Adam(sae.parameters(), lr=0.1).step()
    norms = sae.W_dec.norm(dim=1).detach()
    sae.post_step_()
    assert torch.equal(sae.W_dec.norm(dim=1).detach(), norms) and (norms - 0.1).abs().max() > 1e-3
    sae.eval()
    with torch.no_grad():
        f, xh = sae.encode(x), sae.decode(sae.encode(x))
        sae.fold_decoder_norm_()
        f2, xh2 = sae.encode(x), sae.decode(sae.encode(x))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-6)
    assert torch.allclose(f2, f * norms, rtol=1e-4, atol=1e-6)
    assert torch.allclose(xh2, xh, rtol=1e-4, atol=1e-5)
    topk = make("topk")
    w = topk.W_enc.detach().clone()
    topk.fold_decoder_norm_()                                 # the others: unit rows already, no-op
    assert torch.equal(topk.W_enc, w)


def test_auxk_is_the_normalised_residual_reconstruction_of_dead_latents():
    """Gao et al. 2024, App. A.2: the k_aux largest dead pre-activations reconstruct
    e = x - x_hat; loss |e - e_hat|^2 / |e - mean(e)|^2, times 1/32."""
    sae = make("topk", k_aux=5)
    x = data(200)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::4] = True
    out = sae(x, dead_mask=dead)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = torch.where(dead, pre, -torch.inf).topk(5, dim=-1)     # top k_aux among dead latents
        e_hat = torch.zeros_like(pre).scatter_(-1, i, v.relu()) @ sae.W_dec
        e = x - out.x_hat
        num = (e - e_hat).pow(2).sum(1).mean()
        den = (e - e.mean(0)).pow(2).sum(1).mean()
    assert torch.allclose(out.losses["auxk_loss"], num / den / 32, rtol=1e-5)
    assert sae(x).losses.keys() == {"mse"}                     # no dead latents: no AuxK term


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_raw_auxk_reaches_a_dead_latent_below_zero_that_relu_auxk_cannot(arch):
    """A TopK-family latent whose pre-activation is negative on every row: the ReLU'd AuxK of
    Gao et al. (the family's default) gives it no gradient at all, so it stays dead for good;
    auxk_raw=True decodes its raw value and moves its encoder and decoder toward the residual."""
    x = data(200)
    grads = {}
    for raw in (False, True):
        sae = make(arch, k_aux=4, auxk_raw=raw)
        with torch.no_grad():
            sae.b_enc[0] = -50.0                               # latent 0: pre < 0 on every row
        dead = torch.zeros(sae.d_sae, dtype=torch.bool)
        dead[:3] = True                                        # no more dead than k_aux: all decoded
        out = sae(x, dead_mask=dead)
        sae.zero_grad()
        out.losses["auxk_loss"].backward()
        grads[raw] = (sae.W_enc.grad[:, 0].abs().sum(), sae.W_dec.grad[0].abs().sum(), sae.b_enc.grad[0])
        assert sae.W_enc.grad[:, 3:].abs().sum() == 0            # live latents: AuxK leaves them alone
    assert all(float(g) == 0 for g in grads[False])
    assert all(float(g) != 0 for g in grads[True])
    assert make("topk").auxk_raw is False and make("relu").auxk_raw is True     # the defaults


def test_default_k_aux_is_d_in_over_2_but_over_4_for_batchtopk():
    """Gao et al.'s d_in / 2; d_in / 4 (at least 1) for batchtopk, which revives more latents
    with it (bench/auxk_size.py); an explicit k_aux wins."""
    assert {a: make(a).k_aux for a in ("topk", "relu", "batchtopk", "jumprelu")} == \
        {"topk": 16, "relu": 16, "batchtopk": 8, "jumprelu": 16}
    assert SAE(2, 8, "batchtopk", k=1).k_aux == 1 and make("batchtopk", k_aux=5).k_aux == 5


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_pre_act_loss_lifts_only_the_dead_latents_below_zero_on_every_row(arch, sparse):
    """The TopK family's pre-activation loss: coeff * sum of ReLU(-pre) over the dead latents
    whose pre-activation is <= 0 on every row, averaged over rows. Latent 0 (dead, below zero
    everywhere) gets d/d b_enc = -coeff; latent 1 (dead, positive on some row: AuxK reaches it)
    and the live latents get nothing from it."""
    sae = make(arch, pre_act_coeff=0.01, sparse=sparse)
    x = data(200)
    with torch.no_grad():
        sae.b_enc[0] = -50.0
        sae.b_enc[1] = 0.0
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[:4] = True
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    assert (pre[:, 0] < 0).all() and (pre[:, 1] > 0).any()
    below = dead & (pre <= 0).all(0)
    out = sae(x, dead_mask=dead)
    assert torch.allclose(out.losses["pre_act_loss"], 0.01 * (-pre[:, below]).relu().sum(1).mean(), rtol=1e-5)
    sae.zero_grad()
    out.losses["pre_act_loss"].backward()
    assert torch.allclose(sae.b_enc.grad[below], torch.full((int(below.sum()),), -0.01))
    assert (sae.b_enc.grad[~below] == 0).all() and (sae.W_enc.grad[:, ~below] == 0).all()


def test_jumprelu_pre_act_loss_lifts_dead_latents_toward_their_threshold():
    """Anthropic's January 2025 pre-activation loss: coeff * sum over dead latents of
    ReLU(theta - pre), averaged over rows. Its gradient raises a dead latent's encoder bias
    (by coeff times the share of rows below theta) and leaves live latents alone."""
    sae = make("jumprelu", pre_act_coeff=0.01)
    x = data(200)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::4] = True
    out = sae(x, dead_mask=dead, sparsity_coeff=0.0)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    gap = (sae.threshold.detach() - pre).relu()
    assert torch.allclose(out.losses["pre_act_loss"], 0.01 * (gap * dead).sum(1).mean(), rtol=1e-5)
    sae.zero_grad()
    out.losses["pre_act_loss"].backward()
    below = (pre < sae.threshold.detach()).double().mean(0)
    assert torch.allclose(sae.b_enc.grad[dead].double(), -0.01 * below[dead], atol=1e-7)
    assert (sae.b_enc.grad[dead] < 0).all() and (sae.b_enc.grad[~dead] == 0).all()
    assert "pre_act_loss" not in sae(x, sparsity_coeff=0.0).losses                # nothing dead: no term
    assert "pre_act_loss" not in make("jumprelu")(x, dead_mask=dead, sparsity_coeff=0.0).losses   # coeff 0


def test_batchtopk_training_selects_over_batch_and_inference_is_per_row():
    sae = make("batchtopk", k=4)
    sae.threshold.zero_()                                      # not yet estimated
    x = data(64)
    out = sae(x)
    per_row = (out.code() > 0).sum(1)
    assert per_row.sum() <= 4 * 64 and per_row.max() > per_row.min()   # k*B over the batch, uneven rows
    sae.update_threshold_(out.min_active)
    assert float(sae.threshold[0]) == pytest.approx(float(out.min_active))
    sae.eval()
    one, full = sae.encode(x[:5]), sae.encode(x)[:5]
    assert torch.equal(one > 0, full > 0) and torch.allclose(one, full, atol=1e-5)   # a row's code ignores its batch
    assert torch.equal(sae(x).code(), sae.encode(x))


def test_batchtopk_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = make("batchtopk", threshold_ema=0.1)
    sae.threshold.zero_()
    sae.update_threshold_(torch.tensor(2.0))
    sae.update_threshold_(torch.tensor(1.0))
    assert torch.allclose(sae.threshold, torch.full((sae.d_sae,), 1.9))


def test_jumprelu_straight_through_gradients():
    """Rajamanoharan et al. 2024: d/d theta of z*H(z-theta) is -(theta/eps) K((z-theta)/eps),
    of H(z-theta) is -(1/eps) K(...); z gets H(z-theta) from the first, nothing from the second."""
    from sae import JumpReLU as _JumpReLU
    theta = torch.full((3,), 0.5, requires_grad=True)
    z = torch.tensor([[0.52, 0.3, 0.9], [0.47, 0.56, 0.2]], requires_grad=True)
    f, l0 = _JumpReLU.apply(z, theta, 0.1)
    assert torch.equal(f, torch.tensor([[0.52, 0.0, 0.9], [0.0, 0.56, 0.0]]).float())
    assert torch.equal(l0, torch.tensor([2.0, 1.0]))
    f.sum().backward()
    # |z - theta| < eps/2 = 0.05 for z = 0.52, 0.47 (latent 0) and none else -> 2 * -(0.5/0.1)
    assert torch.allclose(theta.grad, torch.tensor([-10.0, 0.0, 0.0]))
    assert torch.equal(z.grad, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    theta.grad = z.grad = None
    f, l0 = _JumpReLU.apply(z, theta, 0.1)
    l0.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-20.0, 0.0, 0.0])) and not z.grad.any()
    theta.grad = z.grad = None
    f, l0 = _JumpReLU.apply(z, theta, 0.1)
    (3 * f.sum() + 0.5 * l0.sum()).backward()                 # both at once, weighted
    assert torch.allclose(theta.grad, torch.tensor([3 * -10.0 + 0.5 * -20.0, 0.0, 0.0]))


def test_jumprelu_loss_is_mse_plus_lambda_l0():
    sae = make("jumprelu", l0_coeff=0.01)
    x = data()
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    l0 = (pre > sae.threshold).float().sum(1).mean()
    assert torch.allclose(out.losses["l0_loss"], 0.01 * l0)
    assert torch.allclose(out.l0, l0)
    assert torch.allclose(sae(x, sparsity_coeff=0.5).losses["l0_loss"], 0.5 * l0)


def test_jumprelu_tanh_sparsity_loss_by_hand():
    """--sparsity-loss tanh: lambda * mean over rows of sum_i tanh(4 f_i |W_dec_i|), on a case
    worked by hand (W = I, theta 0.1); unlike the step loss its gradient reaches the active
    pre-activations (d/df = 4 lambda sech^2(4 f)), and it trains on the plain path."""
    x = torch.tensor([[1.0, 0.05], [0.5, 2.0]])
    sae = {m: SAE(2, 2, "jumprelu", 1, sparsity_loss=m, l0_coeff=0.1) for m in ("step", "tanh")}
    for s in sae.values():
        with torch.no_grad():
            s.W_enc.copy_(torch.eye(2))
            s.W_dec.copy_(torch.eye(2))
            s.b_enc.zero_()
            s.b_dec.zero_()
            s.threshold.fill_(0.1)
    out = sae["tanh"](x)                                   # acts [[1, 0], [0.5, 2]]
    t = torch.tanh(torch.tensor(4.0))
    expected = 0.1 * (t + torch.tanh(torch.tensor(2.0)) + torch.tanh(torch.tensor(8.0))) / 2
    assert torch.allclose(out.losses["l0_loss"], expected)
    assert torch.allclose(out.l0, torch.tensor(1.5))       # L0 is still the count
    assert torch.allclose(sae["step"](x).losses["l0_loss"], torch.tensor(0.1 * 1.5))
    for m, s in sae.items():
        s.zero_grad()
        s(x).losses["l0_loss"].backward()
        g = s.b_enc.grad
        if m == "step":
            assert torch.equal(g, torch.zeros(2))
        else:                                              # column sums over the active rows, / batch 2
            sech2 = lambda f: 1 - torch.tanh(4 * torch.tensor(f)) ** 2    # noqa: E731
            assert torch.allclose(g, 0.1 * 4 * torch.stack([sech2(1.0) + sech2(0.5), sech2(2.0)]) / 2, atol=1e-6)
    assert sae["step"].use_sparse(x) and not sae["tanh"].use_sparse(x)
    assert not SAE(2, 2, "jumprelu", 1, sparsity_loss="tanh", sparse=True).use_sparse(x)   # the kernels lack it
    with pytest.raises(UserError, match="sparsity_loss must be step or tanh"):
        SAE(2, 2, "jumprelu", 1, sparsity_loss="l1")


def test_relu_loss_is_mse_plus_l1():
    sae = make("relu", l1_coeff=0.3)
    x = data()
    out = sae(x)
    f = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    assert torch.allclose(out.losses["l1_loss"], 0.3 * (f * sae.W_dec.norm(dim=1)).sum(1).mean(), rtol=1e-5)
    assert not torch.allclose(out.losses["l1_loss"], 0.3 * f.sum(1).mean(), rtol=1e-2)    # rows at 0.1: weighted
    assert torch.allclose(out.losses["mse"], (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(1).mean(), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale(arch):
    """Trained on s*x, folded: the same code up to a factor 1/s, x_hat in x's units, rows' norms kept."""
    sae = make(arch)
    sae.eval()
    x, s = data(), 0.37
    with torch.no_grad():
        f_norm = sae.encode(s * x)
        xh_norm = sae.decode(f_norm)
        sae.fold_input_scale_(s)
        f, xh = sae.encode(x), sae.decode(sae.encode(x))
    assert torch.equal(f > 0, f_norm > 0)
    assert torch.allclose(f, f_norm / s, rtol=1e-4, atol=1e-5)
    assert torch.allclose(xh, xh_norm / s, rtol=1e-4, atol=1e-4)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((sae.d_sae,), sae._init_norm()), atol=1e-6)


# ----------------------------------------------------------------------------
# files

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_identical(arch, tmp_path):
    sae = make(arch)
    sae.save(tmp_path, metadata={"hook_name": "blocks.0.hook_resid_post", "model_name": "toy", "seed": 3})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
                                   "jumprelu": "jumprelu"}[arch]
    for key in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "metadata"):
        assert key in cfg
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["metadata"]["seed"] == 3
    assert cfg["metadata"]["training_architecture"] == ("standard" if arch == "relu" else arch)
    assert ("k" in cfg) == (arch in ("topk", "batchtopk"))
    loaded = SAE.load(tmp_path)
    assert loaded.arch == arch and loaded.k == sae.k
    x = data()
    sae.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


def _write(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))


def _saelens_reference(cfg, t, x):
    """SAELens 6 inference, written out from its source (saes/*.py) for the tests."""
    if cfg.get("normalize_activations") == "constant_norm_rescale":
        c = cfg["d_in"] ** 0.5 / x.norm(dim=-1, keepdim=True)
        x = x * c
    else:
        c = None
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    arch = cfg.get("architecture", "standard")
    W_dec = t["W_dec"]
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * W_dec.norm(dim=-1)
        v, i = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, i, v.relu())
        if cfg.get("rescale_acts_by_decoder_norm"):
            out = (f / W_dec.norm(dim=-1)) @ W_dec + t["b_dec"]
        else:
            out = f @ W_dec + t["b_dec"]
    elif arch == "jumprelu":
        f = pre.relu() * (pre > t["threshold"].relu())
        out = f @ W_dec + t["b_dec"]
    else:
        f = pre.relu()
        out = f @ W_dec + t["b_dec"]
    if c is not None:
        out = out / c
    return f, out


def _random_tensors(d_in, d_sae, jump=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": 0.3 * torch.randn(d_in, d_sae, generator=g), "b_enc": 0.1 * torch.randn(d_sae, generator=g),
         "W_dec": 0.3 * torch.randn(d_sae, d_in, generator=g), "b_dec": 0.2 * torch.randn(d_in, generator=g)}
    if jump:
        t["threshold"] = 0.2 + 0.1 * torch.rand(d_sae, generator=g)
    return t


V6 = {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}
SAELENS_CASES = {
    "standard": ({"architecture": "standard", "d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cpu",
                  "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": V6}, False),
    "topk_rescaled": ({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 5, "dtype": "float32",
                       "apply_b_dec_to_input": True, "normalize_activations": "none",
                       "rescale_acts_by_decoder_norm": True, "metadata": V6}, False),
    "gemma_scope_jumprelu": ({"architecture": "jumprelu", "d_in": 16, "d_sae": 64, "dtype": "float32",
                              "apply_b_dec_to_input": False, "normalize_activations": "none",
                              "metadata": {**V6, "model_name": "gemma-2-2b"}}, True),
    "jumprelu_constant_norm_rescale": ({"architecture": "jumprelu", "d_in": 16, "d_sae": 64, "dtype": "float32",
                                        "apply_b_dec_to_input": True,
                                        "normalize_activations": "constant_norm_rescale", "metadata": V6}, True),
    "pre6_standard": ({"d_in": 16, "d_sae": 64, "dtype": "float32", "hook_point": "blocks.1.hook_resid_pre",
                       "model_name": "gpt2-small", "normalize_activations": False, "activation_fn_str": "relu"}, False),
    "pre6_topk": ({"d_in": 16, "d_sae": 64, "dtype": "float32", "hook_name": "blocks.1.hook_mlp_out",
                   "activation_fn": "topk", "activation_fn_kwargs": {"k": 7}, "apply_b_dec_to_input": True}, False),
}


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_loads_saelens_layouts_with_their_semantics(case, tmp_path):
    cfg, jump = SAELENS_CASES[case]
    t = _random_tensors(16, 64, jump)
    _write(tmp_path, cfg, t)
    sae = SAE.load(tmp_path)
    x = data(100, 16)
    ref_cfg = dict(cfg)
    if case == "pre6_topk":
        ref_cfg.update(architecture="topk", k=7)
    f_ref, out_ref = _saelens_reference(ref_cfg, t, x)
    with torch.no_grad():
        f = sae.encode(x)
        out = sae.decode(f)
    assert torch.equal(f > 0, f_ref > 0)
    assert torch.allclose(f, f_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out, out_ref, rtol=1e-4, atol=1e-4)
    assert sae.metadata.get("hook_name") in ("blocks.3.hook_resid_post", "blocks.1.hook_resid_pre",
                                            "blocks.1.hook_mlp_out")


def test_loads_saelens_batchtopk(tmp_path):
    """SAELens saves a trained BatchTopK as a JumpReLU with one threshold for every latent
    (save_inference_model), or raw with a scalar topk_threshold (save_model)."""
    t = _random_tensors(16, 64)
    inf = {**t, "threshold": torch.full((64,), 0.25)}
    _write(tmp_path / "inference", {"architecture": "jumprelu", "d_in": 16, "d_sae": 64, "dtype": "float32",
                                    "apply_b_dec_to_input": True, "normalize_activations": "none",
                                    "metadata": {**V6, "training_architecture": "batchtopk",
                                                 "training_architecture_details": {"k": 6.0}}}, inf)
    _write(tmp_path / "training", {"architecture": "batchtopk", "d_in": 16, "d_sae": 64, "k": 6, "dtype": "float32",
                                   "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": V6},
           {**t, "topk_threshold": torch.tensor(0.25, dtype=torch.float64)})
    x = data(100, 16)
    a, b = SAE.load(tmp_path / "inference"), SAE.load(tmp_path / "training")
    assert a.arch == b.arch == "batchtopk" and a.k == b.k == 6
    f_ref, _ = _saelens_reference({"architecture": "jumprelu", "apply_b_dec_to_input": True}, inf, x)
    assert torch.equal(a.encode(x), b.encode(x)) and torch.allclose(a.encode(x), f_ref)


def test_our_cfg_reads_as_saelens_6(tmp_path):
    """What SAELens's loader needs: metadata.sae_lens_version >= 6 (else it treats the file as
    pre-6 and drops the metadata), and exactly the state-dict keys of its inference class."""
    for arch in ARCHS:
        make(arch).save(tmp_path / arch)
        cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
        assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
        from safetensors import safe_open
        with safe_open(str(tmp_path / arch / "sae_weights.safetensors"), "pt") as f:
            keys = set(f.keys())
        want = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if cfg["architecture"] == "jumprelu" else set())
        assert keys == want


BAD_LOADS = {
    "missing key": (lambda c, t: t.pop("b_enc"), "lacks b_enc"),
    "wrong shape": (lambda c, t: t.__setitem__("W_dec", torch.zeros(64, 17)), "W_dec has shape [64, 17]"),
    "mismatched d_in": (lambda c, t: c.__setitem__("d_in", 32), "cfg.json says d_in=32"),
    "nan": (lambda c, t: t["W_enc"].__setitem__((3, 5), float("nan")), "W_enc holds NaN/inf"),
    "inf": (lambda c, t: t["b_dec"].__setitem__(2, float("inf")), "b_dec holds NaN/inf"),
    "unknown arch": (lambda c, t: c.__setitem__("architecture", "gated"), "unknown architecture 'gated'"),
    "k > d_sae": (lambda c, t: c.update(architecture="topk", k=65), "k=65 must be an integer in 1..d_sae=64"),
    "no k": (lambda c, t: c.update(architecture="topk"), "k=None"),
    "bad normalize": (lambda c, t: c.__setitem__("normalize_activations", "whiten"), "unknown normalize_activations"),
}


@pytest.mark.parametrize("case", BAD_LOADS)
def test_bad_sae_files_give_one_clear_error(case, tmp_path):
    cfg = json.loads(json.dumps(SAELENS_CASES["standard"][0]))
    t = _random_tensors(16, 64)
    edit, msg = BAD_LOADS[case]
    edit(cfg, t)
    _write(tmp_path, cfg, t)
    with pytest.raises(UserError) as e:
        SAE.load(tmp_path)
    assert msg in str(e.value) and str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_sae_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        SAE.load(tmp_path)
    _write(tmp_path, SAELENS_CASES["standard"][0], _random_tensors(16, 64))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(UserError, match="not a readable safetensors"):
        SAE.load(tmp_path)


def test_constructor_rejects_bad_config():
    with pytest.raises(UserError, match="unknown SAE architecture"):
        SAE(8, 32, "gated")
    with pytest.raises(UserError, match="k must be in 1..d_sae=32"):
        SAE(8, 32, "topk", k=33)
    with pytest.raises(UserError, match="needs k"):
        SAE(8, 32, "batchtopk")


def test_init_from_data_rows_are_data_points_minus_b_dec():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) @ torch.randn(16, 32, generator=g) + 3.0      # rank 16 in 32 dims
    sae = SAE(32, 64, "topk", 4)
    sae.init_b_dec_(x)
    sae.init_from_data_(x, torch.Generator().manual_seed(1))
    W = sae.W_dec.detach()
    assert torch.allclose(W.norm(dim=1), torch.ones(64), atol=1e-5) and torch.equal(sae.W_enc.detach(), W.t())
    centred = x - sae.b_dec.detach()
    cos = (W @ (centred / centred.norm(dim=1, keepdim=True)).t()).max(1).values
    assert (cos > 1 - 1e-5).all()                     # every row is one of the (centred) data rows
    # inside the data's span: nothing outside the top-16 principal subspace
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:16]
    assert torch.allclose((W @ basis.t()).norm(dim=1), torch.ones(64), atol=1e-4)
