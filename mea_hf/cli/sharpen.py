"""`mea sharpen`: an MEA folder in, the same model with its attention logits multiplied by a factor out, written
atomically. The last step of compress -> distill -> sharpen (docs/coherence.md, "Greedy loops"): distillation undoes
`mea compress --sharpen`, so a distilled folder is sharpened afterwards."""

from ..compress.reduce import parse_layers
from ..compress.temperature import check_sharpen, describe_sharpening, sharpen_layers
from ..hub.folders import check_model_folder, load_folder
from ..utils.atomic import check_output_dir
from .options import add_folder_output_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local MEA folder (e.g. a compressed model after `mea train`)")
    parser.add_argument(
        "--factor", type=float, required=True,
        help="multiply the attention logits by this (>1: sharper; 1.1 took the distilled SmolLM2-135M 3 -> 2 from 59 "
        "to 44 greedy loops in 98 fresh prompts, the original's 37: docs/coherence.md)",
    )  # fmt: skip
    parser.add_argument("--layers", help="layers to sharpen: '4-11', '0,3,5' or a mix; default all")
    add_folder_output_arguments(parser)


def run(args) -> int:
    from ..hub import save_folder

    config = check_model_folder(args.model, mea_only=True, what="--model")
    check_sharpen(args.factor)
    layers = None if args.layers is None else parse_layers(args.layers, config.num_hidden_layers)
    check_output_dir(args.out, args.overwrite, what="--out")
    model, tokenizer = load_folder(args.model, args.dtype)
    sharpen_layers(model, args.factor, layers)
    card = {"how_made": describe_sharpening(str(args.model), args.factor, layers),
            "base_model": getattr(model.config, "base_model_name_or_path", None)}  # fmt: skip
    save_folder(model, args.out, tokenizer, card=card, overwrite=args.overwrite)
    print(f"saved {args.model} with attention logits x{args.factor:g} to {args.out}")
    return 0
