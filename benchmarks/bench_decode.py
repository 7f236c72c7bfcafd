"""Decode benchmark: plain Llama (DynamicCache) vs MEA at h' = h, h/2, h/4 over each decode path and the int8 cache;
Llama and MEA h/2 also over pre-allocated (static) caches, which copy nothing per step.

For each context length, every model prefills the same random context (in chunks, `mea_hf.evaluation.speed.prefill`), then:
- decode speed: greedy single-token steps over the model's default cache (`mea_hf.evaluation.speed.time_decode`); the rows take
  turns (`--repeats` rounds, order rotated each round, the cache cropped back after each) in one process, so load
  from other processes hits them alike; the median tokens/s is reported;
- KV bytes: the bytes the cache holds after the context (`mea_hf.memory.cache_nbytes`; int8 scales included);
- bytes-read limit: decode is bound by the bytes read per step, weights (all but the input embedding) + KV cache, so
  (Llama weights + Llama KV) / (row weights + row KV) is the speed-up a row can reach; "share" is how much it does;
- peak memory: each row again in a fresh subprocess (prefill + the same decode steps); the peak resident set size
  (Linux VmHWM, reset through /proc/self/clear_refs once the model is built) is reported, and its growth over the
  resident size after model construction, which is what generation itself adds (cache + transients).
Everything is reported as a ratio to the Llama row of the same run (JSON, PNG plot, Markdown table).

    python benchmarks/bench_decode.py --out runs/bench_decode
    python benchmarks/bench_decode.py --contexts 2048 8192 --rows mea_auto mea_half_auto mea_half_int8   # a subset
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from mea_hf.cache_mea import MEAQuantizedCache, MEAStaticCache
from mea_hf.configuration_mea import MEAConfig
from mea_hf.evaluation.speed import prefill, time_decode
from mea_hf.memory import cache_nbytes
from mea_hf.modeling_mea import MEAForCausalLM
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.tables import markdown_table

ROWS = {  # name -> (label, fields); "heads": h' as a fraction of h; "int8": MEAQuantizedCache; "static": pre-allocated
    "llama": ("Llama, DynamicCache", {"llama": True, "heads": 1}),
    "llama_static": ("Llama, StaticCache", {"llama": True, "heads": 1, "static": True}),
    "mea": ("MEA h'=h, reconstruct", {"heads": 1, "kv_decode": "reconstruct"}),
    "mea_auto": ("MEA h'=h, auto", {"heads": 1, "kv_decode": "auto"}),
    "mea_half_reconstruct": ("MEA h'=h/2, reconstruct", {"heads": 2, "kv_decode": "reconstruct"}),
    "mea_half_absorb": ("MEA h'=h/2, absorb", {"heads": 2, "kv_decode": "absorb"}),
    "mea_half_auto": ("MEA h'=h/2, auto", {"heads": 2, "kv_decode": "auto"}),
    "mea_half_static": ("MEA h'=h/2, auto, MEAStaticCache", {"heads": 2, "kv_decode": "auto", "static": True}),
    "mea_half_banded": ("MEA h'=h/2, auto, banded HLC", {"heads": 2, "kv_decode": "auto", "composition": "banded"}),
    "mea_quarter_auto": ("MEA h'=h/4, auto", {"heads": 4, "kv_decode": "auto"}),
    "mea_half_int8": ("MEA h'=h/2, auto, int8", {"heads": 2, "kv_decode": "auto", "int8": True}),
    "mea_quarter_int8": ("MEA h'=h/4, auto, int8", {"heads": 4, "kv_decode": "auto", "int8": True}),
}
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_decode", help="folder for results.json and decode.png")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads h (default: --heads, i.e. MHA)")
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row (median reported)")
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention kernel of every model")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per process (default 1: on a shared machine, multi-threaded ops wait for descheduled "
        "OpenMP threads, and the timing measures the scheduler rather than the model)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="rows to run (llama is always run: every ratio is against it)")  # fmt: skip
    parser.add_argument("--memory-row", choices=list(ROWS), help=argparse.SUPPRESS)  # internal: one subprocess row
    parser.add_argument("--memory-context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    args.rows = ["llama"] + [row for row in args.rows if row != "llama"]
    divisor = max(ROWS[row][1]["heads"] for row in args.rows[1:]) if len(args.rows) > 1 else 1
    if args.heads % args.kv_heads or args.kv_heads % divisor:
        raise ValueError(f"--kv-heads must divide --heads ({args.heads}) and be a multiple of {divisor} (for the "
                         f"h/{divisor} rows), got {args.kv_heads}.")  # fmt: skip
    if min(args.contexts) < 1 or args.new_tokens < 1 or args.repeats < 1 or args.threads < 1:
        raise ValueError("--contexts, --new-tokens, --repeats and --threads must be positive.")
    return args


def build(row: str, args):
    """The row's model with random weights (same seed for every row), in eval mode."""
    dims = {
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.contexts) + args.new_tokens + 2,
    }  # fmt: skip
    torch.manual_seed(args.seed)
    fields = ROWS[row][1]
    if fields.get("llama"):
        model = LlamaForCausalLM(LlamaConfig(**dims, attn_implementation=args.attn))
    else:
        heads = args.kv_heads // fields["heads"]
        config = MEAConfig(**dims, num_component_heads=heads, kv_decode=fields["kv_decode"],
                           composition=fields.get("composition", "scalar"))  # fmt: skip
        config._attn_implementation = args.attn
        model = MEAForCausalLM(config)
    return model.to(getattr(torch, args.dtype)).eval()


