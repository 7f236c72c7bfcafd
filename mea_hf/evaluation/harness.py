"""Evaluate a saved folder with lm-evaluation-harness, on the offline tasks by default (CLI: `mea eval`).

The model runs as lm-eval's `mea` model (`mea_hf.evaluation.lm_eval_model.MEALM`), so MEA and Llama-family folders alike load
without trust_remote_code and generation uses the compressed MEA cache.
"""

import importlib.util
import math
import os
from pathlib import Path

from ..hub.folders import check_model_folder
from ..resources import resource_dir
from ..utils.tables import markdown_table

TASKS_DIR = resource_dir("lm_eval")
OFFLINE_TASKS = ("mea_heldout_ppl", "mea_next_line", "mea_complete_line")
# The one number per task that tables show: (metric, higher is better). Other tasks fall back to PREFERRED_METRICS.
HEADLINE_METRICS = {
    "mea_heldout_ppl": ("bits_per_byte", False),
    "mea_next_line": ("acc", True),
    "mea_complete_line": ("exact_match", True),
}
PREFERRED_METRICS = (("acc_norm", True), ("acc", True), ("exact_match", True), ("bits_per_byte", False))


def require_lm_eval() -> None:
    """Refuse clearly, before any work, when lm-evaluation-harness (the `eval` extra) is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("evaluation needs lm-evaluation-harness, which is not installed: pip install 'mea-hf[eval]'")


def task_manager(tasks=()):
    """lm-eval's TaskManager with this project's offline tasks (`mea_hf/resources/lm_eval`); lm-eval's built-in tasks are
    indexed too (seconds) unless `tasks` are all offline ones."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    offline_only = bool(tasks) and all(task in (*OFFLINE_TASKS, "mea_offline") for task in tasks)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline_only)


def _check_tasks(tasks: list[str], manager) -> None:
    if not tasks:
        raise ValueError("no tasks given")
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; the offline tasks are {list(OFFLINE_TASKS)}")


def _clean_metrics(raw: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    metrics = {}
    for key, value in raw.items():
        name, _, filter_name = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[name if filter_name in ("", "none") else f"{name} ({filter_name})"] = float(value)
    return metrics


def headline_metric(task: str, metrics: dict[str, float]) -> tuple[str, bool] | None:
    """(metric name, higher is better) shown for `task` in tables, or None if it reported nothing usable."""
    if task in HEADLINE_METRICS and HEADLINE_METRICS[task][0] in metrics:
        return HEADLINE_METRICS[task]
    return next((choice for choice in PREFERRED_METRICS if choice[0] in metrics), None)


def headline_scores(results: dict, suffix: str = "") -> dict[str, float]:
    """{"task metric": value} with one headline metric per task, for tables and model cards."""
    scores = {}
    for task, metrics in results.items():
        headline = headline_metric(task, metrics)
        if headline is not None:
            scores[f"{task} {headline[0]}{suffix}"] = metrics[headline[0]]
    return scores


def evaluate_folder(
    folder: str | os.PathLike,
    tasks=OFFLINE_TASKS,
    limit: float | None = None,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    kv_decode: str | None = None,
) -> dict:
    """Run lm-eval on a saved folder. Returns {task: {metric: value}} (filters other than "none" are suffixed).

    `limit` caps the examples per task (an int, or a fraction < 1). The folder loads through mea_hf, so MEA and
    Llama-family folders both work without trust_remote_code."""
    require_lm_eval()
    import lm_eval

    from . import lm_eval_model  # noqa: F401  (registers the `mea` lm-eval model)

    check_model_folder(folder)
    path = Path(folder)
    tasks = list(tasks)
    manager = task_manager(tasks)
    _check_tasks(tasks, manager)
    model_args = {"pretrained": str(path), "dtype": "float32"}
    if kv_decode is not None:
        model_args["kv_decode"] = kv_decode
    output = lm_eval.simple_evaluate(
        model="mea",
        model_args=model_args,
        tasks=tasks,
        limit=limit,
        batch_size=batch_size,
        device=device,
        task_manager=manager,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {task: _clean_metrics(metrics) for task, metrics in output["results"].items()}


def results_markdown(results: dict) -> str:
    """A task | metric | value Markdown table of `evaluate_folder`'s output."""
    rows = [
        [task, name, f"{value:.4f}"]
        for task, metrics in results.items()
        for name, value in metrics.items()
        if "stderr" not in name
    ]
    return markdown_table(["task", "metric", "value"], rows, numeric=[False, False, True])
