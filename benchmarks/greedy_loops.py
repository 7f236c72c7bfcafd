"""How often saved models' greedy text loops: bench_real's four prompts and twelve more, everyday English.

For each model folder: the greedy continuation of every prompt, whether it is still looping when it stops (its last
8 tokens occurred earlier in it, `mea_hf.evaluation.repetition.ends_in_loop`) and its share of repeated 4-grams.
Four prompts are too few to tell a compressed model from its original (two loops more or less move the mean share by
a lot); sixteen, 64 new tokens each, say more, still about one minute per 135M model on 2 CPU cores.
`--news-openings N` adds the first words of N held-out news articles (the Lee corpus's 50 validation articles, never
trained or calibrated on) as a second, larger set of prompts in another register. Two more sets check models or
settings that were chosen on those: `--fresh-everyday` (48 everyday prompts written after the choices) and
`--news-middles N` (16 words from the sentence start nearest each article's middle). Every model after the first is
compared with the first (the reference, usually the original) prompt by prompt: how many prompts loop only in it,
only in the reference, and the exact McNemar p-value of that difference. Writes results.json (with every
continuation), results.md and loops.png.

    python benchmarks/greedy_loops.py --out runs/greedy_loops runs/s21/broad/converted runs/s21/broad/distill-2/final
"""

import argparse
import sys
from pathlib import Path

from bench_real import PROMPTS, greedy_continuation
from tqdm.auto import tqdm

from mea_hf.data.news import lee_news, mid_article_opening
from mea_hf.evaluation.paired import discordant_pairs, mcnemar_exact_p
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
# Written after every factor and setting in the README had been chosen: a check on choices made with the sixteen
# above, in the register where the original model seldom loops (`--fresh-everyday`).
FRESH_EVERYDAY = (
    "The easiest way to keep houseplants alive is",
    "When I moved to a new city, the hardest part was",
    "A balanced breakfast usually includes",
    "The library in our town opens at nine, and",
    "Before you go hiking in the mountains, make sure",
    "The invention of the printing press changed",
    "My grandmother always told me that",
    "To make a cup of tea, first",
    "The main reasons people adopt dogs are",
    "Our team lost the final match because",
    "The museum's new exhibition shows",
    "Learning to play the piano as an adult",
    "The city council voted on Tuesday to",
    "Honey bees are important to farmers because",
    "During the winter, many birds",
    "A good manager listens to",
    "The old lighthouse on the hill was built",
    "If you want to save money on groceries,",
    "The Amazon rainforest is home to",
    "Thank you for your email. Unfortunately,",
    "The train was delayed for two hours, so",
    "Children learn to read by",
    "The recipe calls for three eggs, a cup of flour and",
    "After the storm, the streets of the village",
    "Mount Everest is the highest mountain in the world, and",
    "The key to a successful job interview is",
    "Last weekend we visited the zoo, where",
    "Electric cars are becoming more popular because",
    "The moon affects the tides on Earth by",
    "In the nineteenth century, most people travelled",
    "Ancient Egyptians built the pyramids to",
    "Good afternoon, everyone. Today I want to talk about",
    "The doctor advised him to",
    "Coffee was first discovered in",
    "A healthy lawn needs",
    "The bakery on the corner sells",
    "Our neighbours are planning a street party, and",
    "The Olympic Games are held every four years in",
    "The most common mistake new drivers make is",
    "She opened the letter and read",
    "Recycling plastic bottles helps the environment because",
    "The company announced that its profits",
    "Earthquakes happen when",
    "To stay focused while studying, try",
    "The ship left the harbour at dawn and",
    "Water boils at a lower temperature in the mountains because",
    "The festival of lights is celebrated",
    "When choosing a laptop for university, students should",
)
OPENING_WORDS = 16  # a news prompt: the article's first words (whitespace-split, so the same for every tokenizer)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="saved model folders (MEA or Llama, with their tokenizer)")
    parser.add_argument("--out", default="runs/greedy_loops")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--news-openings", type=int, default=0, help="N held-out news openings (<= 50)")
    parser.add_argument("--fresh-everyday", action="store_true", help=f"{len(FRESH_EVERYDAY)} more everyday prompts")
    parser.add_argument("--news-middles", type=int, default=0, help="N held-out news articles' middles (<= 50)")
    args = parser.parse_args(argv)
    missing = [folder for folder in args.folders if not (Path(folder) / "config.json").is_file()]
    if missing:
        parser.error(f"not saved model folders (no config.json): {', '.join(missing)}")
    if args.new_tokens < 16:
        parser.error(f"--new-tokens must be at least 16 (an 8-token loop test needs room), got {args.new_tokens}")
    for flag, count in (("--news-openings", args.news_openings), ("--news-middles", args.news_middles)):
        if not 0 <= count <= 50:
            parser.error(f"{flag} must be 0 to 50 (the held-out articles), got {count}")
    return args


