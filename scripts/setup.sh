#!/usr/bin/env bash
# Create the virtual environment (if missing) and install mea-hf with its test extras. PyTorch is pinned to the CPU
# build here; on a GPU machine install your CUDA build of torch first and this script leaves it alone.
#   MEA_VENV          where the environment lives (default .venv)
#   MEA_TRANSFORMERS  a transformers version spec to install, e.g. "5.23.*" (default: the newest supported release)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEA_VENV:-.venv}"
pip_install() { "$venv/bin/python" -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip_install --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
pip_install -e ".[test]"
if [ -n "${MEA_TRANSFORMERS:-}" ]; then
    pip_install "transformers==${MEA_TRANSFORMERS}"
else
    pip_install --upgrade "transformers>=5.23,<5.25"
fi
"$venv/bin/python" -c "import mea_hf, torch, transformers; print('mea-hf', mea_hf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
