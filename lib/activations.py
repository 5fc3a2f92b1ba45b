"""Activations, however they arrive: the one place stages 03, 04 and 05 open them.

Three kinds of --acts input, each with its held-out rule:

  * 02's modular-addition file (DIR/activations.safetensors or the file): `activations`
    [N, d] plus `a`, `b`, `c` and a bool `train_mask` (True = SAE-train row): held out are
    the rows whose train_mask is False;
  * a bare file holding only `activations` [N, d]: held out is a seeded 10% of the rows
    (`heldout_mask(N, split_seed)`, the same split for every SAE seed);
  * 02's language-model shard directory (manifest.json + shards): held out are whole
    contexts, chosen at extraction by `is_heldout_context` (a seeded hash of the context
    index) and recorded per context in every shard.

`open_acts(path)` checks everything (one UserError line naming the file) and returns an
`Acts`; `Acts.heldout_rows(n)` is the first n held-out rows in file order (03 evaluates on
them and 04 reports on them: the same rows); `Acts.batches(...)` gives the SAE-train rows in
seeded global batches, from memory (RowSource) or streamed through a shuffle buffer
(ShardStream), both a pure function of (seed, step). `encode_chunks` is the one chunked encode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.common import UserError, check, file_sha256, load_json, load_tensors

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------
# Held-out rules

def heldout_mask(n: int, split_seed: int = 0) -> torch.Tensor:
    """A bare activations file: held out is a seeded 10% of its n rows (at least one). [n] bool."""
    held = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))[: max(1, n // 10)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[held] = True
    return mask


def is_heldout_context(index: torch.Tensor, frac: float, seed: int = 0) -> torch.Tensor:
    """LM shards: context i is held out when a seeded multiplicative hash of i falls below frac."""
    h = ((index.to(torch.int64) + seed * 1_000_003 + 1) * 2654435761) % (1 << 32)
    h = (h ^ (h >> 16)) * 73244475 % (1 << 32)
    return (h ^ (h >> 16)) < int(frac * (1 << 32))


# ----------------------------------------------------------------------------
# Opening an input

@dataclass
class Acts:
    """An opened --acts input. kind "file": all rows in memory (`x`, `train`, `labels`);
    kind "shards": the manifest, rows read from the shards on demand."""
    kind: str
    path: Path
    d_in: int
    n_rows: int
    n_train: int
    split: str                                   # how the held-out rows were chosen, in words
    sidecar: dict                                # the file's JSON sidecar, or the manifest
    sha256_1mb: str                              # identity of the data (resume checks it)
    bytes: int
    x: torch.Tensor | None = None                # file: [N, d] float32
    train: torch.Tensor | None = None            # file: [N] bool, True = SAE-train row
    labels: dict = field(default_factory=dict)   # file: a, b, c (modular addition) when present

    @property
    def manifest(self) -> dict:
        return self.sidecar

    def heldout_rows(self, max_rows: int | None = None) -> torch.Tensor:
        """The first max_rows held-out rows, in file (shard) order. [n, d] float32."""
        if self.kind == "file":
            return self.x[~self.train][:max_rows]
        return load_heldout_rows(self.path, 1 << 62 if max_rows is None else max_rows, self.manifest)

    def train_rows(self) -> torch.Tensor:
        """Every SAE-train row (file kind only: shards are streamed by batches())."""
        check(self.kind == "file", f"--acts {self.path}: shards are streamed, not loaded whole")
        return self.x[self.train]

    def train_sample(self, max_rows: int, seed: int = 0) -> torch.Tensor:
        """Up to max_rows SAE-train rows from a seeded choice of shards (shards only)."""
        return sample_train_rows(self.path, self.manifest, max_rows, seed)

    def sample_rows(self, max_rows: int, seed: int = 0) -> torch.Tensor:
        """Up to max_rows rows, train and held-out alike: all of a file when it fits, else a
        seeded sample; from shards, the rows of a seeded choice of shards (05 compares
        dictionaries on these: no generalisation is measured there)."""
        if self.kind == "file":
            x = self.x
            if len(x) > max_rows:
                x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_rows]]
            return x
        return sample_train_rows(self.path, self.manifest, max_rows, seed, heldout_too=True)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, *, x_train=None,
                buffer_rows: int = 262144, scale: float = 1.0, device="cpu"):
        """The SAE-train rows in seeded global batches (this process's slice): RowSource over
        x_train (the file's train rows, already scaled and on device) or a ShardStream."""
        if self.kind == "file":
            return RowSource(x_train, batch_size, seed, rank, world)
        return ShardStream(self.path, self.manifest, batch_size, seed, rank, world,
                           buffer_rows=buffer_rows, scale=scale, device=device)


def open_acts(path, split_seed: int = 0) -> Acts:
    """Open and check any --acts input (see the module docstring); nothing is written."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return _open_shards(path)
    if path.is_dir():
        check((path / "activations.safetensors").is_file(),
              f"--acts {path} is a directory without activations.safetensors (or manifest.json)")
        path = path / "activations.safetensors"
    check(path.is_file(), f"--acts {path} does not exist")
    t = load_tensors(path, what="--acts")
    check("activations" in t, f"--acts {path} has no tensor named 'activations' (found: {', '.join(sorted(t)) or 'none'})")
    x = t["activations"]
    check(x.dim() == 2 and x.dtype.is_floating_point,
          f"--acts {path}: 'activations' must be a 2-D float tensor, got {x.dtype} of shape {list(x.shape)}")
    n, d = x.shape
    check(n >= 2 and d >= 1, f"--acts {path}: 'activations' has shape {list(x.shape)}; need at least 2 rows")
    x = x.float()
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        rows = bad.nonzero().squeeze(1)
        raise UserError(f"--acts {path}: {len(rows)} row(s) of 'activations' hold NaN/inf (first: row {int(rows[0])})")
    if "train_mask" in t:
        m = t["train_mask"]
        check(m.shape == (n,), f"--acts {path}: 'train_mask' has shape {list(m.shape)}, expected [{n}]")
        check(m.dtype == torch.bool or (not m.dtype.is_floating_point and bool(((m == 0) | (m == 1)).all())),
              f"--acts {path}: 'train_mask' must be bool (True = SAE-train row)")
        train, split = m.bool(), "train_mask"
    else:
        train, split = ~heldout_mask(n, split_seed), f"seeded 10% hold-out (split seed {split_seed})"
    check(int(train.sum()) > 0, f"--acts {path}: train_mask selects no rows")
    sidecar = {}
    side = path.with_suffix(".json")
    if side.is_file():
        sidecar = load_json(side, "activations sidecar")
        sidecar = sidecar if isinstance(sidecar, dict) else {}
        for key in ("d_in", "d_model"):
            v = sidecar.get(key)
            check(v is None or v == d, f"--acts {path}: mismatched d_in: {side.name} says {key}={v} "
                                       f"but 'activations' has {d} columns")
    labels = {k: t[k].long() for k in ("a", "b", "c") if k in t}
    return Acts("file", path, d, n, int(train.sum()), split, sidecar, file_sha256(path, limit=1 << 20),
                path.stat().st_size, x=x, train=train, labels=labels)


def _open_shards(path: Path) -> Acts:
    m = read_manifest(path)
    n_train = int(m["split"]["n_train_rows"])
    check(n_train >= 2, f"--acts {path}: the manifest's split has {n_train} SAE-train rows; need at least 2")
    split = f"manifest split ({m['split']['rule']}, holdout_frac {m['split']['holdout_frac']})"
    return Acts("shards", path, int(m["d_in"]), int(m["token_count"]), n_train, split, m,
                file_sha256(path / MANIFEST), sum(s["bytes"] for s in m["shards"]))


def check_width(acts: Acts, d_in: int, who: str = "the SAE") -> None:
    check(acts.d_in == d_in, f"--acts {acts.path}: activations have width {acts.d_in}, but d_in of {who} is {d_in}")


# ----------------------------------------------------------------------------
# Encoding many rows

@torch.no_grad()
def encode_chunks(sae, x: torch.Tensor, chunk: int = 4096):
    """Yield (rows, code, reconstruction) chunk by chunk, inference semantics (the SAE in eval
    mode: BatchTopK uses its threshold): memory stays at one chunk's [chunk, d_sae] code."""
    was = sae.training
    sae.eval()
    try:
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            f = sae.encode(xb)
            yield xb, f, sae.decode(f)
    finally:
        sae.train(was)


def encode_all(sae, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [N, d_sae] and reconstructions [N, d_in] of every row of x, chunked."""
    fs, xh = [], []
    for _, f, r in encode_chunks(sae, x, chunk):
        fs.append(f)
        xh.append(r)
    if not fs:
        return x.new_zeros(0, sae.d_sae), x.new_zeros(0, sae.d_in)
    return torch.cat(fs), torch.cat(xh)


# ----------------------------------------------------------------------------
# Batches of SAE-train rows

class RowSource:
    """The SAE-train rows, in memory. batch(step) is a pure function of (seed, step):
    a fresh seeded permutation per pass, cut into global batches, each process taking
    its slice. So a resumed run, or N processes, see exactly the rows one uninterrupted
    process would; the data position is just the step."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.x, self.B, self.seed, self.rank, self.world = x, batch_size, seed, rank, world
        self.per_epoch = len(x) // batch_size
        self.local = batch_size // world
        self._epoch, self._perm = -1, None
        self._buf = torch.empty(self.local, x.shape[1], dtype=x.dtype, device=x.device)

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            self._epoch, self._perm = epoch, torch.randperm(len(self.x), generator=g).to(self.x.device)
        lo = i * self.B + self.rank * self.local
        return torch.index_select(self.x, 0, self._perm[lo:lo + self.local], out=self._buf)

    def state(self) -> dict:
        return {"kind": "memory-rows", "rows": len(self.x), "batches_per_pass": self.per_epoch}


class ShardStream:
    """The SAE-train rows of an LM shard directory, read a window of shards at a time through a
    shuffle buffer of about `buffer_rows` rows, so memory is bounded by the buffer, not the data
    set. batch(step) is a pure function of (seed, step): pass e visits the shards in a seeded
    order, in windows of W shards; the window's train rows are shuffled with a seed of (pass,
    window) and cut into global batches (the last partial batch of a window is dropped); each
    process takes its slice. A resumed run reloads only the window it is in."""

    def __init__(self, acts_dir, manifest: dict, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 buffer_rows: int = 262144, scale: float = 1.0, device="cpu"):
        self.dir, self.m, self.B, self.seed = Path(acts_dir), manifest, batch_size, seed
        self.rank, self.world, self.local, self.scale, self.device = rank, world, batch_size // world, scale, device
        self.train_rows = [s["train_rows"] for s in manifest["shards"]]
        self.S = len(self.train_rows)
        mean_rows = max(1, sum(self.train_rows) // max(1, self.S))
        self.W = max(1, min(self.S, math.ceil(max(buffer_rows, 2 * batch_size) / mean_rows)))
        self._plans: dict[int, list] = {}
        self._win, self._x, self._perm = None, None, None
        for _ in range(3):                                   # pathological shard sizes: widen the window
            if self.steps_in_pass(0) > 0:
                break
            self.W, self._plans = self.S, {}
        check(self.steps_in_pass(0) > 0, f"--batch-size {batch_size} exceeds the SAE-train rows of {acts_dir}")

    def _plan(self, epoch: int) -> list:
        """[(shard ids, rows, batches)] for each window of pass `epoch`."""
        if epoch not in self._plans:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
            order = torch.randperm(self.S, generator=g).tolist()
            plan = []
            for w in range(0, self.S, self.W):
                ids = order[w: w + self.W]
                rows = sum(self.train_rows[i] for i in ids)
                plan.append((ids, rows, rows // self.B))
            self._plans = {epoch: plan}                      # only the current pass is kept
        return self._plans[epoch]

    def steps_in_pass(self, epoch: int) -> int:
        return sum(p[2] for p in self._plan(epoch))

    def _locate(self, step: int) -> tuple[int, int, int]:
        e = 0
        while True:                                          # passes differ only by window sizes
            n = self.steps_in_pass(e)
            if step < n:
                break
            step -= n
            e += 1
        for w, (_, _, nb) in enumerate(self._plan(e)):
            if step < nb:
                return e, w, step
            step -= nb
        raise AssertionError

    def _load_window(self, e: int, w: int):
        ids, rows, _ = self._plan(e)[w]
        xs = []
        for i in ids:
            t = load_shard(self.dir, self.m, i)
            xs.append(t["activations"][~t["row_heldout"]])
            del t
        x = torch.cat(xs).to(self.device, torch.float32)
        if self.scale != 1.0:
            x.mul_(self.scale)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + e * 7919 + w + 1) % (2 ** 63))
        self._perm = torch.randperm(len(x), generator=g).to(self.device)
        self._x, self._win = x, (e, w)

    def batch(self, step: int) -> torch.Tensor:
        e, w, i = self._locate(step)
        if self._win != (e, w):
            self._x = None                                    # free the old window first
            self._load_window(e, w)
        lo = i * self.B + self.rank * self.local
        return self._x[self._perm[lo: lo + self.local]]

    def state(self) -> dict:
        return {"kind": "shard-stream", "shards": self.S, "window_shards": self.W,
                "train_rows": sum(self.train_rows), "batches_first_pass": self.steps_in_pass(0)}


# ----------------------------------------------------------------------------
# Reading LM shards (02_extract_activations.py --model writes them)

def read_tensors(path, names) -> dict:
    """Only the named tensors of a safetensors file (no pickle)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in names}
    except Exception as e:
        raise UserError(f"shard {path} is not readable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")


def read_manifest(acts_dir) -> dict:
    acts_dir = Path(acts_dir)
    m = load_json(acts_dir / MANIFEST, "manifest")
    check(isinstance(m, dict) and isinstance(m.get("shards"), list) and "d_in" in m,
          f"{acts_dir / MANIFEST} is not an activations manifest written by 02_extract_activations.py --model")
    missing = [s["file"] for s in m["shards"] if not (acts_dir / s["file"]).is_file()]
    check(not missing, f"{acts_dir}: {len(missing)} of the {len(m['shards'])} shards in {MANIFEST} are missing "
                       f"(first: {missing[0] if missing else ''}); re-run the extraction with --resume")
    check(len(m["shards"]) > 0, f"{acts_dir / MANIFEST} lists no shards")
    return m


def load_shard(acts_dir, manifest: dict, i: int) -> dict:
    """Shard i: activations (as stored), tokens, context_index, heldout, and a per-row
    bool `row_heldout`."""
    s = manifest["shards"][i]
    t = load_tensors(Path(acts_dir) / s["file"], what="shard")
    check(t["activations"].shape == (s["rows"], manifest["d_in"]),
          f"{acts_dir}/{s['file']}: shape {list(t['activations'].shape)} does not match the manifest")
    t["row_heldout"] = t["heldout"].repeat_interleave(manifest["positions_per_context"])
    return t


def load_heldout_rows(acts_dir, max_rows, manifest: dict | None = None) -> torch.Tensor:
    """The held-out rows [N, d_in] float32 (N <= max_rows), in shard order."""
    m = manifest or read_manifest(acts_dir)
    got, n = [], 0
    for i, s in enumerate(m["shards"]):
        if n >= max_rows:
            break
        if not s["heldout_rows"]:
            continue
        t = load_shard(acts_dir, m, i)
        x = t["activations"][t["row_heldout"]][: max_rows - n].float()
        got.append(x)
        n += len(x)
    if not got:
        return torch.zeros(0, m["d_in"])
    return torch.cat(got)


def heldout_contexts(acts_dir, max_contexts, manifest=None) -> torch.Tensor:
    """Token ids [n, ctx_len] of the first max_contexts held-out contexts (downstream loss)."""
    m = manifest or read_manifest(acts_dir)
    got, n = [], 0
    for i, s in enumerate(m["shards"]):
        if n >= max_contexts:
            break
        if not s["heldout_contexts"]:
            continue
        t = read_tensors(Path(acts_dir) / s["file"], ("tokens", "heldout"))
        c = t["tokens"][t["heldout"]][: max_contexts - n].long()
        got.append(c)
        n += len(c)
    check(bool(got), f"{acts_dir}: no held-out contexts (extract with a larger --holdout-frac or more text)")
    return torch.cat(got)


def sample_train_rows(acts_dir, manifest: dict, max_rows: int, seed: int = 0, heldout_too: bool = False) -> torch.Tensor:
    """Up to max_rows SAE-train rows (all rows with heldout_too) from a seeded choice of shards."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(manifest["shards"]), generator=g).tolist()
    got, n = [], 0
    for i in order:
        if n >= max_rows:
            break
        t = load_shard(acts_dir, manifest, i)
        x = (t["activations"] if heldout_too else t["activations"][~t["row_heldout"]]).float()
        x = x[torch.randperm(len(x), generator=g)[: max_rows - n]]
        got.append(x)
        n += len(x)
    return torch.cat(got)
