"""The `mea` command line. Each subcommand lives in its own module with `add_arguments(parser)` and `run(args)`;
only the module of the subcommand being run is imported."""

import argparse
import importlib
import sys

from huggingface_hub.errors import StrictDataclassError

COMMANDS = {
    "convert": ("mea_hf.cli.convert", "Convert a Llama/Mistral/Qwen2/Qwen3 folder or GGUF file to an MEA folder."),
    "compress": ("mea_hf.cli.compress", "Reduce the cached KV heads of an MEA folder (SVD or calibration)."),
    "sharpen": ("mea_hf.cli.sharpen", "Multiply an MEA folder's attention logits by a factor (fewer greedy loops)."),
    "sensitivity": ("mea_hf.cli.sensitivity", "Compress one layer at a time and measure the validation loss."),
    "train": ("mea_hf.cli.train", "Pretrain (or continue training) an MEA or Llama model with accelerate."),
    "sweep-lr": ("mea_hf.cli.sweep_lr", "Run the same short training for each (variant, learning rate) pair."),
    "eval": ("mea_hf.cli.eval", "Evaluate a folder with lm-evaluation-harness (offline tasks by default)."),
    "compare": ("mea_hf.cli.compare", "Evaluate several folders on the same tasks and write one table."),
    "serve": ("mea_hf.cli.serve", "Serve an MEA folder with an OpenAI-compatible API (transformers serve)."),
    "quickstart": ("mea_hf.cli.quickstart", "Train, compress, recover, evaluate and compare, end to end."),
}

# Errors that mean "bad input": printed as one clear line, exit status 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, StrictDataclassError)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mea", description="Multi-head Explicit Attention tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except USER_ERRORS as error:
        print(f"mea {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
