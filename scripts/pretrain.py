"""Pretrain an MEA or Llama model: same as `mea train` (works under `accelerate launch` / `torchrun`).

Examples:
    python scripts/pretrain.py --config configs/train/tiny-cpu.yaml --out runs/tiny
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/pretrain.py --config configs/train/125m-gpu.yaml
"""

import sys

from mea_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
