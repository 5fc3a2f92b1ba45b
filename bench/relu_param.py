"""Why 03's ReLU SAE trains with free decoder rows: the same 03 run with sae.py's relu as it is
(Anthropic's April 2024 recipe: rows free, starting at norm 0.1, penalty l1 * sum_i f_i |W_dec_i|)
and with the unit-norm constraint put back (rows unit norm from the start, the parallel gradient
removed, rows renormalised after each step: the penalty is then the plain L1).

    .venv/bin/python bench/relu_param.py                         # post:2:256 and mid:2:256, seeds 1 2 3
    .venv/bin/python bench/relu_param.py --configs post:3:384 --seeds 1

Both parameterisations optimise the same objective (f_i |W_dec_i| is one latent in other units);
they differ in how Adam moves through it. Everything else is 03's default: lambda steered toward
L0 = k, the plateau rule, AuxK, lr, batch. The unit-norm runs are 03 in a child process with
sae.SAE patched (`--unit-rows`), nothing else changed. Scored as bench_recipe.py scores a row.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipe import ROOT, parse_configs, score, train  # noqa: E402
from lib.common import load_stage, pin_cpu_kernels  # noqa: E402

pin_cpu_kernels()   # the stages' CPU kernels (lib.common.pin_cpu_kernels), as their scripts use


def run_03_with_unit_rows(argv: list[str]) -> None:
    """03's main(argv) with relu's decoder rows constrained to unit norm as the other archs' are."""
    sys.path.insert(0, str(ROOT))
    import torch
    import sae as S
    init = S.SAE.__init__

    def unit_init(self, *a, **kw):
        init(self, *a, **kw)
        self.unit_decoder = True
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.t())
    S.SAE.__init__ = unit_init
    load_stage("03_train_sae.py").main(argv)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "modadd" / "seed42")
    ap.add_argument("--configs", nargs="+", default=["post:2:256", "mid:2:256"], help="site:k:d_sae")
    ap.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    ap.add_argument("--jobs", type=int, default=2, help="03 runs side by side (one torch thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "relu_param")
    ap.add_argument("--unit-rows", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)   # the child process
    a = ap.parse_args()
    if a.unit_rows is not None:
        return run_03_with_unit_rows(a.unit_rows)
    cells = [(cfg, acts, k, d, param) for cfg, _, k, d, acts in parse_configs(a.run, a.configs)
             for param in ("free", "unit")]

    def out_dir(cfg: str, param: str) -> Path:
        return a.out / f"{cfg.replace(':', '_')}_{param}"

    def one(cell):
        cfg, acts, k, d, param = cell
        out = out_dir(cfg, param)
        extra = ["--seed", *a.seeds]
        if param == "unit":          # this file as 03 with the patch; train() prepends 03's path
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--unit-rows", "--acts", str(acts), "--out", str(out),
                                "--arch", "relu", "--k", str(k), "--d-sae", str(d), "--threads", "1", "--quiet",
                                "--overwrite", *extra], capture_output=True, text=True, cwd=ROOT)
            if p.returncode != 0:
                raise SystemExit(f"03 (unit rows) failed for {cfg}: {p.stderr.strip()[-500:]}")
            return time.perf_counter() - t0
        return train(acts, out, "relu", k, d, extra)

    with ThreadPoolExecutor(a.jobs) as pool:
        secs = list(pool.map(one, cells))
    print(f"relu, 03 defaults, seeds {' '.join(a.seeds)} in one 03 call per row (one after another, no stacking); "
          f"{a.jobs} calls side by side, 1 torch thread each")
    print(f"{'config':12s} {'rows':>5s} {'seed':>4s} {'EV':>7s} {'refit':>6s} {'L0':>5s} {'dead':>6s} {'answer':>7s} "
          f"{'operand':>7s} {'steps':>6s}  stop")
    for (cfg, acts, k, d, param), s in zip(cells, secs):
        for seed in a.seeds:
            out = out_dir(cfg, param)
            r = score(acts, out / f"seed{seed}" if len(a.seeds) > 1 else out)
            print(f"{cfg:12s} {param:>5s} {seed:>4s} {r['ev']:7.4f} {r['refit']:6.3f} {r['l0']:5.2f} {r['dead']:6.1%} "
                  f"{r.get('rec_answer', float('nan')):7.1%} {r.get('rec_operand', float('nan')):7.1%} "
                  f"{r['steps']:6d}  {r['stop']}")
        print(f"{cfg:12s} {param:>5s}  all seeds: {s:.0f} s")


if __name__ == "__main__":
    main()
