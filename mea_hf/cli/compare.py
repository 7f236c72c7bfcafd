"""`mea compare`: evaluate several folders on the same tasks and write one Markdown + JSON table."""

from pathlib import Path

from ..evaluation.compare import compare_folders, write_comparison
from ..evaluation.harness import OFFLINE_TASKS
from .eval import parse_limit


def add_arguments(parser) -> None:
    parser.add_argument("folders", nargs="+", help="saved model folders (MEA or Llama-family)")
    parser.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="comma-separated lm-eval tasks")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (int) or a fraction (< 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="output path; FILE.md and FILE.json are written")


def run(args) -> int:
    if Path(args.out).suffix not in ("", ".md", ".json"):
        raise ValueError(f"--out must end in .md or .json (both are written), got {args.out}")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    rows = compare_folders(args.folders, tasks, parse_limit(args.limit), batch_size=args.batch_size, device=args.device)
    markdown_path, json_path = write_comparison(rows, args.out)
    print(markdown_path.read_text(encoding="utf-8"), end="")
    print(f"wrote {markdown_path} and {json_path}")
    return 0
