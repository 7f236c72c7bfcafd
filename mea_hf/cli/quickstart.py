"""`mea quickstart`: train, compress, recover, evaluate and compare, end to end (`mea_hf.recipes.quickstart`)."""

from pathlib import Path

from ..recipes.quickstart import Quickstart, _prepare_out


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes and few steps (CI): the same code path in < 1 min"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier quickstart in --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    out = Path(args.out)
    quickstart = Quickstart(out, "smoke" if args.smoke else "full", progress=not args.no_progress)  # checks first
    _prepare_out(out, args.overwrite)
    results = quickstart.run()
    print()
    print(results["table_markdown"])
    print(f"\nSample from {results['sample']['model']} over its {results['sample']['cache_class']}:")
    print(results["sample"]["text"])
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'} "
          f"in {results['stage_seconds']['total']:.0f} s")  # fmt: skip
    return 0
