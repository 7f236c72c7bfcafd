"""`mea compress`: an MEA folder in, a folder caching fewer KV heads (SVD or calibration) out, written atomically."""

from pathlib import Path

from ..compress.reduce import (
    CALIB_BLOCKS,
    CALIB_LR,
    CALIB_QUERY_STRIDE,
    CALIB_STEP_BLOCKS,
    CALIB_STEPS,
    METHODS,
    calib_blocks_for,
    check_composition,
    describe_compression,
    parse_layers,
    reduce_kv_heads,
)
from ..compress.temperature import check_sharpen
from ..configuration_mea import COMPOSITIONS
from ..data.loading import token_blocks
from ..hub.folders import check_model_folder, load_folder
from ..utils.atomic import check_output_dir
from .options import add_folder_output_arguments

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
    parser.add_argument(
        "--composition", choices=COMPOSITIONS,
        help="HLC form: 'banded' mixes keys per RoPE pair and values by d x d maps (same cache size, lower loss); "
        "default: the model's own (scalar for converted models)",
    )  # fmt: skip
    parser.add_argument("--calib-data", default="builtin", help="'builtin', a .txt/.jsonl file or folder (train split)")
    parser.add_argument(
        "--calib-blocks", type=int, help=f"calibration blocks (calib; default by composition: {CALIB_BLOCKS})"
    )
    parser.add_argument(
        "--calib-steps", type=int,
        help=f"refinement steps per layer (calib; 0: best start only; default by composition: {CALIB_STEPS})",
    )
    parser.add_argument(
        "--calib-query-stride", type=int, default=CALIB_QUERY_STRIDE,
        help="compare outputs at every N-th position (calib; smaller: better fit, slower)",
    )  # fmt: skip
    parser.add_argument(
        "--calib-step-blocks", type=int,
        help="blocks fitted per refinement step, a group in turn (calib; more: better fit, slower; default by "
        f"composition: {CALIB_STEP_BLOCKS})",
    )  # fmt: skip
    parser.add_argument(
        "--calib-lr", type=float, default=CALIB_LR,
        help="peak refinement step size, a fraction of each tensor's RMS (calib; model-dependent)",
    )  # fmt: skip
    parser.add_argument(
        "--calib-q-scale", type=float,
        help="step size of the layer's q projection (scalar layers: and o_proj), as a fraction of the new k/v "
        "projections' (calib; default: 0.5 for layers keeping at least half their KV heads, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--sharpen", type=float, default=1.0,
        help="multiply the attention logits of the compressed layers by this (1: unchanged; 1.1 took SmolLM2-135M "
        "banded calib 3 -> 2 from 53 to 36 greedy loops in 98 fresh prompts, the original's 37: docs/coherence.md)",
    )  # fmt: skip
    parser.add_argument("--calib-block-size", type=int, default=DEFAULT_CALIB_BLOCK_SIZE, help="tokens per block")
    add_folder_output_arguments(parser)


def check_kv_heads(kv_heads: int, config) -> None:
    if not 1 <= kv_heads <= config.num_key_value_heads:
        raise ValueError(
            f"--kv-heads must be from 1 to {config.num_key_value_heads} (the model's KV heads), got {kv_heads}."
        )


def _layers_from_args(args, config) -> tuple[int, list[int] | None]:
    """(kv_heads, layers) from --kv-heads/--layers or --budget/--sensitivity, all checked against the config."""
    from ..compress.sensitivity import read_report, suggest_layers

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


def run(args) -> int:
    from ..hub import save_folder

    config = check_model_folder(args.model, mea_only=True, what="--model")
    kv_heads, layers = _layers_from_args(args, config)
    check_composition(config, args.composition)
    check_sharpen(args.sharpen)
    check_output_dir(args.out, args.overwrite, what="--out")
    model, tokenizer = load_folder(args.model, args.dtype)
    calib_blocks = None
    if args.method == "calib":
        count = calib_blocks_for(args.composition or config.composition, args.calib_blocks)
        calib_blocks = token_blocks(tokenizer, args.calib_data, "train", count, args.calib_block_size, "calibration")
    reduce_kv_heads(
        model, kv_heads, layers=layers, method=args.method, calib_blocks=calib_blocks, calib_steps=args.calib_steps,
        progress=True, composition=args.composition, calib_query_stride=args.calib_query_stride,
        calib_step_blocks=args.calib_step_blocks, calib_lr=args.calib_lr, calib_q_scale=args.calib_q_scale,
        sharpen=args.sharpen,
    )
    base_model = getattr(model.config, "base_model_name_or_path", None) or Path(args.model).resolve().name
    card = {
        "how_made": describe_compression(
            str(args.model), args.method, kv_heads, layers, model.config, args.sharpen
        ),
        "base_model": base_model,
    }
    save_folder(model, args.out, tokenizer, card=card, overwrite=args.overwrite)
    print(f"saved MEA model caching {model.config.component_heads_per_layer} KV heads per layer to {args.out}")
    return 0
