#!/usr/bin/env bash
# Set up the environment and run the test suite (offline, CPU, a few minutes on 2 cores). Arguments go to pytest.
# MEA_VENV / MEA_TRANSFORMERS choose the environment and transformers version (see setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${MEA_VENV:-.venv}/bin/python" -m pytest "$@"
