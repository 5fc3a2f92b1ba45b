"""SAELens 6's on-disk format for sae.SAE: save, load, and what only loaded SAEs need.

    DIR/cfg.json                  architecture, d_in, d_sae, k, apply_b_dec_to_input,
                                  normalize_activations, metadata {hook_name, model_name, ...}
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec (+ threshold)

Our relu is SAELens's "standard"; BatchTopK is saved as a "jumprelu" whose threshold is the
same for every latent (as SAELens exports a trained BatchTopK), so `sae_lens.SAE.load_from_disk`
gives the same codes and reconstructions as ours (tests/test_interop.py runs the real library).
`load` also reads SAELens's own files: standard, topk (incl. rescale_acts_by_decoder_norm),
jumprelu (incl. Gemma Scope conversions without b_dec on the input, older log_threshold),
batchtopk (raw, with a scalar topk_threshold), pre-6 configs, and the run-time input
normalisations "constant_norm_rescale" and "layer_norm", which our own SAEs never use (their
input scale is folded into the weights): a loaded SAE with one of those is a NormalizedSAE.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lib.common import UserError, load_json, load_tensors, save_json, save_tensors

# Our name -> the `architecture` SAELens 6 gives the inference model.
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
# SAELens reads a config without metadata.sae_lens_version >= 6 as the pre-6 layout
# (and drops our metadata); this is the on-disk format version we follow.
SAELENS_FORMAT_VERSION = "6.0.0"
NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
TRAINING_DETAILS = ("k", "k_aux", "auxk_coeff", "pre_act_coeff", "l1_coeff", "l0_coeff", "bandwidth", "threshold_ema",
                    "sparsity_loss", "tanh_scale")


def cfg_dict(sae, metadata: dict | None = None) -> dict:
    """cfg.json of `sae` in SAELens 6's layout; our training hyper-parameters go in metadata."""
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": None, "hook_name": None, "hook_head_index": None,
            **sae.metadata, **(metadata or {}),
            "training_architecture": sae.arch if sae.arch != "relu" else "standard",
            "training_architecture_details": {n: getattr(sae, n) for n in TRAINING_DETAILS}}
    cfg = {"architecture": SAELENS_ARCH[sae.arch], "d_in": sae.d_in, "d_sae": sae.d_sae,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": sae.normalize_activations, "reshape_activations": "none"}
    if sae.arch in ("topk", "batchtopk"):
        cfg["k"] = sae.k
    if sae.arch == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["metadata"] = meta
    return cfg


def save(sae, path, metadata: dict | None = None) -> Path:
    """Write sae_weights.safetensors + cfg.json (atomically). metadata is merged into
    cfg.json's `metadata` (hook_name, model_name, training config, seed, code_version...)."""
    path = Path(path)
    t = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.arch in ("jumprelu", "batchtopk"):
        t["threshold"] = sae.threshold
    save_tensors({k: v.detach().float() for k, v in t.items()}, path / "sae_weights.safetensors")
    save_json(cfg_dict(sae, metadata), path / "cfg.json")
    return path


def load(path, device="cpu", cls=None):
    """Read an SAE from DIR/cfg.json + DIR/sae_weights.safetensors: ours or SAELens's.
    Any problem is one UserError line naming the file. cls: the SAE class (sae.SAE)."""
    if cls is None:
        from sae import SAE as cls
    path = Path(path)
    check = _checker(path)
    cfg = load_json(path / "cfg.json", "SAE config")
    check(isinstance(cfg, dict), "cfg.json is not a JSON object")
    cfg = upgrade_pre6_cfg(cfg)
    t = load_tensors(path / "sae_weights.safetensors", "SAE weights")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    arch_name = cfg.get("architecture", "standard")
    if arch_name == "jumprelu" and meta.get("training_architecture") == "batchtopk":
        arch = "batchtopk"
    else:
        arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}.get(arch_name)
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
    _check_tensors(check, t, need, d_in, d_sae)
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
    kw = {n: details[n] for n in TRAINING_DETAILS[1:]
          if isinstance(details.get(n), (int, float)) and not isinstance(details.get(n), bool)}
    if norm in ("constant_norm_rescale", "layer_norm"):
        cls = normalized_class(cls)
    sae = cls(d_in, d_sae, arch, k, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
              metadata=meta, **kw)
    sae.normalize_activations = norm
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


def _check_tensors(check, t: dict, need: list, d_in: int, d_sae: int) -> None:
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


def _checker(path: Path):
    def check(cond, msg):
        if not cond:
            raise UserError(f"SAE {path}: {msg}")
    return check


def upgrade_pre6_cfg(cfg: dict) -> dict:
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


# ----------------------------------------------------------------------------
# Run-time input normalisation of loaded SAELens SAEs. ("expected_average_only_in" is the
# identity at inference in SAELens too: its scale lives outside the SAE.)

_NORMALIZED = {}


def normalized_class(base):
    """A subclass of `base` (sae.SAE) whose encode / decode / forward normalise the input as
    SAELens does and map the reconstruction back: constant_norm_rescale scales each row to
    norm sqrt(d_in); layer_norm centres and scales it to unit std (eps 1e-5)."""
    if base not in _NORMALIZED:
        class NormalizedSAE(base):
            def _norm_in(self, x):
                if self.normalize_activations == "constant_norm_rescale":
                    c = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
                    self._norm_ctx = ("scale", c)
                    return x * c
                mu = x.mean(-1, keepdim=True)
                x = x - mu
                std = x.std(-1, keepdim=True)
                self._norm_ctx = ("ln", mu, std)
                return x / (std + 1e-5)

            def _norm_out(self, x_hat):
                ctx = getattr(self, "_norm_ctx", None)
                if ctx is None:
                    raise RuntimeError(f"decode() of a normalize_activations={self.normalize_activations} "
                                       f"SAE needs encode() first")
                del self._norm_ctx
                return x_hat / ctx[1] if ctx[0] == "scale" else x_hat * ctx[2] + ctx[1]

            def encode(self, x):
                return super().encode(self._norm_in(x.to(self.W_enc.dtype)))

            def decode(self, acts):
                return self._norm_out(super().decode(acts))

            def forward(self, x, dead_mask=None, sparsity_coeff=None, all_reduce=None):
                out = super().forward(self._norm_in(x), None, sparsity_coeff)
                out.x_hat = self._norm_out(out.x_hat)
                return out

            def use_sparse(self, x):
                return False
        _NORMALIZED[base] = NormalizedSAE
    return _NORMALIZED[base]
