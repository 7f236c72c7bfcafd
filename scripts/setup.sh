#!/usr/bin/env bash
# Create .venv (if missing) and install mea-hf with its test extras. PyTorch is pinned to the CPU build here;
# on a GPU machine install your CUDA build of torch first and this script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mea_hf, torch, transformers; print('mea-hf', mea_hf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
