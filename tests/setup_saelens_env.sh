#!/usr/bin/env bash
# The sae-lens test environment .venv-saelens/ (git-ignored): the real sae-lens, for the
# round-trip tests in tests/test_interop.py, kept apart from the project's .venv (sae-lens
# pulls in transformer-lens, pandas, plotly, ... which the project itself never needs).
# Built once (~2 minutes; torch is the same pinned CPU build as in .venv); later calls
# return at once. Rebuilt from scratch when this script, tests/saelens-constraints.txt (the
# pins: sae-lens itself, torch==2.13.0 and every other package) or the Python version change;
# a build that was cut short leaves no stamp, so the next call starts it again.
# tests/test_interop.py runs it; by hand:
#   bash tests/setup_saelens_env.sh && .venv-saelens/bin/python -c "import sae_lens"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-saelens
CONSTRAINTS=tests/saelens-constraints.txt
want=$({ cat tests/setup_saelens_env.sh "$CONSTRAINTS"; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
built() { [[ -x $VENV/bin/python && "$(cat "$VENV/.setup.sha256" 2>/dev/null)" == "$want" ]]; }
built && exit 0
# One builder at a time (two test sessions may start together); the other waits, then finds it built.
exec 9>"$VENV.lock"
if command -v flock >/dev/null; then flock 9; fi
built && exit 0
echo "[saelens-env] building $VENV with sae-lens (once; ~2 minutes)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
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
