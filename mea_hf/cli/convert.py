"""`mea convert`: a Llama-family folder in, an equivalent MEA folder (with tokenizer and model card) out."""

from pathlib import Path

import torch

from ..convert import from_llama
from ..hub import save_folder


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local folder of a Llama/Mistral/Qwen2/Qwen3 causal LM")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
        help="dtype of the saved weights (auto: the checkpoint's own)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> int:
    from transformers import AutoTokenizer

    source = Path(args.model)
    if not source.is_dir():
        raise FileNotFoundError(f"--model {source}: no such folder")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = from_llama(source, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None
    how = f"Converted exactly from `{source.name}` ({model.config.base_model_name_or_path}) with `mea convert`: "
    how += "identity head-level composition, no head norm; logits equal the original's."
    save_folder(model, args.out, tokenizer, card={"how_made": how, "base_model": source.name}, overwrite=args.overwrite)
    print(f"saved MEA model to {args.out}")
    return 0
