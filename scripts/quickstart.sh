#!/usr/bin/env bash
# The main job in one command, on a fresh machine: set up .venv, then train a small MEA model and its Llama twin on
# the built-in corpus, compress the MEA KV cache to 50%, recover, evaluate all with lm-eval, generate a sample over
# the compressed cache and print the comparison table (outputs in runs/quickstart/). Offline; CPU is enough.
# Extra arguments go to `mea quickstart` (e.g. --smoke, --out DIR, --overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mea quickstart "$@"
