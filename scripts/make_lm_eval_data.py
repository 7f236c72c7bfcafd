"""Build the data files of the offline lm-eval tasks in `mea_hf/resources/lm_eval/` from the built-in corpus's held-out split.

    python scripts/make_lm_eval_data.py            # rewrites mea_hf/resources/lm_eval/data/*.jsonl

Three small sets, all from `mea_hf.data.corpus.builtin_corpus()["validation"]` (documents no model here trains on):
- heldout_chunks.jsonl: {"text"} chunks of whole lines, for perplexity (loglikelihood_rolling);
- next_line.jsonl: {"context", "choices", "label"}: the true next line of a document among three distractor lines
  with the same indentation taken from other documents (multiple_choice);
- complete_line.jsonl: {"context", "target"}: the preceding lines plus the start of a line; the target is the rest of
  that line (generate_until, exact match).
The sampling is seeded, so reruns on the same Python version write identical files.
"""

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mea_hf.data.corpus import builtin_corpus
from mea_hf.utils.atomic import atomic_write_text

CONTEXT_LINES = 8
NUM_CHUNKS = 40
CHUNK_CHARS = 1200
NUM_NEXT_LINE = 200
NUM_COMPLETE_LINE = 100
NUM_DISTRACTORS = 3


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _is_content(line: str) -> bool:
    """A line worth predicting: some code or prose, not blank and not a lone bracket."""
    stripped = line.strip()
    return len(stripped) >= 8 and not stripped.startswith("#")


def heldout_chunks(documents: list[str], rng: random.Random) -> list[dict]:
    """Chunks of consecutive whole lines (about CHUNK_CHARS characters), spread over all held-out documents."""
    chunks = []
    for text in documents:
        lines = text.splitlines(keepends=True)
        current = ""
        for line in lines:
            if len(current) + len(line) > CHUNK_CHARS and current.strip():
                chunks.append(current)
                current = ""
            current += line
        if current.strip():
            chunks.append(current)
    chunks = [chunk for chunk in chunks if len(chunk) >= CHUNK_CHARS // 2]
    return [{"text": chunks[i]} for i in sorted(rng.sample(range(len(chunks)), NUM_CHUNKS))]


def _shuffled_line_positions(documents: list[str], rng: random.Random) -> list[tuple[int, int]]:
    """(document, line) positions of content lines that have CONTEXT_LINES lines before them, shuffled."""
    positions = []
    for doc_index, text in enumerate(documents):
        lines = text.splitlines()
        positions += [(doc_index, i) for i in range(CONTEXT_LINES, len(lines)) if _is_content(lines[i])]
    rng.shuffle(positions)
    return positions


def _context(lines: list[str], index: int) -> str:
    return "".join(line + "\n" for line in lines[index - CONTEXT_LINES : index])


def next_line_examples(documents: list[str], rng: random.Random) -> list[dict]:
    """Pick the true next line among distractors of the same indentation drawn from other documents."""
    split_lines = [text.splitlines() for text in documents]
    by_indent: dict[str, list[tuple[int, str]]] = {}
    for doc_index, lines in enumerate(split_lines):
        for line in lines:
            if _is_content(line):
                by_indent.setdefault(_indent(line), []).append((doc_index, line))
    examples = []
    for doc_index, line_index in _shuffled_line_positions(documents, rng):
        lines = split_lines[doc_index]
        true_line = lines[line_index]
        pool = [
            line for other, line in by_indent.get(_indent(true_line), []) if other != doc_index and line != true_line
        ]
        distractors = sorted(set(pool))
        if len(distractors) < NUM_DISTRACTORS:
            continue
        choices = [true_line, *rng.sample(distractors, NUM_DISTRACTORS)]
        rng.shuffle(choices)
        examples.append(
            {
                "context": _context(lines, line_index),
                "choices": [choice + "\n" for choice in choices],
                "label": choices.index(true_line),
            }
        )
        if len(examples) == NUM_NEXT_LINE:
            break
    return examples


def complete_line_examples(documents: list[str], rng: random.Random) -> list[dict]:
    """The preceding lines and the first words of a line; the target is the rest of the line (from a space on)."""
    examples = []
    for doc_index, line_index in _shuffled_line_positions(documents, rng):
        lines = documents[doc_index].splitlines()
        line = lines[line_index].rstrip()
        if not 16 <= len(line.strip()) <= 60:
            continue
        split = line.rfind(" ", len(_indent(line)), len(_indent(line)) + len(line.strip()) // 2 + 1)
        if split <= len(_indent(line)):
            continue
        examples.append({"context": _context(lines, line_index) + line[:split], "target": line[split:]})
        if len(examples) == NUM_COMPLETE_LINE:
            break
    return examples


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} examples to {path.relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "mea_hf" / "resources" / "lm_eval" / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    documents = builtin_corpus()["validation"]
    _write_jsonl(args.out / "heldout_chunks.jsonl", heldout_chunks(documents, random.Random(args.seed)))
    _write_jsonl(args.out / "next_line.jsonl", next_line_examples(documents, random.Random(args.seed + 1)))
    _write_jsonl(args.out / "complete_line.jsonl", complete_line_examples(documents, random.Random(args.seed + 2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
