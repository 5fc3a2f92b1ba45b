"""Does the model 01 trains depend on which CPU kernels torch picks? 01 and 02 (resid_post) for one
seed under each ATEN_CPU_CAPABILITY this CPU can run (PyTorch's switch: default = no SIMD, avx2,
avx512), then a table: 01's steps and seconds, key frequencies, the site's answer and operand
table shares, and which runs trained the same weights to the bit.

    python bench/cpu_kernels.py                  # seed 42, into runs/cpu_kernels
    python bench/cpu_kernels.py --seed 123

Each run is its own process, so the switch is read fresh (torch fixes its choice at the first
tensor op). lib.common.pin_cpu_kernels is why this matters: every stage uses the AVX2 kernels
unless told otherwise. Output: bench/cpu_kernels_cpu.txt.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.common import load_tensors  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--out", default="runs/cpu_kernels")
a = ap.parse_args()

caps = ["default"] + ["avx2"] * torch.cpu._is_avx2_supported() + ["avx512"] * torch.cpu._is_avx512_supported()
rows, weights = [], {}
for cap in caps:
    out = Path(a.out) / cap
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    t0 = time.time()
    for cmd in (["01_train_transformer.py", "--seed", str(a.seed), "--out", str(out), "--overwrite", "--quiet"],
                ["02_extract_activations.py", "--run", str(out), "--site", "resid_post",
                 "--out", str(out / "acts" / "resid_post.safetensors"), "--overwrite"]):
        subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:]], check=True, cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL)
    cfg = json.loads((out / "config.json").read_text())
    gt = json.loads((out / "acts" / "resid_post.ground_truth.json").read_text())
    four = json.loads((out / "fourier.json").read_text())
    weights[cap] = load_tensors(out / "model.safetensors")
    rows.append((cap, cfg["cpu_kernels"], cfg["summary"]["steps"], cfg["summary"]["train_time_s"],
                 four["key_frequencies"], gt["tables"]["answer"]["share"], gt["tables"]["operand"]["share"]))
    print(f"{cap}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

print(f"seed {a.seed}, torch {torch.__version__}, {os.cpu_count()} CPU threads available")
print(f"{'ATEN_CPU_CAPABILITY':20s} {'in use':7s} {'steps':>6s} {'01 s':>6s}  {'answer':>7s} {'operand':>8s}  key frequencies")
for cap, used, steps, secs, keys, ans, op in rows:
    print(f"{cap:20s} {used:7s} {steps:6d} {secs:6.1f}  {100 * ans:6.1f}% {100 * op:7.1f}%  {keys}")
for i, c in enumerate(caps):
    for d in caps[i + 1:]:
        same = all(torch.equal(weights[c][k], weights[d][k]) for k in weights[c])
        print(f"weights {c} vs {d}: {'identical' if same else 'differ'}")
