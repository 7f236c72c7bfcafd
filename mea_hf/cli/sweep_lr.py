"""`mea sweep-lr`: the same short training for each (variant, learning rate) pair (`mea_hf.training.sweep`)."""

from ..training.settings import add_setting_arguments, settings_from_args
from ..training.sweep import _PER_RUN_KEYS, LEARNING_RATES, SWEEP_DEFAULTS, VARIANTS, sweep, sweep_table


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--lrs must be comma-separated numbers, got {text!r}.") from None


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    parser.add_argument(
        "--size", default="tiny", help="model size: mea_hf/resources/models/<size>-<variant>.json (default tiny)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated (default {','.join(VARIANTS)})"
    )
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LEARNING_RATES), help="comma-separated peak LRs")
    add_setting_arguments(parser, exclude=_PER_RUN_KEYS, shown_defaults=SWEEP_DEFAULTS)


def run(args) -> int:
    base = settings_from_args(args, exclude=_PER_RUN_KEYS)
    clash = sorted(set(base) & set(_PER_RUN_KEYS) - {"tokenizer"})
    if clash:
        raise ValueError(f"the sweep sets {clash} per run; remove them from --config.")
    variants = tuple(v for v in args.variants.split(",") if v)
    results = sweep(base, args.out, size=args.size, variants=variants, lrs=_floats(args.lrs))
    print(sweep_table(results["runs"], variants, _floats(args.lrs)))
    return 0
