"""Is compression's extra looping more than its bits/byte cost explains? Controls for `greedy_loops.py`.

From a converted MEA folder of SmolLM2-135M-Instruct (`bench_real.py` writes one), two kinds of model, each saved,
its bits/byte measured as `bench_real.py` does (32 held-out blocks of pydoc topics and of news) and its greedy loops
counted as `greedy_loops.py` does (16 everyday prompts and the 50 held-out news openings):
- banded calib 3 -> `--kv-heads` on only part of the layers (`--layer-sets`, e.g. the first and the last half), with
  bench_real's calibration text (240 blocks of pydoc + news) and settings: does a milder compression loop less?
- banded calib 3 -> `--kv-heads` on every layer with only N refinement steps per layer (`--calib-steps`; 0: calib's
  start alone, heads mixed by PCA/svd with no output fitting): does the mixing loop, or the fitting?
- banded calib 3 -> `--kv-heads` on every layer with a share of the calibration blocks made to repeat themselves
  (`--calib-repeats F ...`: the first half of every 1/F-th block, twice): the calibration text rarely repeats, so
  nothing holds the fit to the original's copying where greedy loops begin; does fitting on repeats loop less?
- banded calib 3 -> `--kv-heads` on every layer, then the compressed layers' attention logits multiplied by F
  (`--sharpen F ...`, `reduce_kv_heads(sharpen=F)`): the fit leaves attention softer; does sharper attention loop less?
- the converted model with seeded Gaussian noise on every weight matrix but the embeddings, sigma = r x the matrix's
  RMS (`--noise`): a perturbation that costs the same bits/byte without touching the attention's structure.
Writes results.json, results.md and controls.png. About 3 minutes per model on 2 CPU cores, plus 2-3 per calib.

    python benchmarks/loop_controls.py --model runs/s21/broad/converted --out runs/loop_controls
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_real import alternating_blocks, bits_per_byte, text_sources
from greedy_loops import measure, prompt_sets
from tqdm.auto import tqdm

from mea_hf.compress import CALIB_LR, CALIB_QUERY_STRIDE, parse_layers
from mea_hf.data.loading import pack_blocks
from mea_hf.hub import save_folder
from mea_hf.hub.folders import load_folder
from mea_hf.memory import kv_fraction
from mea_hf.recipes import pipeline
from mea_hf.utils import plots
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.tables import markdown_table

BLOCK_SIZE, CALIB_BLOCK_COUNT, EVAL_BLOCKS = 256, 240, 32  # bench_real's s21 "broad" run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a converted MEA folder of SmolLM2-135M-Instruct")
    parser.add_argument("--out", default="runs/loop_controls")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument(
        "--layer-sets", nargs="*", default=["0-14", "15-29"], help="layers to compress ('0-14', '0,3,5'), one set each"
    )
    parser.add_argument("--noise", nargs="*", type=float, default=[0.02, 0.03, 0.04], help="relative weight noise")
    parser.add_argument(
        "--calib-steps", nargs="*", type=int, default=[], help="calib of every layer with N refinement steps, one each"
    )
    parser.add_argument(
        "--calib-repeats", nargs="*", type=float, default=[], help="share of calibration blocks that repeat, one each"
    )
    parser.add_argument(
        "--sharpen", nargs="*", type=float, default=[], help="calib of every layer, then attention logits x F, one each"
    )
    args = parser.parse_args(argv)
    if not all(0 < share <= 1 for share in args.calib_repeats):
        parser.error(f"--calib-repeats shares must be in (0, 1], got {args.calib_repeats}")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model} is not a saved model folder (no config.json)")
    if out_files := [path.name for path in Path(args.out).glob("*")]:
        parser.error(f"--out {args.out} is not empty ({', '.join(sorted(out_files)[:3])}); choose another")
    if any(r <= 0 for r in args.noise):
        parser.error(f"--noise scales must be positive, got {args.noise}")
    if any(factor <= 0 for factor in args.sharpen):
        parser.error(f"--sharpen factors must be positive, got {args.sharpen}")
    if any(steps < 0 for steps in args.calib_steps):
        parser.error(f"--calib-steps must be non-negative, got {args.calib_steps}")
    num_layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    try:
        args.layer_sets = {spec: parse_layers(spec, num_layers) for spec in args.layer_sets}
    except ValueError as error:
        parser.error(f"--layer-sets: {error}")
    return args


def add_weight_noise_(model, scale: float, seed: int = 0):
    """Every weight matrix but the embeddings plus N(0, (scale x its RMS)^2), seeded; in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2 and "embed" not in name:
                weight += scale * weight.pow(2).mean().sqrt() * torch.randn(weight.shape, generator=generator)
    return model


