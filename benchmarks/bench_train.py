"""Training throughput, MEA vs the Llama baseline of the same size, measured in one run (interleaved rounds).

Each round times `--steps` full optimizer steps, one by one, (forward, backward, clipping, fused AdamW) of both models on the same
random token blocks, alternating which model goes first. Reports tokens/s per model (median and best step) and the
MEA / Llama ratios (target >= 0.95). On a shared machine wall time mostly measures the neighbours: use
`--clock cpu --threads 1` there. Writes JSON and a PNG, prints a Markdown table.

    python benchmarks/bench_train.py                       # tiny, CPU, a couple of minutes
    python benchmarks/bench_train.py --size 125m --block-size 1024 --batch-size 8 --bf16   # on a GPU
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from mea_hf.training.models import model_config
from mea_hf.training.optim import parameter_groups
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.plots import line_plot
from mea_hf.utils.tables import markdown_table

VARIANTS = ("llama", "mea")


def make_trainer(name: str, device: torch.device, bf16: bool, gradient_checkpointing: bool):
    """(model, step function) for mea_hf/resources/models/<name>.json, initialised with a fixed seed."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(name, use_cache=False), dtype=torch.float32).to(device)
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, fused=device.type in ("cpu", "cuda"))

    def step(batch: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="mea_hf/resources/models/<size>-{llama,mea}.json (default tiny)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (CPU device: less disturbed by other processes "
                             "on a shared machine; use with --threads 1)")  # fmt: skip
    parser.add_argument("--out", default="runs/bench_train")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures CPU time and only makes sense with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    names = {variant: f"{args.size}-{variant}" for variant in VARIANTS}
    trainers = {v: make_trainer(n, device, args.bf16, args.gradient_checkpointing) for v, n in names.items()}
    vocab = trainers["llama"][0].config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (args.batch_size, args.block_size), generator=generator).to(device)
    for _, step in trainers.values():  # warm-up: allocator, kernels, optimizer state
        step(batch)
    tokens = args.batch_size * args.block_size
    rates = {v: [] for v in VARIANTS}  # tokens/s of every timed step
    for round_index in tqdm(range(args.rounds), desc="bench-train rounds"):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            step = trainers[variant][1]
            for _ in range(args.steps):
                _synchronize(device)
                started = clock()
                step(batch)
                _synchronize(device)
                rates[variant].append(tokens / (clock() - started))
    median = {v: statistics.median(r) for v, r in rates.items()}
    best = {v: max(r) for v, r in rates.items()}  # least disturbed step: robust on a shared machine
    result = {
        "command_args": vars(args),
        "device": f"cpu ({torch.get_num_threads()} threads)"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "clock": args.clock,
        "machine": machine_info(),
        "parameters": {v: sum(p.numel() for p in trainers[v][0].parameters()) for v in VARIANTS},
        "tokens_per_second_per_step": rates,
        "median_tokens_per_second": median,
        "best_tokens_per_second": best,
        "ratio_mea_over_llama_median": median["mea"] / median["llama"],
        "ratio_mea_over_llama_best": best["mea"] / best["llama"],
    }
    out = Path(args.out)
    atomic_write_json(out / "bench_train.json", result)
    steps = list(range(1, len(rates["llama"]) + 1))
    line_plot(out / "bench_train.png", {names[v]: (steps, rates[v]) for v in VARIANTS}, "timed step (interleaved)",
              "training tokens/s", title=f"training throughput, {args.size}, {result['device']}", marker="o")  # fmt: skip
    header = ["model", "parameters", "tokens/s (median step)", "tokens/s (best step)", "ratio vs Llama (median)",
              "ratio vs Llama (best)"]  # fmt: skip
    table = markdown_table(header, [
        [names[v], f"{result['parameters'][v]:,}", f"{median[v]:,.0f}", f"{best[v]:,.0f}",
         f"{median[v] / median['llama']:.3f}", f"{best[v] / best['llama']:.3f}"] for v in VARIANTS
    ])  # fmt: skip
    atomic_write_text(out / "bench_train.md", table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
