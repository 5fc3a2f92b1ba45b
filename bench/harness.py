"""What bench/bench_sae.py, bench_vs_saelens.py and auxk_floor.py share: a median timer, the
synthetic rows and dead latents they time their steps on, and their shape flags. Torch only:
bench_vs_saelens.py's SAELens side imports it in .venv-saelens."""
from __future__ import annotations

import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, n_steps: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n_steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_shape_args(ap, steps: int) -> None:
    """--d-in, --d-sae, --k, --batch-size, --dead-frac (default: bench_sae.py's shape) and --steps."""
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--dead-frac", type=float, default=0.25, help="latents marked dead in the AuxK rows")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per case and round")


def make_rows(B: int, d: int, D: int) -> torch.Tensor:
    """x [B, d]: sums of 8 random unit directions (of 4 * D) with uniform weights, like the
    tests' data; torch's global seed set to 0 first."""
    torch.manual_seed(0)
    feats = torch.randn(4 * D, d)
    feats /= feats.norm(dim=1, keepdim=True)
    x = torch.zeros(B, d)
    for _ in range(8):
        x += torch.rand(B, 1) * feats[torch.randint(len(feats), (B,))]
    return x


def dead_latents(D: int, frac: float) -> torch.Tensor:
    """A [D] bool mask with int(frac * D) latents set, drawn from a seed-0 generator."""
    gen = torch.Generator().manual_seed(0)
    dead = torch.zeros(D, dtype=torch.bool)
    dead[torch.randperm(D, generator=gen)[: int(frac * D)]] = True
    return dead
