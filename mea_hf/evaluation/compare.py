"""`mea compare`: evaluate several folders on the same lm-eval tasks and write one table, KV bytes per token beside
each score.

    mea compare runs/quickstart/llama runs/quickstart/mea runs/quickstart/mea-kv50 --limit 100 --out compare.md

writes compare.md (Markdown table) and compare.json (the same rows with every metric) and prints the table.
"""

import os
from pathlib import Path

from ..hub.folders import check_model_folder
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.tables import markdown_table
from .harness import OFFLINE_TASKS, evaluate_folder, headline_metric


def folder_memory_row(folder: str | os.PathLike) -> dict:
    """Name, architecture and KV-cache size of a saved folder (from its config alone)."""
    from ..memory import cached_heads_per_layer, kv_bytes_per_token, kv_fraction

    config = check_model_folder(folder)
    return {
        "model": Path(folder).name,
        "folder": str(folder),
        "model_type": config.model_type,
        "cached_kv_heads": sum(cached_heads_per_layer(config)),
        "kv_bytes_per_token": kv_bytes_per_token(config),
        "kv_fraction": kv_fraction(config),
        # the MEA int8 cache (`cache_implementation="quantized"`), scales included; MEA models only
        "kv_bytes_per_token_int8": kv_bytes_per_token(config, int8=True) if config.model_type == "mea" else None,
    }


def short_names(folders) -> list[str]:
    """The shortest trailing parts of each path that tell the folders apart ("mea/final", "llama/final")."""
    parts = [Path(folder).resolve().parts for folder in folders]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(folder) for folder in folders]


def compare_folders(folders, tasks=OFFLINE_TASKS, limit=None, **eval_options) -> list[dict]:
    """One row per folder: `folder_memory_row` plus "results" ({task: {metric: value}}) from `evaluate_folder`."""
    rows = [folder_memory_row(folder) for folder in folders]  # check every folder before the slow part
    for row, name in zip(rows, short_names(folders)):
        row["model"] = name
    for row in rows:
        row["results"] = evaluate_folder(row["folder"], tasks, limit, **eval_options)
    return rows


def score_columns(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """(task, metric, higher is better) for each task any row reported, in first-seen order."""
    columns = {}
    for row in rows:
        for task, metrics in row.get("results", {}).items():
            headline = headline_metric(task, metrics)
            if headline is not None and task not in columns:
                columns[task] = headline
    return [(task, metric, higher) for task, (metric, higher) in columns.items()]


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def comparison_markdown(rows: list[dict], extra_columns: tuple[str, ...] = ()) -> str:
    """Markdown table: model, KV bytes/token (fp16), KV vs uncompressed, `extra_columns` (keys of each row, e.g.
    "val_loss"), then the headline metric of every task (arrow: which direction is better)."""
    scores = score_columns(rows)
    header = ["model", "KV bytes/token (fp16)", "KV vs full", "KV bytes/token (int8)", *extra_columns]
    header += [f"{task} {metric} {'↑' if higher else '↓'}" for task, metric, higher in scores]
    table = []
    for row in rows:
        cells = [row["model"], _cell(row["kv_bytes_per_token"]), f"{100 * row['kv_fraction']:.0f}%",
                 _cell(row.get("kv_bytes_per_token_int8"))]  # fmt: skip
        cells += [_cell(row.get(column)) for column in extra_columns]
        cells += [_cell(row.get("results", {}).get(task, {}).get(metric)) for task, metric, _ in scores]
        table.append(cells)
    return markdown_table(header, table)


def write_comparison(
    rows: list[dict], out: str | os.PathLike, extra_columns: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """Write `out` with suffix .md (table) and .json (all rows and metrics); returns both paths."""
    out = Path(out)
    markdown_path, json_path = out.with_suffix(".md"), out.with_suffix(".json")
    atomic_write_json(json_path, {"rows": rows})
    atomic_write_text(markdown_path, comparison_markdown(rows, extra_columns) + "\n")
    return markdown_path, json_path
