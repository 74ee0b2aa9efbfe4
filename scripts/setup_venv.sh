#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository root and install unispeech_fast
# into it, editable. Usage: bash scripts/setup_venv.sh [EXTRAS], e.g. `bash scripts/setup_venv.sh test`.
#
# torch is installed first and the package with --no-build-isolation, so pip never fetches a second
# (possibly multi-GB CUDA) torch to build against. Set PYTHON to choose the interpreter (default python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${1:-}"

"${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install torch==2.13.0 triton numpy setuptools wheel ninja pybind11
if [[ -n "$extras" ]]; then
    .venv/bin/pip install --no-build-isolation -e ".[$extras]"
else
    .venv/bin/pip install --no-build-isolation -e .
fi
