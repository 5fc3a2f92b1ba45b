"""What every stage shares: one-line errors, atomic writes, safe loading, seeding,
device choice, provenance and the torchrun/DDP set-up.

Kept small on purpose: each stage script should read top to bottom on its own,
calling into here only for plumbing that would otherwise be copied five times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]      # the repository: lib/ lives in it


# ----------------------------------------------------------------------------
# Errors: bad input gets one clear line and a non-zero exit, never a traceback.

class UserError(Exception):
    """A problem with the user's input (a flag, a file). Printed as one line."""


def run_main(main) -> None:
    """Call main() on pinned CPU kernels (pin_cpu_kernels); turn a UserError into `error: ...`
    on stderr and exit 2."""
    pin_cpu_kernels()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


# ----------------------------------------------------------------------------
# The same numbers on every x86 machine

def pin_cpu_kernels() -> str:
    """Use torch's AVX2 CPU kernels on a CPU that would get its AVX-512 ones, unless the user set
    ATEN_CPU_CAPABILITY (PyTorch's own switch: avx2, avx512, default). Returns the kernels in use
    ("AVX2", ...), which provenance() records. Must run before the first tensor op, where torch
    fixes its choice: run_main calls it before main.

    Why: the two sets' floats differ in the last bits, and grokking amplifies that. 01 --seed 42
    on AVX-512 kernels groks into another model (1,121 steps; resid_post 90.2% answer table, where
    the study's TopK misses its goal) than on AVX2 ones (1,171 steps, 86.3%: the model the README
    and bench/ report, from earlier machines), at the same speed (bench/cpu_kernels_cpu.txt).
    No-op off x86 or without AVX2."""
    if "ATEN_CPU_CAPABILITY" not in os.environ and torch.cpu._is_avx2_supported():
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    return torch.backends.cpu.get_cpu_capability()


# ----------------------------------------------------------------------------
# Files: write to a temporary name, then rename, so a killed run never leaves a
# half-written result under the final name. Load only safetensors and JSON.

def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_json(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def load_json(path, what: str = "file") -> dict:
    path = Path(path)
    check(path.is_file(), f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})")


def load_tensors(path, what: str = "file") -> dict:
    """Load every tensor of a safetensors file (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    check(path.is_file(), f"{what} {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})")


def load_tensor_metadata(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def append_jsonl(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def prepare_out_dir(out, final_file: str, overwrite: bool) -> Path:
    """Refuse to clobber a finished run. A run is finished when `final_file` exists."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / final_file).exists() and not overwrite:
        raise UserError(f"--out {out} already holds a finished run ({final_file}); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------
# Reproducibility and provenance.

def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def code_version() -> str:
    """git commit of this checkout (+'-dirty' if modified), or a hash of the sources."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha1()
    for p in sorted([*ROOT.glob("*.py"), *ROOT.glob("lib/*.py")]):
        h.update(p.read_bytes())
    return "src-" + h.hexdigest()[:12]


def file_sha256(path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
            if limit and n >= limit:
                break
    return h.hexdigest()


def provenance(args, seed: int | None = None, **extra) -> dict:
    """What made a result: the exact command-line config, seed and code version."""
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    rec = {"config": cfg, "code_version": code_version(), "argv": sys.argv,
           "torch": torch.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    if seed is not None:
        rec["seed"] = seed
    rec.update(extra)
    return rec


# ----------------------------------------------------------------------------
# Stage scripts as modules (tests, bench scripts)

_STAGES: dict = {}


def load_stage(script: str):
    """A top-level stage script ("03_train_sae.py") as a module, loaded once per process. Its
    name starts with a digit, so `import` cannot reach it; tests and bench scripts call its
    main or its helpers in-process this way (a test that patches it uses monkeypatch)."""
    if script not in _STAGES:
        import importlib.util
        spec = importlib.util.spec_from_file_location("stage_" + Path(script).stem, ROOT / script)
        _STAGES[script] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_STAGES[script])
    return _STAGES[script]


# ----------------------------------------------------------------------------
# Devices and the torchrun idiom (nanoGPT): the same script runs as one process,
# or under `torchrun --nproc_per_node N`, gloo on CPU and nccl on GPU.

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (try cpu, cuda, cuda:0)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


class Dist:
    """rank / world_size / device of this process; world_size 1 without torchrun."""

    def __init__(self, device: str = "auto"):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if self.ddp:
            import torch.distributed as dist
            self.rank = int(os.environ["RANK"])
            self.world_size = int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            want = pick_device(device)
            if want.type == "cuda":
                self.device = torch.device(f"cuda:{self.local_rank}")
                torch.cuda.set_device(self.device)
                backend = "nccl"
            else:
                self.device = want
                backend = "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend=backend)
        else:
            self.rank, self.world_size, self.local_rank = 0, 1, 0
            self.device = pick_device(device)
        self.master = self.rank == 0

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
            t /= self.world_size
        return t

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def all_reduce_min_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def average_gradients_(self, params) -> None:
        """Data parallel: every process's gradients become their mean over processes. What
        DDP does, written out: one flat bucket, one all-reduce per step (a parameter without
        a gradient this step counts as zeros, so every process sends the same layout)."""
        if self.world_size == 1:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.all_reduce_mean_(torch.cat([p.grad.reshape(-1) for p in params]))
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()

    def broadcast_(self, tensors, src: int = 0) -> None:
        """Every process gets rank src's values (the same initial weights everywhere)."""
        if self.world_size > 1:
            import torch.distributed as dist
            for t in tensors:
                dist.broadcast(t, src)

    def barrier(self):
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.ddp:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
