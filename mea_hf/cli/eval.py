"""`mea eval`: evaluate a saved folder with lm-evaluation-harness, on the offline tasks by default.

    mea eval runs/quickstart/mea --limit 50 --out results.json
    mea eval DIR --tasks mea_next_line,hellaswag --kv-decode absorb      # standard tasks need Hub access
"""

from ..configuration_mea import KV_DECODE_PATHS
from ..evaluation.harness import OFFLINE_TASKS, evaluate_folder, headline_scores, results_markdown
from ..utils.atomic import atomic_write_json


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="a saved model folder (MEA or Llama-family)")
    parser.add_argument(
        "--tasks", default=",".join(OFFLINE_TASKS),
        help="comma-separated lm-eval tasks (default: the offline tasks in mea_hf/resources/lm_eval)",
    )  # fmt: skip
    parser.add_argument("--limit", type=float, default=None, help="examples per task (int) or a fraction (< 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-decode", choices=KV_DECODE_PATHS, default=None, help="MEA decode path")
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
    from ..hub.model_card import update_model_card_results

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
