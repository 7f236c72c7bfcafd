"""`mea sensitivity`: compress one layer at a time, measure the validation loss, write a report and suggest layers for
a KV budget (the library side is `mea_hf.compress.sensitivity`)."""

import math
from pathlib import Path

from ..compress.reduce import CALIB_BLOCKS, METHODS, calib_blocks_for
from ..compress.sensitivity import (
    PLOT_NAME,
    REPORT_NAME,
    kv_fraction_after,
    layer_sensitivity,
    plot_report,
    suggest_layers,
)
from ..data.loading import token_blocks
from ..hub.folders import check_model_folder, load_folder
from ..utils.atomic import atomic_dir, atomic_write_json, check_output_dir
from .compress import DEFAULT_CALIB_BLOCK_SIZE, check_kv_heads


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local MEA folder")
    parser.add_argument("--kv-heads", type=int, help="h' each layer is compressed to (default: half the KV heads)")
    parser.add_argument("--method", choices=METHODS, default="svd")
    parser.add_argument("--data", default="builtin", help="'builtin' or a .txt/.jsonl file/folder (validation split)")
    parser.add_argument("--val-blocks", type=int, default=16, help="held-out blocks the loss is measured on")
    parser.add_argument("--block-size", type=int, default=DEFAULT_CALIB_BLOCK_SIZE)
    parser.add_argument(
        "--calib-blocks", type=int, help=f"train-split blocks (calib; default by the model's composition: {CALIB_BLOCKS})"
    )
    parser.add_argument("--budget", type=float, default=0.75, help="KV fraction the suggested layer set reaches")
    parser.add_argument("--out", required=True, help="output folder for sensitivity.json and sensitivity.png")
    parser.add_argument("--overwrite", action="store_true")


def run(args) -> int:
    config = check_model_folder(args.model, mea_only=True, what="--model")
    kv_heads = config.num_key_value_heads // 2 if args.kv_heads is None else args.kv_heads
    check_kv_heads(kv_heads, config)
    if not 0 < args.budget <= 1 or not math.isfinite(args.budget):
        raise ValueError(f"--budget must be a KV fraction in (0, 1], got {args.budget}.")
    check_output_dir(args.out, args.overwrite, what="--out")
    model, tokenizer = load_folder(args.model)
    val_blocks = token_blocks(tokenizer, args.data, "validation", args.val_blocks, args.block_size, "validation")
    calib_blocks = None
    if args.method == "calib":
        count = calib_blocks_for(config.composition, args.calib_blocks)
        calib_blocks = token_blocks(tokenizer, args.data, "train", count, args.block_size, "calibration")
    report = {"model": str(args.model), **layer_sensitivity(model, kv_heads, val_blocks, args.method, calib_blocks)}
    report["budget"] = args.budget
    report["suggested_layers"] = suggest_layers(report, args.budget)
    report["suggested_kv_fraction"] = kv_fraction_after(report, report["suggested_layers"])
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        atomic_write_json(Path(tmp) / REPORT_NAME, report)
        plot_report(report, Path(tmp) / PLOT_NAME)
    print(f"baseline loss {report['baseline_loss']:.4f}; per-layer increase:")
    for entry in report["layers"]:
        print(f"  layer {entry['layer']:3d}: {entry['delta']:+.4f}")
    print(f"suggested layers for KV budget {args.budget}: {report['suggested_layers']} "
          f"(KV fraction {report['suggested_kv_fraction']:.3f}); wrote {args.out}/{REPORT_NAME}")  # fmt: skip
    return 0
