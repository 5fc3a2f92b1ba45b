#!/usr/bin/env bash
# The sae-lens test environment .venv-saelens/ (git-ignored): the real sae-lens, for the
# round-trip tests in tests/test_interop.py, kept apart from the project's .venv (sae-lens
# pulls in transformer-lens, pandas, plotly, ... which the project itself never needs).
# Built once (~1 minute: torch is the same pinned CPU build as in .venv, linked from it);
# later calls return at once. Rebuilt from scratch when this script,
# tests/saelens-constraints.txt (the pins: sae-lens itself, torch==2.13.0 and every other
# package) or the Python version change; a build that was cut short leaves no stamp, so the
# next call starts it again.
# tests/test_interop.py runs it; by hand:
#   bash tests/setup_saelens_env.sh && .venv-saelens/bin/python -c "import sae_lens"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-saelens
CONSTRAINTS=tests/saelens-constraints.txt
want=$({ cat tests/setup_saelens_env.sh "$CONSTRAINTS"; "$PY" -c 'import sys; print(sys.version)'; } |
       sha256sum | cut -d' ' -f1)
built() { [[ -x $VENV/bin/python && "$(cat "$VENV/.setup.sha256" 2>/dev/null)" == "$want" ]]; }
built && exit 0
# One builder at a time (two test sessions may start together); the other waits, then
# finds it built.
exec 9>"$VENV.lock"
if command -v flock >/dev/null; then flock 9; fi
built && exit 0
echo "[saelens-env] building $VENV with sae-lens (once; ~1 minute)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
# Every package that the project's .venv already holds, whole, at the version pinned here
# (torch, transformers, numpy, ...: 64 of them) is hard-linked from it: the same wheel's
# files, which pip then counts as installed, so it unpacks only the rest (sae-lens,
# transformer-lens, plotly, ...). Without a .venv, for a version that differs, or where a
# file its RECORD lists is missing from .venv, pip installs the package as usual.
"$VENV/bin/python" - <<'PY'
import glob, os, re, shutil, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
pins = dict(line.strip().split("==") for line in open("tests/saelens-constraints.txt") if "==" in line
            and not line.startswith("#"))
pins = {norm(name): version for name, version in pins.items()}
rel = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
src, dst = os.path.join(".venv", rel), os.path.join(sys.prefix, rel)
linked = []
for info in glob.glob(os.path.join(src, "*.dist-info")):
    name, version = os.path.basename(info)[: -len(".dist-info")].rsplit("-", 1)
    if pins.get(norm(name)) != version.split("+")[0]:      # torch 2.13.0+cpu is the pin 2.13.0
        continue
    paths = [line.rsplit(",", 2)[0] for line in open(os.path.join(info, "RECORD"))]
    paths = [p for p in paths if p and not p.startswith("..")]   # console scripts name .venv's python
    if not all(os.path.exists(os.path.join(src, p)) or "__pycache__" in p for p in paths):
        continue                                   # not whole in .venv: pip installs it
    for path in paths:
        if not os.path.exists(os.path.join(src, path)):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, path)), exist_ok=True)
        try:
            os.link(os.path.join(src, path), os.path.join(dst, path))
        except FileExistsError:
            pass
        except OSError:                            # another file system: copy
            shutil.copy2(os.path.join(src, path), os.path.join(dst, path))
    linked.append(name)
print(f"[saelens-env] {len(linked)} pinned packages linked from .venv", file=sys.stderr)
PY
log=$VENV/pip-install.log
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" sae-lens >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" | tail -n 30 >&2
    echo "[saelens-env] pip could not install sae-lens into $VENV (full log: $log)" >&2
    exit 1
fi
"$VENV/bin/python" - <<'PY'
import sae_lens, torch
assert torch.__version__.split("+")[0] == "2.13.0", f"torch {torch.__version__}, not the pinned 2.13.0"
PY
echo "$want" > "$VENV/.setup.sha256"
