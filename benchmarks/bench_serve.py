"""Serving benchmark: Llama vs MEA h'=h/2 and h/4 under continuous batching (`generate_batch`), same KV budget.

Every row gets a paged cache of the same bytes (each of `--kv-mib`, a sweep of budgets; `num_blocks` is derived from
the bytes one token takes in that row's pages, `mea_hf.cache_mea.paged_heads`) and the same stream of mixed-length
requests (random prompts, seeded; all submitted at once, admitted by the scheduler as pages free up). Per row, in a
fresh subprocess:
- most sequences held at once: the largest number of requests in one forward of the engine, and the mean over
  forwards (a peak of a few requests moves in steps of one request; the mean is the steadier capacity measure);
- generated tokens/s over the whole stream (wall clock, including prefills), and generated tokens per CPU-second of
  the process (steadier than wall clock when other jobs share the CPU);
- peak resident memory (Linux VmHWM) and its growth over the resident size once the model is built.
With `--repeats N` the rows are measured N times, interleaved (row by row, then again): the speed columns are the
medians, their ratios the medians of the per-repeat ratios (every measurement is kept in the JSON); the capacity
columns do not change between repeats.
Two Llama rows: transformers' stock SDPA paged path (all sequences of a forward packed into one block-diagonal
attention) and the same model with MEA's per-sequence kernel (`mea_hf.paged_attention.per_sequence_sdpa`, which the
MEA rows use); ratios are to `--baseline` (default the latter: the same kernel, so the ratio is the architecture's)
of the same run (JSON, PNG, Markdown table). The machine (CPU, vector flags; `mea_hf.utils.machine`) and the 1-minute
load average before and after the run are recorded (the rows are timed on a CPU that may be shared).
When the sweep also has the budget at which the baseline's pages hold as many tokens as a row's (Llama at 2B for MEA
h/2 at B), a second table splits that row's speed ratio into what the extra capacity buys the baseline itself and the
row's per-token difference at the same schedule (`same_capacity`).

    python benchmarks/bench_serve.py --out runs/bench_serve
    python benchmarks/bench_serve.py --requests 384 --kv-mib 3 4 8 16 64 --repeats 3   # the README's table: where
                                                                   # MEA's saving stops paying (24 min)
    python benchmarks/bench_serve.py --kv-mib 4 8 16 32 --rows llama_per_sequence mea_half --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from mea_hf.cache_mea import PagedConfigView
from mea_hf.configuration_mea import MEAConfig
from mea_hf.memory import kv_bytes_per_token
from mea_hf.modeling_mea import MEAForCausalLM
from mea_hf.paged_attention import per_sequence_sdpa
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import describe_machine, machine_info
from mea_hf.utils.tables import markdown_table

ROWS = {
    "llama": ("Llama, stock packed SDPA", None),
    "llama_per_sequence": ("Llama, per-sequence SDPA", None),
    "mea_half": ("MEA h'=h/2", 2),
    "mea_quarter": ("MEA h'=h/4", 4),
}
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_serve")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--baseline", default="llama_per_sequence", choices=list(ROWS), help="row the ratios are to")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8, help="query heads = KV heads h (MHA)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kv-mib", type=float, nargs="+", default=[8.0],
                        help="paged KV cache budget(s) of every row; several make a sweep")  # fmt: skip
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="measure every row this many times (interleaved)")
    parser.add_argument("--kv-decode", default="auto", choices=["auto", "reconstruct", "absorb"], help="MEA rows")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = parser.parse_args(argv)
    if min(args.kv_mib) <= 0 or args.repeats < 1 or args.requests < 1 or args.new_tokens < 1:
        parser.error("--kv-mib, --repeats, --requests and --new-tokens must be positive")
    if not 1 <= args.prompt_min <= args.prompt_max:
        parser.error(f"need 1 <= --prompt-min <= --prompt-max, got {args.prompt_min} and {args.prompt_max}")
    return args


def row_config(row: str, args):
    """The row's config: Llama, or MEA with h' = h / divisor."""
    dims = {
        "vocab_size": 1024, "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads, "num_key_value_heads": args.heads,
        "eos_token_id": None, "pad_token_id": 0,
    }  # fmt: skip
    divisor = ROWS[row][1]
    if divisor is None:
        return LlamaConfig(**dims)
    return MEAConfig(**dims, num_component_heads=args.heads // divisor, kv_decode=args.kv_decode)


def page_blocks(row: str, args, kv_mib: float) -> tuple[int, int]:
    """(bytes one token takes in the row's float32 pages, pages of `--page-size` tokens that `kv_mib` buys)."""
    config = row_config(row, args)
    per_token = kv_bytes_per_token(config if ROWS[row][1] is None else PagedConfigView(config), dtype=torch.float32)
    return per_token, int(kv_mib * MIB // (per_token * args.page_size))


def build(row: str, args):
    torch.manual_seed(args.seed)
    config = row_config(row, args)
    return (LlamaForCausalLM if ROWS[row][1] is None else MEAForCausalLM)(config).eval()


def requests(args) -> list[list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.requests,), generator=generator)
    return [torch.randint(3, 1024, (int(n),), generator=generator).tolist() for n in lengths]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_row(row: str, args, kv_mib: float) -> dict:
    torch.set_num_threads(1)
    if row == "llama_per_sequence":  # this subprocess only: Llama's SDPA calls go to MEA's per-sequence kernel
        AttentionInterface.register("sdpa", per_sequence_sdpa)
    model = build(row, args)
    page_bytes_per_token, num_blocks = page_blocks(row, args, kv_mib)
    cb_config = ContinuousBatchingConfig(
        num_blocks=num_blocks, page_size=args.page_size, max_batch_tokens=args.max_batch_tokens
    )
    held = []
    model.register_forward_pre_hook(
        lambda module, a, kwargs: held.append(len(kwargs["cu_seq_lens_q"]) - 1), with_kwargs=True
    )
    stream = requests(args)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    base_rss = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, cpu_start = time.perf_counter(), time.process_time()
    results = model.generate_batch(inputs=stream, generation_config=generation, continuous_batching_config=cb_config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    generated = sum(len(result.generated_tokens) for result in results.values())
    if generated != args.requests * args.new_tokens:
        raise RuntimeError(f"{row}: {generated} tokens generated, expected {args.requests * args.new_tokens}")
    return {
        "label": ROWS[row][0],
        "page_bytes_per_token": page_bytes_per_token,
        "num_blocks": num_blocks,
        "cache_tokens": num_blocks * args.page_size,
        "most_sequences_held": max(held),
        "mean_sequences_per_forward": sum(held) / len(held),
        "forwards": len(held),
        "tokens_per_s": generated / seconds,
        "tokens_per_cpu_s": generated / cpu_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_mib": rss_kib("VmHWM") / 1024,
        "rss_growth_mib": (rss_kib("VmHWM") - base_rss) / 1024,
    }


SPEED_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib", "rss_growth_mib")


def median_ratio(runs: list[dict], reference_runs: list[dict], key: str) -> float:
    """The median over repeats of run[key] / reference[key] (repeat i of both rows ran back to back, so a slow spell
    of the machine hits both)."""
    return statistics.median(run[key] / ref[key] for run, ref in zip(runs, reference_runs, strict=True))


def add_ratios(results: dict, baseline: str) -> None:
    """Each row's ratios to the baseline row. Capacity columns are deterministic; a speed column's ratio is the median
    of the per-repeat ratios (`median_ratio`)."""
    base = results.get(baseline)
    for row in results.values():
        for key in ("cache_tokens", "most_sequences_held", "mean_sequences_per_forward"):
            row[f"{key}_ratio"] = row[key] / base[key] if base else None
        for key in SPEED_KEYS:
            row[f"{key}_ratio"] = median_ratio(row["runs"], base["runs"], key) if base else None


def same_capacity(budgets: dict, baseline: str) -> list[dict]:
    """Each row against the baseline run at the budget that gives it the same cache tokens (MEA h/2 at B against Llama
    at 2B), where the sweep has one: whether both ran the same schedule (most and mean sequences, forwards), and the
    tokens/s ratio split into what the extra capacity buys the baseline itself (baseline there / baseline here) and
    the row's per-token difference at the same schedule (row / baseline there); their product is about the row's ratio
    to the baseline at its own budget. Speed ratios are medians of the per-repeat ratios (`median_ratio`)."""
    schedule_keys = ("most_sequences_held", "mean_sequences_per_forward", "forwards")
    by_tokens = {results[baseline]["cache_tokens"]: budget
                 for budget, results in budgets.items() if baseline in results}  # fmt: skip
    pairs = []
    for budget, results in budgets.items():
        if baseline not in results:
            continue
        here = results[baseline]
        for name, row in results.items():
            there_budget = by_tokens.get(row["cache_tokens"])
            if name == baseline or there_budget in (None, budget):
                continue
            there = budgets[there_budget][baseline]
            pairs.append({
                "budget": budget, "row": name, "label": row["label"], "baseline_budget": there_budget,
                "cache_tokens": row["cache_tokens"],
                "same_schedule": all(row[key] == there[key] for key in schedule_keys),
                "capacity_gain": median_ratio(there["runs"], here["runs"], "tokens_per_s"),
                "per_token": median_ratio(row["runs"], there["runs"], "tokens_per_s"),
                "tokens_per_s_ratio": row["tokens_per_s_ratio"],
            })  # fmt: skip
    return pairs


def same_capacity_table(pairs: list[dict]) -> str:
    """`same_capacity` as a Markdown table."""
    header = ["KV MiB", "row", "cache tokens", "baseline at", "same schedule",
              "capacity: baseline there / here", "per token: row / baseline there", "row / baseline here"]  # fmt: skip
    rows = [[p["budget"], p["label"], p["cache_tokens"], f"{p['baseline_budget']} MiB",
             "yes" if p["same_schedule"] else "no", f"{p['capacity_gain']:.2f}x", f"{p['per_token']:.2f}x",
             f"{p['tokens_per_s_ratio']:.2f}x"]
            for p in pairs]  # fmt: skip
    return markdown_table(header, rows)


def table(budgets: dict) -> str:
    """One Markdown table: every row at every budget, ratios to the baseline at the same budget."""
    header = ["KV MiB", "row", "B/token in pages", "cache tokens", "most seqs held", "mean seqs/forward", "tokens/s",
              "tokens/CPU-s", "peak RSS MiB", "RSS growth MiB"]  # fmt: skip

    def cell(row, key, fmt):
        ratio = row.get(f"{key}_ratio")
        return fmt.format(row[key]) + (f" ({ratio:.2f}x)" if ratio is not None else "")

    rows = [
        [budget, r["label"], r["page_bytes_per_token"], cell(r, "cache_tokens", "{}"),
         cell(r, "most_sequences_held", "{}"), cell(r, "mean_sequences_per_forward", "{:.1f}"),
         cell(r, "tokens_per_s", "{:.1f}"), cell(r, "tokens_per_cpu_s", "{:.1f}"),
         cell(r, "peak_rss_mib", "{:.0f}"), cell(r, "rss_growth_mib", "{:.0f}")]
        for budget, results in budgets.items()
        for r in results.values()
    ]  # fmt: skip
    return markdown_table(header, rows)


def plot(budgets: dict, baseline: str, path: Path) -> None:
    """Ratios to the baseline against the KV budget: sequences held (most and mean) and generated tokens/s."""
    from mea_hf.utils.plots import plt, save_figure

    keys = [("most_sequences_held", "most sequences held"), ("mean_sequences_per_forward", "mean sequences/forward"),
            ("tokens_per_s", "generated tokens/s")]  # fmt: skip
    figure, axes = plt.subplots(1, len(keys), figsize=(14, 4))
    mibs = [float(budget) for budget in budgets]
    for axis, (key, title) in zip(axes, keys):
        for row in next(iter(budgets.values())):
            if row != baseline:
                label = budgets[next(iter(budgets))][row]["label"]
                axis.plot(mibs, [results[row][f"{key}_ratio"] for results in budgets.values()], marker="o", label=label)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("paged KV budget (MiB)")
        axis.set_title(f"{title} / {budgets[next(iter(budgets))][baseline]['label']}", fontsize=9)
    axes[0].legend(fontsize=8)
    figure.suptitle("Continuous batching, same paged KV budget per row")
    save_figure(figure, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.row:
        print(json.dumps(measure_row(args.row, args, args.kv_mib[0])))
        return 0
    for mib in args.kv_mib:  # every budget must hold the longest request in every row, checked before any run
        for row in args.rows:
            if page_blocks(row, args, mib)[1] * args.page_size < args.prompt_max + args.new_tokens:
                raise SystemExit(f"--kv-mib {mib:g} holds fewer tokens in {row}'s pages than one request's "
                                 f"{args.prompt_max + args.new_tokens}; raise it.")  # fmt: skip
    machine = machine_info()
    load_before = machine["load_average_1min"]
    runs = {(mib, row): [] for mib in args.kv_mib for row in args.rows}
    order = [(mib, row) for _ in range(args.repeats) for mib in args.kv_mib for row in args.rows]
    for mib, row in tqdm(order, desc="rows"):
        command = [sys.executable, __file__, *argv, "--kv-mib", str(mib), "--row", row]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"row {row} at {mib:g} MiB failed:\n{done.stderr[-3000:]}")
        runs[mib, row].append(json.loads(done.stdout.strip().splitlines()[-1]))
    budgets = {}
    for (mib, row), measured in runs.items():
        result = budgets.setdefault(f"{mib:g}", {})[row] = {**measured[0], "runs": measured}
        for key in SPEED_KEYS:
            result[key] = statistics.median(run[key] for run in measured)
    for results in budgets.values():
        add_ratios(results, args.baseline)
    pairs = same_capacity(budgets, args.baseline)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"args": vars(args), "machine": machine, "load_average_1min": load,
                                             "budgets": budgets, "same_capacity": pairs})  # fmt: skip
    tables = table(budgets) + ("\n\n" + same_capacity_table(pairs) if pairs else "")
    atomic_write_text(out / "table.md", tables + "\n")
    plot(budgets, args.baseline, out / "serve.png")
    print(tables)
    print(f"{describe_machine(machine)}; 1-minute load average after: {load['after']:.2f}")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'serve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
