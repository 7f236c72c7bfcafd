"""Markdown tables: the one renderer behind every table mea-hf prints or writes."""


def markdown_table(header: list[str], rows: list[list], numeric: list[bool] | None = None) -> str:
    """A GitHub Markdown table; cells are str()-ed and `|` inside them is escaped. `numeric[i]` right-aligns
    column i (default: the first column left, the others right)."""
    numeric = numeric if numeric is not None else [False] + [True] * (len(header) - 1)
    if len(numeric) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells, one per header column")

    def line(cells) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "".join("---:|" if right else "---|" for right in numeric)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
