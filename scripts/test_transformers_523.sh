#!/usr/bin/env bash
# The transformers 5.23 leg: the tests that touch generate(), caches, remote code and conversion, in .venv-tf523.
set -euo pipefail
cd "$(dirname "$0")/.."
MEA_VENV=.venv-tf523 MEA_TRANSFORMERS="5.23.*" exec bash scripts/test.sh \
    tests/test_transformers_versions.py tests/test_generate.py tests/test_cache.py tests/test_remote_code.py \
    tests/test_convert.py tests/test_convert_gguf.py tests/test_memory.py tests/test_model_card.py "$@"
