"""Model cards (README.md with Hub metadata) for every folder the project saves."""

from pathlib import Path

from .memory import cached_heads_per_layer, kv_bytes_per_token, kv_fraction

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"
_TEMPLATE_NAME = "mea_model_card.md"


def _front_matter(model_type: str, base_model: str | None, tags: list[str], license_name: str) -> str:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {license_name}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("---")
    return "\n".join(lines)


def _template() -> str:
    path = TEMPLATE_DIR / _TEMPLATE_NAME
    return path.read_text(encoding="utf-8")


def _results_table(results: dict | None) -> str:
    if not results:
        return "No measurements were recorded for this folder."
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |" for name, value in results.items()]
    return "\n".join(rows)


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
    tags = ["mea-hf", "text-generation", model_type, *extra_tags]
    is_mea = model_type == "mea"
    body = _template().format(
        title="MEA" if is_mea else model_type.capitalize(),
        architecture="MEA (Multi-head Explicit Attention, arXiv 2601.19611)" if is_mea else f"{model_type} (baseline)",
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        component_heads=", ".join(map(str, cached_heads_per_layer(config))),
        kv_percent=f"{100 * kv_fraction(config):.1f}",
        kv_bytes=kv_bytes_per_token(config),
        head_norm=getattr(config, "head_norm", None),
        hlc=f"keys={getattr(config, 'hlc_keys', False)}, values={getattr(config, 'hlc_values', False)}",
        kv_decode=getattr(config, "kv_decode", "n/a"),
        how_made=how_made,
        base_model=base_model or "none (trained from scratch)",
        results=_results_table(results),
        remote_code=is_mea,
    )
    return _front_matter(model_type, base_model, tags, license_name) + "\n\n" + body
