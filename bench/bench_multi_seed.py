"""Five seeds in one pass (03 --seed 1 2 3 4 5) against five runs one after another, in one run;
and the same pass with --stack off, to show what the stacked step (lib/stacked.py) adds to the
shared read and start-up.

    .venv/bin/python bench/bench_multi_seed.py
    .venv/bin/python bench/bench_multi_seed.py --steps 200 --lm-acts runs/smollm2/acts/L15_resid_post

Shapes: the small well-posed study shape (128 -> 256, k 2) and 128 -> 1024, k 32, on the seed-42
model's resid_post, each for --steps steps at 03's default batch (fixed length, --tokens, so
both sides do the same steps); wall seconds of whole processes (start-up, data, training, saving),
as a user runs them; both sides use every core. LM shards: the same comparison in one process
per side, counting the shard files read (lib.activations.load_shard) and their bytes: one pass
reads each shard once for all five SAEs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib import activations as A  # noqa: E402
from lib.common import load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use

SEEDS = ["1", "2", "3", "4", "5"]


def run03(*args) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "03_train_sae.py"), *map(str, args), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-800:])
    return time.perf_counter() - t0


def shard_reads(acts: Path, out: Path, seeds: list, tokens: int, k: int) -> tuple[int, int]:
    """Shards read (and bytes) by one in-process 03 run over the given seeds."""
    mod = load_stage("03_train_sae.py")
    count = {"n": 0, "bytes": 0}
    orig = A.load_shard

    def counting(acts_dir, manifest, i):
        count["n"] += 1
        count["bytes"] += manifest["shards"][i]["bytes"]
        return orig(acts_dir, manifest, i)
    A.load_shard = counting
    try:
        mod.main(["--acts", str(acts), "--out", str(out), "--seed", *seeds, "--tokens", str(tokens), "--k", str(k),
                  "--quiet", "--overwrite", "--buffer-rows", "65536"])
    finally:
        A.load_shard = orig
    return count["n"], count["bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--acts", type=Path, default=ROOT / "runs" / "modadd" / "seed42" / "acts" / "resid_post.safetensors")
    ap.add_argument("--lm-acts", type=Path, default=ROOT / "runs" / "smollm2" / "acts" / "L15_resid_post")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    if not a.acts.is_file():
        raise SystemExit(f"{a.acts} is missing (run_all.sh, or 01 + 02, make it)")
    batch = 1024                                      # 03's default on the 11,492 modular-addition train rows
    print(f"5 seeds in one pass vs 5 runs one after another; {a.steps} steps at batch {batch}; whole processes")
    print(f"{'shape':22s} {'one pass s':>10s} {'unstacked s':>11s} {'5 runs s':>9s} {'speed-up':>9s} "
          f"{'unstacked speed-up':>18s}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for d_sae, k in ((256, 2), (1024, 32)):
            flags = ["--acts", a.acts, "--arch", "topk", "--k", k, "--d-sae", d_sae, "--tokens", a.steps * batch]
            one = run03(*flags, "--out", tmp / f"one_{d_sae}", "--seed", *SEEDS)
            off = run03(*flags, "--out", tmp / f"off_{d_sae}", "--seed", *SEEDS, "--stack", "off")
            seq = sum(run03(*flags, "--out", tmp / f"seq_{d_sae}_{s}", "--seed", s) for s in SEEDS)
            print(f"{f'128 -> {d_sae}, k {k}':22s} {one:10.1f} {off:11.1f} {seq:9.1f} {seq / one:8.2f}x "
                  f"{seq / off:17.2f}x")
        if (a.lm_acts / "manifest.json").is_file():
            m = A.read_manifest(a.lm_acts)
            tokens = min(int(m["split"]["n_train_rows"]), 4096 * 60)
            n1, b1 = shard_reads(a.lm_acts, tmp / "lm_one", SEEDS, tokens, 32)
            n5 = b5 = 0
            for s in SEEDS:
                n, b = shard_reads(a.lm_acts, tmp / f"lm_{s}", [s], tokens, 32)
                n5, b5 = n5 + n, b5 + b
            print(f"LM shards ({a.lm_acts}, {len(m['shards'])} shards, {tokens} rows per SAE): "
                  f"one pass read {n1} shard files ({b1 / 2**20:.0f} MiB); 5 runs read {n5} ({b5 / 2**20:.0f} MiB)")
        else:
            print(f"(no LM shards at {a.lm_acts}: run TARGETS=smollm2 bash run_all.sh for the LM row)")


if __name__ == "__main__":
    main()
