"""Model cards (README.md with Hub metadata) for every folder the project saves, and adding results to them later."""

import os
import re
from pathlib import Path

from ..memory import cached_heads_per_layer, kv_bytes_per_token, kv_fraction
from ..resources import resource_dir
from ..utils.atomic import atomic_write_text
from ..utils.tables import markdown_table

TEMPLATE_DIR = resource_dir("model_cards")
_TEMPLATE_NAME = "mea_model_card.md"
RESULTS_START, RESULTS_END = "<!-- mea-results:start -->", "<!-- mea-results:end -->"
_NO_RESULTS = "No measurements were recorded for this folder."
_RESULTS_BLOCK = re.compile(re.escape(RESULTS_START) + r"\n(.*?)\n?" + re.escape(RESULTS_END), re.DOTALL)


def _front_matter(base_model: str | None, tags: list[str], license_name: str) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {license_name}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("---")
    return "\n".join(lines)


def _template() -> str:
    path = TEMPLATE_DIR / _TEMPLATE_NAME
    return path.read_text(encoding="utf-8")


def _format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _results_table(results: dict | None) -> str:
    if not results:
        return _NO_RESULTS
    rows = [[str(name).replace("|", "/"), _format_value(value)] for name, value in results.items()]
    return markdown_table(["metric", "value"], rows, numeric=[False, False])


def _parse_results_table(block: str) -> dict[str, str]:
    """The rows of a table written by `_results_table`, values kept as the text shown."""
    rows = {}
    for line in block.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] != "metric" and not set(cells[1]) <= set("-:"):
            rows[cells[0]] = cells[1]
    return rows


def render_model_card(
    config,
    how_made: str = "Saved with mea-hf.",
    base_model: str | None = None,
    results: dict | None = None,
    license_name: str = "apache-2.0",
    extra_tags: tuple[str, ...] = (),
) -> str:
    """The README.md text of a saved folder: Hub metadata, MEA settings, provenance and measured results."""
    model_type = getattr(config, "model_type", "llama")
    base_model = base_model or getattr(config, "base_model_name_or_path", None) or None
    is_mea = model_type == "mea"
    tags = ["mea-hf", "text-generation", model_type, *(["kv-cache-compression"] if is_mea else []), *extra_tags]
    kv_bytes = kv_bytes_per_token(config)
    body = _template().format(
        title="MEA" if is_mea else model_type.capitalize(),
        architecture="MEA (Multi-head Explicit Attention, arXiv 2601.19611)" if is_mea else f"{model_type} (baseline)",
        import_note=(
            "With `pip install mea-hf` and `import mea_hf`, `trust_remote_code` is not needed."
            if is_mea
            else "A standard transformers architecture: no remote code."
        ),
        remote_code=is_mea,
        remote_code_arg=",trust_remote_code=True" if is_mea else "",
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        component_heads=", ".join(map(str, cached_heads_per_layer(config))),
        kv_percent=f"{100 * kv_fraction(config):.1f}",
        kv_bytes=kv_bytes,
        kv_bytes_full=round(kv_bytes / kv_fraction(config)),
        kv_bytes_int8=kv_bytes_per_token(config, int8=True),
        kv_int8_percent=f"{100 * kv_bytes_per_token(config, int8=True) * kv_fraction(config) / kv_bytes:.1f}",
        head_norm=getattr(config, "head_norm", None),
        hlc=f"keys={getattr(config, 'hlc_keys', False)}, values={getattr(config, 'hlc_values', False)}",
        kv_decode=getattr(config, "kv_decode", "n/a"),
        how_made=how_made,
        base_model=base_model or "none given (see how it was made)",
        results=_results_table(results),
    )
    return _front_matter(base_model, tags, license_name) + "\n\n" + body


def update_model_card_results(folder: str | os.PathLike, results: dict) -> Path:
    """Add (or overwrite) `results` rows in the Results table of `folder`'s README.md, atomically.

    Rows already in the table are kept unless `results` names them again. A folder without a README gets a full
    card rendered from its config; a README not written by mea-hf gets a Results section appended."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        from transformers import AutoConfig

        import mea_hf  # noqa: F401  (registers the MEA config class)

        config = AutoConfig.from_pretrained(folder)
        atomic_write_text(path, render_model_card(config, results=results))
        return path
    text = path.read_text(encoding="utf-8")
    match = _RESULTS_BLOCK.search(text)
    if match is None:
        block = f"{RESULTS_START}\n{_results_table(results)}\n{RESULTS_END}"
        atomic_write_text(path, text.rstrip("\n") + f"\n\n## Results\n\n{block}\n")
        return path
    merged = {**_parse_results_table(match.group(1)), **results}
    block = f"{RESULTS_START}\n{_results_table(merged)}\n{RESULTS_END}"
    atomic_write_text(path, text[: match.start()] + block + text[match.end() :])
    return path
