"""How often saved models' greedy text loops: bench_real's four prompts and twelve more, everyday English.

For each model folder: the greedy continuation of every prompt, whether it is still looping when it stops (its last
8 tokens occurred earlier in it, `mea_hf.evaluation.repetition.ends_in_loop`) and its share of repeated 4-grams.
Four prompts are too few to tell a compressed model from its original (two loops more or less move the mean share by
a lot); sixteen, 64 new tokens each, say more, still about one minute per 135M model on 2 CPU cores. Writes
results.json (with every continuation), results.md and loops.png.

    python benchmarks/greedy_loops.py --out runs/greedy_loops runs/s21/broad/converted runs/s21/broad/distill-2/final
"""

import argparse
import sys
from pathlib import Path

from bench_real import PROMPTS, greedy_continuation
from tqdm.auto import tqdm

from mea_hf.evaluation.repetition import ends_in_loop, repeated_ngram_fraction
from mea_hf.hub.folders import load_folder
from mea_hf.utils import plots
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.tables import markdown_table

MORE_PROMPTS = (
    "The best way to learn a new language is",
    "My favourite recipe for a rainy day is",
    "The history of the Roman Empire began",
    "To fix a flat tyre on a bicycle, you",
    "The human heart has four chambers:",
    "A good night's sleep is important because",
    "The first step in writing a research paper is",
    "Volcanoes form when",
    "In the summer of 1969, astronauts",
    "The difference between weather and climate is",
    "Dear hiring manager, I am writing to apply for",
    "The most popular sports in the world are",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="saved model folders (MEA or Llama, with their tokenizer)")
    parser.add_argument("--out", default="runs/greedy_loops")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    missing = [folder for folder in args.folders if not (Path(folder) / "config.json").is_file()]
    if missing:
        parser.error(f"not saved model folders (no config.json): {', '.join(missing)}")
    if args.new_tokens < 16:
        parser.error(f"--new-tokens must be at least 16 (an 8-token loop test needs room), got {args.new_tokens}")
    return args


def measure(folder: str, new_tokens: int, progress) -> dict:
    """Every prompt's greedy continuation in `folder`'s model, whether it ends in a loop, its repeated 4-grams."""
    model, tokenizer = load_folder(folder, "float32")
    samples = []
    for prompt in PROMPTS + MORE_PROMPTS:
        tokens = greedy_continuation(model, tokenizer, prompt, new_tokens)
        samples.append({"prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "loops": ends_in_loop(tokens), "repeated_4grams": repeated_ngram_fraction(tokens)})  # fmt: skip
        progress.update()
    return {
        "loops": sum(sample["loops"] for sample in samples),
        "loops_first_four": sum(sample["loops"] for sample in samples[: len(PROMPTS)]),
        "repeated_4grams": sum(sample["repeated_4grams"] for sample in samples) / len(samples),
        "samples": samples,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    results = {"machine": machine_info(), "new_tokens": args.new_tokens, "prompts": len(PROMPTS + MORE_PROMPTS)}
    with tqdm(total=len(args.folders) * results["prompts"], desc="greedy samples") as progress:
        results["models"] = {folder: measure(folder, args.new_tokens, progress) for folder in args.folders}
    rows = [[folder, f"{r['loops']} / {results['prompts']}", f"{r['loops_first_four']} / {len(PROMPTS)}",
             f"{r['repeated_4grams']:.2f}"] for folder, r in results["models"].items()]  # fmt: skip
    table = markdown_table(["model", "ends in a loop", "of bench_real's four", "repeated 4-grams"], rows)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    figure, axis = plots.plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    names = [Path(folder).parent.name if Path(folder).name == "final" else Path(folder).name for folder in args.folders]
    axis.bar(names, [r["loops"] for r in results["models"].values()])
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_ylabel(f"greedy samples ending in a loop (of {results['prompts']})")
    plots.save_figure(figure, out / "loops.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
