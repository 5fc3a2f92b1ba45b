"""03_train_sae.py with the global gradient norm of every optimiser step recorded
(OUT/gradnorms.json, one float a step): to see what precedes a loss spike.

    .venv/bin/python bench/grad_norm_trace.py --acts runs/modadd/seed42/acts/resid_mid.safetensors \
        --out /tmp/gn --arch relu --k 2 --d-sae 256 --stop-after-steps 5700 --max-grad-norm 0 [--no-auxk]

Every argument goes to 03 unchanged. The norm is the one Adam sees, after 03's clipping (relu
clips at 1 by default): --max-grad-norm 0 records the raw gradient. Single-SAE runs only
(torch.optim.Adam; stacked runs use lib/stacked.StackedAdam, which this does not see).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.common import load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use

norms = []
_step = torch.optim.Adam.step


def step(self, *a, **kw):
    grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
    norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
    return _step(self, *a, **kw)


if __name__ == "__main__":
    torch.optim.Adam.step = step
    load_stage("03_train_sae.py").main(sys.argv[1:])
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    (out / "gradnorms.json").write_text(json.dumps(norms))