def with_repeats(blocks: torch.Tensor, share: float) -> torch.Tensor:
    """`blocks` with an evenly spread `share` of them replaced by their first half twice (a block that repeats)."""
    blocks = blocks.clone()
    half = blocks.shape[1] // 2
    chosen = torch.linspace(0, len(blocks) - 1, round(share * len(blocks))).long()
    blocks[chosen, half : 2 * half] = blocks[chosen, :half]
    return blocks


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    texts = text_sources(["pydoc", "news"])
    original, tokenizer = load_folder(args.model, "float32")
    calib_texts = [texts["pydoc"]["train"], texts["news"]["train"]]
    calib = alternating_blocks(tokenizer, calib_texts, BLOCK_SIZE)[:CALIB_BLOCK_COUNT]
    evals = {name: pack_blocks(tokenizer, texts[name]["validation"], BLOCK_SIZE, EVAL_BLOCKS) for name in texts}
    sets = prompt_sets(news_openings=50)
    results = {"machine": machine_info(), "model": args.model, "variants": {}}

    def record(name: str, folder: Path, model, **extra) -> None:
        bpb = {text: bits_per_byte(model, blocks, tokenizer) for text, blocks in evals.items()}
        with tqdm(total=sum(map(len, sets.values())), desc=f"greedy samples {name}") as progress:
            loops = measure(str(folder), sets, 64, progress)
        results["variants"][name] = {"folder": str(folder), "bpb": bpb, **loops, **extra}
        atomic_write_json(out / "results.json", results)

    record("converted", Path(args.model), original, kv_fraction=1.0)

    def record_calib(name: str, folder: Path, blocks=calib, **options) -> None:
        started = time.perf_counter()
        folder, compressed = pipeline.compress(
            args.model, folder, args.kv_heads, "calib", blocks, composition="banded", progress=True,
            calib_lr=CALIB_LR, calib_query_stride=CALIB_QUERY_STRIDE, **options,
        )  # fmt: skip
        record(name, folder, compressed, kv_fraction=kv_fraction(compressed.config),
               seconds=time.perf_counter() - started)  # fmt: skip

    for spec, layers in args.layer_sets.items():
        record_calib(f"calib banded 3->{args.kv_heads}, layers {spec}", out / f"layers-{spec.replace(',', '_')}",
                     layers=layers)  # fmt: skip
    for steps in args.calib_steps:
        record_calib(f"calib banded 3->{args.kv_heads}, {steps} refinement steps", out / f"steps-{steps}",
                     calib_steps=steps)  # fmt: skip
    for share in args.calib_repeats:
        record_calib(f"calib banded 3->{args.kv_heads}, {share:g} of blocks repeating", out / f"repeats-{share:g}",
                     blocks=with_repeats(calib, share))  # fmt: skip
    for factor in args.sharpen:
        record_calib(f"calib banded 3->{args.kv_heads}, attention logits x{factor:g}", out / f"sharpen-{factor:g}",
                     sharpen=factor)  # fmt: skip
    for scale in args.noise:
        noisy = add_weight_noise_(load_folder(args.model, "float32")[0], scale)
        record(f"converted + weight noise {scale:g}", save_folder(noisy, out / f"noise-{scale:g}", tokenizer), noisy,
               kv_fraction=1.0)  # fmt: skip

    base = results["variants"]["converted"]["bpb"]
    rows = [[name, f"{v['kv_fraction']:.2f}",
             *(f"{v['bpb'][text]:.4f} ({100 * (v['bpb'][text] / base[text] - 1):+.2f}%)" for text in evals),
             str(v["loops"]["everyday"]), str(v["loops"]["news"]), f"{v['repeated_4grams']:.2f}"]
            for name, v in results["variants"].items()]  # fmt: skip
    header = ["model", "KV", "pydoc bits/byte", "news bits/byte", "loops, of 16 everyday", "of 50 news openings",
              "repeated 4-grams"]  # fmt: skip
    table = markdown_table(header, rows)
    atomic_write_text(out / "results.md", table + "\n")
    figure, axis = plots.plt.subplots(figsize=(6, 4))
    for name, v in results["variants"].items():
        cost = 100 * (v["bpb"]["pydoc"] / base["pydoc"] + v["bpb"]["news"] / base["news"] - 2) / 2
        axis.scatter(cost, sum(v["loops"].values()), label=name)
    axis.set_xlabel("bits/byte vs converted, mean of pydoc and news (%)")
    axis.set_ylabel(f"greedy samples ending in a loop (of {sum(map(len, sets.values()))})")
    axis.legend(fontsize="small")
    plots.save_figure(figure, out / "controls.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
