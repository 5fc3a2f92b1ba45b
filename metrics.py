"""Every metric the pipeline reports, defined once, each with its formula.

03_train_sae.py logs with these, 04_evaluate.py and 05_overlap.py report with
these, and tests/test_metrics.py checks each on a case whose answer is known.
"""
from __future__ import annotations

import torch


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (SAEBench's definition).

    Pooled over all dimensions, so a dimension with large variance counts for
    more; this is 1 - FVU. It differs from the per-dimension mean of
    1 - mse_d / var_d when dimensions have unequal variance: we use this one everywhere.
    """
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(1.0 - resid / total.clamp_min(1e-30))


def l0(acts: torch.Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float((acts != 0).sum(-1).double().mean())
