"""`mea eval`: evaluate a saved folder with lm-evaluation-harness, on the offline tasks by default.

    mea eval runs/quickstart/mea --limit 50 --out results.json
    mea eval DIR --tasks mea_next_line,hellaswag --kv-decode absorb      # standard tasks need Hub access

The model runs as lm-eval's `mea` model (`mea_hf.lm_eval_model.MEALM`), so MEA and Llama-family folders alike load
without trust_remote_code and generation uses the compressed MEA cache.
"""

import math
import os
from pathlib import Path

from .atomic import atomic_write_json

TASKS_DIR = Path(__file__).resolve().parent.parent / "configs" / "lm_eval"
OFFLINE_TASKS = ("mea_heldout_ppl", "mea_next_line", "mea_complete_line")
# The one number per task that tables show: (metric, higher is better). Other tasks fall back to PREFERRED_METRICS.
HEADLINE_METRICS = {
    "mea_heldout_ppl": ("bits_per_byte", False),
    "mea_next_line": ("acc", True),
    "mea_complete_line": ("exact_match", True),
}
PREFERRED_METRICS = (("acc_norm", True), ("acc", True), ("exact_match", True), ("bits_per_byte", False))


def check_model_folder(folder: str | os.PathLike) -> Path:
    """The folder as a Path, or a FileNotFoundError naming what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model folder")
    return path


def task_manager(tasks=()):
    """lm-eval's TaskManager with this project's offline tasks (`configs/lm_eval`); lm-eval's built-in tasks are
    indexed too (seconds) unless `tasks` are all offline ones."""
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
    import lm_eval

    from . import lm_eval_model  # noqa: F401  (registers the `mea` lm-eval model)

    path = check_model_folder(folder)
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
    rows = ["| task | metric | value |", "|---|---|---:|"]
    for task, metrics in results.items():
        rows += [f"| {task} | {name} | {value:.4f} |" for name, value in metrics.items() if "stderr" not in name]
    return "\n".join(rows)


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="a saved model folder (MEA or Llama-family)")
    parser.add_argument(
        "--tasks", default=",".join(OFFLINE_TASKS),
        help="comma-separated lm-eval tasks (default: the offline tasks in configs/lm_eval)",
    )  # fmt: skip
    parser.add_argument("--limit", type=float, default=None, help="examples per task (int) or a fraction (< 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-decode", choices=("auto", "reconstruct", "absorb"), default=None, help="MEA decode path")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--update-card", action="store_true", help="add the headline scores to the folder's README.md")


def parse_limit(limit: float | None) -> int | float | None:
    """`--limit` as lm-eval wants it: a count (int >= 1) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if limit <= 0 or (limit >= 1 and limit != int(limit)):
        raise ValueError(f"--limit must be a whole number of examples or a fraction in (0, 1), got {limit}")
    return int(limit) if limit >= 1 else limit


def run(args) -> int:
    from .model_card import update_model_card_results

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    limit = parse_limit(args.limit)
    results = evaluate_folder(
        args.folder, tasks, limit, batch_size=args.batch_size, device=args.device, kv_decode=args.kv_decode
    )
    if args.out:
        atomic_write_json(args.out, {"folder": str(args.folder), "tasks": tasks, "limit": limit, "results": results})
    if args.update_card:
        update_model_card_results(args.folder, headline_scores(results, suffix=f" (limit {limit})" if limit else ""))
    print(results_markdown(results))
    return 0
