"""`mea sweep-lr`: the same short training for every (variant, learning rate) pair — the paper's LR study, small.

Every run uses the same tokenizer, data, token budget, seed and schedule; only the model variant and the peak LR
change. Results go to `OUT/results.json` after each run, so an interrupted sweep continues where it stopped (pairs
already done are skipped, a half-done run resumes from its last checkpoint). Outputs: results.json, table.md (also
printed), loss_vs_lr.png and one training folder per run under OUT/runs/.

Variants (mea_hf/resources/models/<size>-<variant>.json): llama (baseline), llama-headnorm (the paper's "+GroupNorm": per-head
RMSNorm, no HLC), mea-nonorm (HLC without head norm), mea (HLC + head norm).
"""

import json
import math
import shutil
from pathlib import Path

from ..utils.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ..utils.tables import markdown_table

VARIANTS = ("llama", "llama-headnorm", "mea-nonorm", "mea")
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
# Sized for about 90 minutes for the 16 runs on 2 CPU cores (tiny models, 2400 steps x 2048 tokens = 1.5 epochs each).
SWEEP_DEFAULTS = {
    "block_size": 128, "batch_size": 16, "grad_accum": 1, "max_steps": 2400, "warmup_steps": 240, "eval_every": 300,
    "eval_blocks": 128, "save_every": 600, "keep_checkpoints": 1, "progress": False,
}  # fmt: skip
_RESULT_FLOATS = ("final_val_loss", "best_val_loss", "initial_val_loss", "tokens_per_second")
_PER_RUN_KEYS = ("model", "lr", "out", "resume", "init_from", "tokenizer")


def run_name(variant: str, lr: float) -> str:
    return f"{variant}-lr{lr:g}"


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _load_results(path: Path, base: dict) -> dict:
    if not path.exists():
        return {"settings": base, "runs": []}
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("settings") != base:
        raise ValueError(f"{path} was made with other settings ({results.get('settings')}); use another --out.")
    return results


def _sweep_tokenizer(base: dict, out: Path) -> str:
    """One tokenizer for every run: the `tokenizer` setting, else one trained on the data, saved in OUT/tokenizer."""
    from ..data.loading import cached_tokenizer

    folder = out / "tokenizer"
    if base.get("tokenizer"):
        return base["tokenizer"]
    if not folder.exists():
        tokenizer = cached_tokenizer(base.get("data", "builtin"), base.get("vocab_size", 4096), base.get("cache_dir"))
        with atomic_dir(folder) as tmp:
            tokenizer.save_pretrained(tmp)
    return str(folder)


def sweep_table(runs: list[dict], variants, lrs) -> str:
    """Rows = variants, columns = LRs; each cell "final / best" validation loss, "diverged" marked."""
    by_pair = {(r["variant"], r["lr"]): r for r in runs}
    rows = []
    for variant in variants:
        cells, best = [], None
        for lr in lrs:
            run = by_pair.get((variant, lr))
            if run is None:
                cells.append("not run")
                continue
            final, low = run["final_val_loss"], run["best_val_loss"]
            text = f"{final:.3f} / {low:.3f}" if final is not None else f"nan / {low:.3f}" if low is not None else "nan"
            cells.append(text + (" (diverged)" if run["diverged"] else ""))
            if low is not None and not run["diverged"]:
                best = low if best is None else min(best, low)
        rows.append([variant, *cells, "-" if best is None else f"{best:.3f}"])
    return markdown_table(["variant", *(f"lr {lr:g}" for lr in lrs), "best"], rows)


def plot_results(runs: list[dict], variants, path: Path) -> Path:
    from ..utils.plots import line_plot

    series = {}
    for variant in variants:
        points = sorted((r["lr"], r["final_val_loss"]) for r in runs if r["variant"] == variant)
        if points:
            series[variant] = ([lr for lr, _ in points], [loss for _, loss in points])
    return line_plot(path, series, "peak learning rate", "final validation loss (nats/token)",
                     title="LR sweep (gaps: NaN/inf)", logx=True, marker="o")  # fmt: skip


def sweep(base: dict, out, size: str = "tiny", variants=VARIANTS, lrs=LEARNING_RATES) -> dict:
    """Train every (variant, lr) pair not yet in OUT/results.json; returns the results dict."""
    from tqdm.auto import tqdm

    from .checkpoints import checkpoint_dirs
    from .loop import train
    from .models import model_config_path

    out = Path(out)
    base = {**SWEEP_DEFAULTS, **base}
    for variant in variants:
        model_config_path(f"{size}-{variant}")  # unknown size/variant: fail before any training
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = _load_results(results_path, {**base, "size": size})
    tokenizer = _sweep_tokenizer(base, out)
    done = {(r["variant"], r["lr"]) for r in results["runs"]}
    pairs = [(v, lr) for v in variants for lr in lrs]
    for variant, lr in tqdm(
        [p for p in pairs if p not in done], desc="sweep-lr", initial=len(done & set(pairs)), total=len(pairs)
    ):
        run_out = out / "runs" / run_name(variant, lr)
        if run_out.exists() and not checkpoint_dirs(run_out):
            shutil.rmtree(run_out)  # stopped before its first checkpoint: start it again
        summary = train(
            {
                **base,
                "model": f"{size}-{variant}",
                "lr": lr,
                "tokenizer": tokenizer,
                "out": str(run_out),
                "resume": True,
            }
        )
        results["runs"].append({
            "variant": variant, "lr": lr,
            **{k: _finite_or_none(summary[k]) for k in _RESULT_FLOATS},
            "diverged": summary["diverged"], "tokens_seen": summary["tokens_seen"], "steps": summary["steps"],
        })  # fmt: skip
        atomic_write_json(results_path, results)
        shutil.rmtree(run_out / "checkpoints", ignore_errors=True)  # the run is complete; its final folder stays
    table = sweep_table(results["runs"], variants, lrs)
    atomic_write_text(out / "table.md", table + "\n")
    plot_results(results["runs"], variants, out / "loss_vs_lr.png")
    return results
