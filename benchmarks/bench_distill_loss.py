"""The distillation loss at a real vocabulary: `mea_hf`'s fused KL against the textbook composition, in one run.

Times forward + backward of the per-token KL(teacher || student) on random logits shaped like one `mea train
--teacher` batch of SmolLM2-135M (8 x 256 tokens, 49,152-token vocabulary: 400 MB per logits tensor), alternating the
two variants each round. The textbook variant is `F.kl_div` on two log-softmaxes, what `distillation_loss` computed
before it became one autograd function that keeps a single full-vocabulary buffer. Reports wall and system CPU
seconds per call (system time is mostly page faults of fresh large buffers) and each variant's peak RSS growth over
its inputs (Linux: VmHWM, reset through /proc/self/clear_refs). Writes JSON and a PNG, prints a Markdown table.

    python benchmarks/bench_distill_loss.py --out runs/bench_distill_loss
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mea_hf.training.distill import distillation_loss
from mea_hf.utils.atomic import atomic_write_json, atomic_write_text
from mea_hf.utils.machine import machine_info
from mea_hf.utils.tables import markdown_table


def textbook_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference: KL(teacher || student) per row, from log-softmaxes and `F.kl_div`."""
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


VARIANTS = {"textbook": textbook_kl, "fused": distillation_loss}


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM": the peak RSS) in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure(variant, student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Wall and system seconds and peak RSS growth (MiB) of one forward + backward."""
    student.grad = None
    _reset_rss_peak()
    before = _status_mib("VmRSS")
    cpu, started = os.times(), time.perf_counter()
    variant(student, teacher).backward()
    wall, after = time.perf_counter() - started, os.times()
    return {"wall": wall, "system": after.system - cpu.system, "peak_mib": _status_mib("VmHWM") - before}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8 * 256, help="tokens per batch")
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/bench_distill_loss")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    student = torch.randn(args.rows, args.vocab, requires_grad=True)
    teacher = torch.randn(args.rows, args.vocab)
    gradients = {}
    for name, variant in VARIANTS.items():  # same value and gradient, checked on the benchmark's own inputs
        loss = variant(student, teacher)
        (gradients[name],) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(gradients["fused"], gradients["textbook"], rtol=1e-4, atol=1e-9)
    del gradients
    runs = {name: [] for name in VARIANTS}
    for round_ in tqdm(range(args.rounds), desc="rounds"):
        names = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for name in names:
            runs[name].append(measure(VARIANTS[name], student, teacher))
    summary = {name: {key: statistics.median(run[key] for run in runs[name]) for key in ("wall", "system", "peak_mib")}
               for name in VARIANTS}  # fmt: skip
    results = {"config": vars(args), "machine": machine_info(), "runs": runs, "median": summary,
               "load_average_1min_after": os.getloadavg()[0]}  # fmt: skip
    base = summary["textbook"]
    rows = [[name, f"{s['wall']:.3f} ({base['wall'] / s['wall']:.2f}x faster)", f"{s['system']:.3f}",
             f"{s['peak_mib']:.0f} ({s['peak_mib'] / base['peak_mib']:.2f}x)"] for name, s in summary.items()]  # fmt: skip
    table = markdown_table(["variant", "seconds / call", "system CPU s / call", "peak RSS growth MiB"], rows,
                           [False, True, True, True])  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    plot(summary, f"{args.rows:,} tokens x {args.vocab:,} vocabulary", out / "distill_loss.png")
    print(table)
    return results


def plot(summary: dict, shape: str, path: Path) -> None:
    from mea_hf.utils import plots

    figure, axes = plots.plt.subplots(1, 2, figsize=(8, 3))
    names = list(summary)
    for axis, key, label in zip(
        axes, ("wall", "peak_mib"), ("seconds per forward + backward", "peak RSS growth (MiB)")
    ):
        axis.bar(names, [summary[name][key] for name in names], color=["tab:gray", "tab:blue"])
        axis.set_ylabel(label)
    figure.suptitle(f"KL distillation loss, {shape}")
    plots.save_figure(figure, path)


if __name__ == "__main__":
    main()
