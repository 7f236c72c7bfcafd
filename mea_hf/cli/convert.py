"""`mea convert`: a Llama-family folder or GGUF file in, an equivalent MEA folder (with tokenizer and model card) out."""

from pathlib import Path

import torch

from ..convert import from_llama, load_tokenizer
from ..gguf import is_gguf_path
from ..hub import save_folder
from .options import add_folder_output_arguments


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="local folder or .gguf file of a Llama/Mistral/Qwen2/Qwen3 causal LM"
    )
    add_folder_output_arguments(parser, dtype_help="dtype of the saved weights (auto: the checkpoint's own)")


def run(args) -> int:
    source = Path(args.model)
    if not is_gguf_path(source) and not source.is_dir():
        raise FileNotFoundError(f"--model {source}: no such folder")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = load_tokenizer(source)
    model = from_llama(source, dtype=dtype)
    base_model = model.config.base_model_name_or_path
    how = f"Converted exactly from `{source.name}`" + (f" ({base_model})" if base_model != source.name else "")
    how += " with `mea convert`: identity head-level composition, no head norm; logits equal the original's"
    how += " (the GGUF as dequantised by transformers)." if is_gguf_path(source) else "."
    save_folder(model, args.out, tokenizer, card={"how_made": how, "base_model": base_model}, overwrite=args.overwrite)
    print(f"saved MEA model to {args.out}")
    return 0
