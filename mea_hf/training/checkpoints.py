"""What a run leaves in its output folder while it trains: checkpoints (exact resume) and the metrics log."""

import json
import math
import os
import re
import shutil
from pathlib import Path

from ..utils.atomic import atomic_write_json, atomic_write_text

_CHECKPOINT = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out) -> list[Path]:
    """Complete checkpoints of a run (those with trainer_state.json), oldest first."""
    folder = Path(out) / "checkpoints"
    found = [p for p in folder.glob("step-*") if _CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def remove_interrupted_saves(out: Path) -> None:
    for stale in (out / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(stale)


def save_checkpoint(accelerator, out: Path, step: int, state: dict, keep: int, emit) -> Path:
    """accelerate state into a temporary folder, then renamed: an interrupted save leaves older ones intact."""
    folder = out / "checkpoints"
    final, tmp = folder / f"step-{step:08d}", folder / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", state)
        emit("checkpoint_saving", step=step, path=tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, world: int) -> dict:
    """Restore accelerate's state from `checkpoint`; returns its trainer state. Refuses another process count."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    if saved.get("num_processes", world) != world:  # the data order and RNG states are per process
        raise ValueError(f"checkpoint {checkpoint} was written by {saved['num_processes']} processes and this run "
                         f"has {world}; resume with {saved['num_processes']} to continue exactly.")  # fmt: skip
    accelerator.load_state(checkpoint)
    return saved


def read_metrics(out) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLog:
    """Appends JSON records to `out/metrics.jsonl` (main process only); on resume keeps records up to the step."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = out / "metrics.jsonl", enabled
        if enabled and resume_step is not None:
            kept = [r for r in read_metrics(out) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record) -> None:
        if self.enabled:
            record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def loss_curves(records: list[dict]) -> dict[str, tuple[list, list]]:
    """(steps, values) per curve of a run's metrics: the training loss (the distillation loss with a teacher), the
    validation LM loss and, when distilling, the validation KL to the teacher (and its attention maps' KL) and the
    KL of the on-policy micro-batches (steps that had any); non-finite values become gaps."""
    curves = {}
    for name, key in (("train", "loss"), ("validation", "val_loss"), ("validation KL to teacher", "val_kl"),
                      ("validation attention KL", "val_attention_kl"),
                      ("on-policy KL (student's text)", "on_policy_loss")):  # fmt: skip
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            curves[name] = ([step for step, _ in points],
                            [v if v is not None and math.isfinite(v) else None for _, v in points])  # fmt: skip
    return curves


def plot_loss_curve(out: Path) -> Path:
    from ..utils.plots import line_plot

    return line_plot(out / "loss_curve.png", loss_curves(read_metrics(out)), "optimizer step", "loss (nats/token)",
                     title=str(out.name))  # fmt: skip
