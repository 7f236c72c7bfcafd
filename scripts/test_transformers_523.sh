#!/usr/bin/env bash
# The transformers 5.23 leg: the tests that touch generate(), caches, remote code and conversion, in .venv-tf523.
set -euo pipefail
cd "$(dirname "$0")/.."
MEA_VENV=.venv-tf523 MEA_TRANSFORMERS="5.23.*" exec bash scripts/test.sh \
    tests/model \
    tests/hub/test_model_card.py "$@"
