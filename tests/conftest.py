"""Shared test helpers: the stage scripts loaded (and run) in-process, and data made from a known
sparse dictionary."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.common import pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the tests on the kernels the stages use (run_main pins them there too)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end runs (still run in CI)")
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta")


def run_stage(capsys, script: str, *args) -> SimpleNamespace:
    """`python script *args` without a new interpreter: its main under run_main, as the script's
    own `__main__` calls it. Returns what a process would: returncode, stdout, stderr."""
    from lib.common import load_stage, run_main
    main = load_stage(script).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([str(a) for a in args]))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=e.value.code, stdout=out, stderr=err)


def sparse_dictionary_data(n=6000, d=64, n_feat=256, active=3, seed=12345, scale=3.0, offset=True):
    """x = sum of `active` random unit-norm features with magnitudes in [0.5, 1.5] * scale,
    plus a constant offset (so b_dec has something to find). Returns (x, features).
    The default seed is not one the SAEs use: with seed 0 the randn features would *be*
    a seed-0 SAE's initial decoder rows."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n)])
    mag = (0.5 + torch.rand(n, active, generator=g)) * scale
    x = torch.einsum("na,nad->nd", mag, feats[idx])
    if offset:
        x += 0.5 * torch.randn(d, generator=g)
    return x, feats


def write_acts(path: Path, x: torch.Tensor, train_frac: float | None = 0.9, extra: dict | None = None) -> Path:
    """An activations.safetensors as 02 writes it (train_mask optional)."""
    from safetensors.torch import save_file
    t = {"activations": x.contiguous()}
    if train_frac is not None:
        m = torch.zeros(len(x), dtype=torch.bool)
        m[: int(train_frac * len(x))] = True
        t["train_mask"] = m
    t.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return path
