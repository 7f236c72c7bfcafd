"""`mea compress`: an MEA folder in, a folder caching fewer KV heads (SVD or calibration) out, written atomically."""

from pathlib import Path

import torch

from .compress import CALIB_STEPS, METHODS, parse_layers, reduce_kv_heads
from .convert import SUPPORTED_MODEL_TYPES

DEFAULT_CALIB_BLOCKS = 16
DEFAULT_CALIB_BLOCK_SIZE = 256


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", required=True, help="local MEA folder (convert Llama-family folders with `mea convert`)"
    )
    parser.add_argument(
        "--kv-heads", type=int, help="cached component heads h' per compressed layer (1..num_key_value_heads)"
    )
    parser.add_argument("--layers", help="layers to compress: '4-11', '0,3,5' or a mix; default all (or --budget)")
    parser.add_argument("--budget", type=float, help="target KV cache fraction (e.g. 0.75); layers from --sensitivity")
    parser.add_argument("--sensitivity", help="sensitivity.json written by `mea sensitivity` (or its folder)")
    parser.add_argument(
        "--method", choices=METHODS, default="svd", help="svd: data-free (paper); calib: uses --calib-data"
    )
    parser.add_argument("--calib-data", default="builtin", help="'builtin', a .txt/.jsonl file or folder (train split)")
    parser.add_argument("--calib-blocks", type=int, default=DEFAULT_CALIB_BLOCKS, help="calibration blocks (calib)")
    parser.add_argument(
        "--calib-steps", type=int, default=CALIB_STEPS, help="refinement steps per layer (calib; 0: best start only)"
    )
    parser.add_argument("--calib-block-size", type=int, default=DEFAULT_CALIB_BLOCK_SIZE, help="tokens per block")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def check_mea_folder(path):
    """The config of an MEA model folder; a clear error for a missing folder or another model type."""
    from transformers import AutoConfig

    import mea_hf  # noqa: F401  (registers model_type "mea")

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {folder} has no config.json: not a saved model folder.")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "mea":
        return config
    hint = (
        " Run `mea convert --model FOLDER --out MEA_FOLDER` first."
        if config.model_type in SUPPORTED_MODEL_TYPES
        else ""
    )
    raise ValueError(f"--model {folder} is a {config.model_type!r} model, not an MEA model.{hint}")


def check_output(path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder before any slow work (atomic_dir checks again when saving)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite to replace it).")


def check_kv_heads(kv_heads: int, config) -> None:
    if not 1 <= kv_heads <= config.num_key_value_heads:
        raise ValueError(
            f"--kv-heads must be from 1 to {config.num_key_value_heads} (the model's KV heads), got {kv_heads}."
        )


def load_model_and_tokenizer(path, dtype: str = "auto"):
    """MEAForCausalLM and its tokenizer (None when the folder has none) from a checked MEA folder."""
    from transformers import AutoTokenizer

    from .modeling_mea import MEAForCausalLM

    model = MEAForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def token_blocks(tokenizer, source: str, split: str, num_blocks: int, block_size: int, what: str) -> torch.Tensor:
    """Up to `num_blocks` packed blocks of `split` of `source` (via mea_hf.data), for calibration or validation."""
    from .data import load_text, pack_blocks

    if tokenizer is None:
        raise ValueError(f"the model folder has no tokenizer, which {what} needs.")
    if num_blocks < 1 or block_size < 2:
        raise ValueError(f"{what} needs at least 1 block of at least 2 tokens, got {num_blocks} x {block_size}.")
    return pack_blocks(tokenizer, load_text(source, split), block_size, max_blocks=num_blocks)


def _layers_from_args(args, config) -> tuple[int, list[int] | None]:
    """(kv_heads, layers) from --kv-heads/--layers or --budget/--sensitivity, all checked against the config."""
    from .sensitivity import read_report, suggest_layers

    if args.budget is not None or args.sensitivity is not None:
        if args.budget is None or args.sensitivity is None:
            raise ValueError(
                "--budget and --sensitivity go together (the budget picks layers from the sensitivity file)."
            )
        if args.layers is not None:
            raise ValueError("give either --layers or --budget/--sensitivity, not both.")
        report = read_report(args.sensitivity)
        if args.kv_heads is not None and args.kv_heads != report["kv_heads"]:
            raise ValueError(
                f"--kv-heads {args.kv_heads} differs from the sensitivity file's kv_heads {report['kv_heads']}."
            )
        check_kv_heads(report["kv_heads"], config)
        return report["kv_heads"], suggest_layers(report, args.budget, config)
    if args.kv_heads is None:
        raise ValueError("--kv-heads is required (or --budget with --sensitivity).")
    check_kv_heads(args.kv_heads, config)
    layers = None if args.layers is None else parse_layers(args.layers, config.num_hidden_layers)
    return args.kv_heads, layers


def describe(source_name: str, method: str, kv_heads: int, layers, config) -> str:
    """Model-card provenance line of a compressed folder."""
    from .memory import kv_fraction

    where = "all layers" if layers is None else f"layers {', '.join(map(str, layers))}"
    how = (
        f"Compressed from `{source_name}` with `mea compress --method {method}`: {where} reduced to {kv_heads} cached "
    )
    how += f"KV component heads (of {config.num_key_value_heads}); the KV cache is {100 * kv_fraction(config):.1f}% of "
    how += "the uncompressed model's. Continue training (`mea train --init-from FOLDER`) to recover the loss."
    return how


def run(args) -> int:
    from .hub import save_folder

    config = check_mea_folder(args.model)
    kv_heads, layers = _layers_from_args(args, config)
    check_output(args.out, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    calib_blocks = None
    if args.method == "calib":
        calib_blocks = token_blocks(
            tokenizer, args.calib_data, "train", args.calib_blocks, args.calib_block_size, "calibration"
        )
    reduce_kv_heads(
        model, kv_heads, layers=layers, method=args.method, calib_blocks=calib_blocks, calib_steps=args.calib_steps
    )
    base_model = getattr(model.config, "base_model_name_or_path", None) or Path(args.model).resolve().name
    card = {
        "how_made": describe(str(args.model), args.method, kv_heads, layers, model.config),
        "base_model": base_model,
    }
    save_folder(model, args.out, tokenizer, card=card, overwrite=args.overwrite)
    print(f"saved MEA model caching {model.config.component_heads_per_layer} KV heads per layer to {args.out}")
    return 0