def empty_cache(row: str, model, context: int, args):
    """The cache a row decodes over: the model's default one (None), the int8 cache for int8 rows, or a static cache
    with room for the context and the timed steps (transformers' `StaticCache` for Llama, `MEAStaticCache` for MEA)."""
    fields = ROWS[row][1]
    if fields.get("static"):
        static = StaticCache if fields.get("llama") else MEAStaticCache
        return static(config=model.config, max_cache_len=context + args.new_tokens + 1)
    return MEAQuantizedCache(model.config) if fields.get("int8") else None


def weight_bytes(model) -> int:
    """Parameter bytes one decode step reads: everything but the input embedding table (one row is read)."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding or tied)


def process_memory() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes, from /proc/self/status (VmRSS, VmHWM)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def measure_memory(row: str, context: int, args) -> dict:
    """Peak memory of one row in this (fresh) process: build, reset the peak, prefill and decode."""
    model = build(row, args)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current VmRSS
    rss_before, _ = process_memory()
    cache, next_tokens = prefill(model, context, chunk_size=args.prefill_chunk, seed=args.seed,
                                 cache=empty_cache(row, model, context, args))  # fmt: skip
    time_decode(model, cache, next_tokens, args.new_tokens)
    _, peak = process_memory()
    return {"peak_rss": peak, "peak_growth": peak - rss_before, "rss_after_build": rss_before}


def memory_in_subprocess(row: str, context: int, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--memory-row", row, "--memory-context", str(context)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory measurement of {row} at context {context} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_speed(models: dict, context: int, args, progress) -> dict:
    """Prefill every model, then time the rows in turns; returns per-row tokens/s of every round and KV bytes."""
    states, results = {}, {}
    for row, model in models.items():
        states[row] = prefill(model, context, chunk_size=args.prefill_chunk, seed=args.seed,
                              cache=empty_cache(row, model, context, args))  # fmt: skip
        results[row] = {"kv_bytes": cache_nbytes(states[row][0]), "weight_bytes": weight_bytes(model),
                        "rounds_tokens_per_s": []}  # fmt: skip
        time_decode(model, *states[row], 1)  # warm-up step
        states[row][0].crop(-1)
        progress.update(1)
    rows = list(models)
    for round_index in range(args.repeats):
        for row in rows[round_index % len(rows) :] + rows[: round_index % len(rows)]:
            cache, next_tokens = states[row]
            seconds = time_decode(models[row], cache, next_tokens, args.new_tokens)
            cache.crop(-args.new_tokens)  # back to the context, for the next round
            results[row]["rounds_tokens_per_s"].append(args.new_tokens / seconds)
            progress.update(1)
    for row in rows:
        results[row]["tokens_per_s"] = median(results[row]["rounds_tokens_per_s"])
    return results


def add_ratios(results: dict) -> None:
    for per_context in results.values():
        base = per_context["llama"]
        for row in per_context.values():
            for key in ("tokens_per_s", "kv_bytes", "peak_rss", "peak_growth"):
                row[f"{key}_vs_llama"] = row[key] / base[key]
            # Decode is bound by bytes read per step (weights + KV): the speed-up that byte count allows, and the
            # share of it reached.
            row["bytes_limit_vs_llama"] = (base["weight_bytes"] + base["kv_bytes"]) / (row["weight_bytes"] + row["kv_bytes"])
            row["share_of_bytes_limit"] = row["tokens_per_s_vs_llama"] / row["bytes_limit_vs_llama"]


def results_table(results: dict) -> str:
    header = ["context", "model", "decode tok/s", "× Llama", "bytes-read limit × Llama", "share of limit",
              "KV cache MiB", "× Llama", "peak RSS MiB", "× Llama", "peak growth MiB", "× Llama"]  # fmt: skip
    rows = [
        [context, ROWS[row][0], f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s_vs_llama']:.2f}",
         f"{r['bytes_limit_vs_llama']:.2f}", f"{r['share_of_bytes_limit']:.2f}", f"{r['kv_bytes'] / MIB:.1f}",
         f"{r['kv_bytes_vs_llama']:.2f}", f"{r['peak_rss'] / MIB:.0f}", f"{r['peak_rss_vs_llama']:.2f}",
         f"{r['peak_growth'] / MIB:.0f}", f"{r['peak_growth_vs_llama']:.2f}"]
        for context, per_context in results.items()
        for row, r in per_context.items()
    ]  # fmt: skip
    return markdown_table(header, rows, numeric=[True, False] + [True] * 10)


def plot(results: dict, path: Path) -> None:
    from mea_hf.utils.plots import plt, save_figure

    contexts = [int(c) for c in results]
    panels = [("tokens_per_s_vs_llama", "decode tokens/s"), ("kv_bytes_vs_llama", "KV cache bytes"),
              ("peak_growth_vs_llama", "peak memory growth")]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for axis, (key, title) in zip(axes, panels):
        for row in results[str(contexts[0])]:
            axis.plot(contexts, [results[str(c)][row][key] for c in contexts], marker="o", label=ROWS[row][0])
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(contexts, [str(c) for c in contexts])
        axis.set_xlabel("context tokens")
        axis.set_title(f"{title} (x Llama)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_row:
        print(json.dumps(measure_memory(args.memory_row, args.memory_context, args)))
        return 0
    started, load_before = time.time(), os.getloadavg()
    models = {row: build(row, args) for row in args.rows}
    results = {}
    steps = len(args.contexts) * len(models) * (args.repeats + 2)
    with tqdm(total=steps, desc="bench_decode") as progress:
        for context in args.contexts:
            progress.set_postfix(context=context)
            per_context = measure_speed(models, context, args, progress)
            for row in models:
                per_context[row].update(memory_in_subprocess(row, context, argv))
                progress.update(1)
            results[str(context)] = per_context
    add_ratios(results)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("memory_")}
    out = Path(args.out)
    summary = {
        "settings": settings, "machine": machine_info(), "seconds": time.time() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results,
    }  # fmt: skip
    table = results_table(results)
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "table.md", table + "\n")
    plot(results, out / "decode.png")
    print(table)
    print(f"\n{summary['seconds']:.0f} s; load average before {load_before}, after {summary['load_average_after']}")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'decode.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