def prompt_sets(news_openings: int, news_middles: int = 0, fresh_everyday: bool = False) -> dict[str, tuple[str, ...]]:
    """{set name: prompts}: the everyday ones (bench_real's four first), then the fresh everyday ones, the held-out
    news openings and middles, each if asked for."""
    sets = {"everyday": PROMPTS + MORE_PROMPTS}
    if fresh_everyday:
        sets["fresh everyday"] = FRESH_EVERYDAY
    articles = lee_news()["validation"] if news_openings or news_middles else []
    if news_openings:
        sets["news"] = tuple(" ".join(article.split()[:OPENING_WORDS]) for article in articles[:news_openings])
    if news_middles:
        sets["news middles"] = tuple(mid_article_opening(article, OPENING_WORDS) for article in articles[:news_middles])
    return sets


def measure(folder: str, sets: dict[str, tuple[str, ...]], new_tokens: int, progress) -> dict:
    """Every prompt's greedy continuation in `folder`'s model, whether it ends in a loop, its repeated 4-grams; loops
    counted per prompt set."""
    model, tokenizer = load_folder(folder, "float32")
    samples = []
    for name, prompts in sets.items():
        for prompt in prompts:
            tokens = greedy_continuation(model, tokenizer, prompt, new_tokens)
            samples.append({"set": name, "prompt": prompt, "text": tokenizer.decode(tokens, skip_special_tokens=True),
                            "loops": ends_in_loop(tokens), "repeated_4grams": repeated_ngram_fraction(tokens)})  # fmt: skip
            progress.update()
    return {
        "loops": {name: sum(sample["loops"] for sample in samples if sample["set"] == name) for name in sets},
        "loops_first_four": sum(sample["loops"] for sample in samples[: len(PROMPTS)]),
        "repeated_4grams": sum(sample["repeated_4grams"] for sample in samples) / len(samples),
        "samples": samples,
    }


SET_LABELS = {"news": "news openings"}  # table headers; every other set is named by its key


def against_reference(samples: list[dict], reference: list[dict]) -> dict:
    """Prompt-by-prompt loops against the reference model's on the same prompts: {"only_here", "only_first", "p"}."""
    here, first = [sample["loops"] for sample in samples], [sample["loops"] for sample in reference]
    only_here, only_first = discordant_pairs(here, first)
    return {"only_here": only_here, "only_first": only_first, "p": mcnemar_exact_p(only_here, only_first)}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    sets = prompt_sets(args.news_openings, args.news_middles, args.fresh_everyday)
    sizes = {name: len(prompts) for name, prompts in sets.items()}
    results = {"machine": machine_info(), "new_tokens": args.new_tokens, "prompts": sizes}
    with tqdm(total=len(args.folders) * sum(sizes.values()), desc="greedy samples") as progress:
        results["models"] = {folder: measure(folder, sets, args.new_tokens, progress) for folder in args.folders}
    reference = results["models"][args.folders[0]]
    for r in results["models"].values():
        r["against_first"] = against_reference(r["samples"], reference["samples"])
    header = ["model", f"ends in a loop, of {sizes['everyday']} everyday", "of bench_real's four"]
    header += [f"of {sizes[name]} {SET_LABELS.get(name, name)}" for name in sets if name != "everyday"]
    header += ["repeated 4-grams, all", f"loops only here / only in the first, all {sum(sizes.values())}", "McNemar p"]
    rows = []
    for folder, r in results["models"].items():
        row = [folder, str(r["loops"]["everyday"]), str(r["loops_first_four"])]
        row += [str(r["loops"][name]) for name in sets if name != "everyday"]
        paired = r["against_first"]
        row += [f"{r['repeated_4grams']:.2f}", f"{paired['only_here']} / {paired['only_first']}", f"{paired['p']:.3g}"]
        rows.append(row)
    table = markdown_table(header, rows)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    figure, axis = plots.plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    names = [Path(folder).parent.name if Path(folder).name == "final" else Path(folder).name for folder in args.folders]
    positions = range(len(names))
    width = 0.8 / len(sets)
    for offset, name in enumerate(sets):
        shares = [r["loops"][name] / sizes[name] for r in results["models"].values()]
        axis.bar([x + offset * width for x in positions], shares, width, label=f"{name} ({sizes[name]} prompts)")
    axis.set_xticks([x + width * (len(sets) - 1) / 2 for x in positions], names, rotation=45, ha="right")
    axis.set_ylabel("share of greedy samples ending in a loop")
    axis.legend()
    plots.save_figure(figure, out / "loops.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
