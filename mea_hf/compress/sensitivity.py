"""Layer sensitivity: compress one layer at a time, measure the validation loss, suggest layers for a KV budget.

This is how the paper chose its "Half" layers. The report (sensitivity.json) feeds `mea compress --budget B
--sensitivity FILE`, which compresses the least sensitive layers until the KV cache is at most B of the original.
"""

import json
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluation.loss import mean_token_loss
from .reduce import each_layer_compressed_alone

REPORT_NAME = "sensitivity.json"
PLOT_NAME = "sensitivity.png"


def layer_sensitivity(model, kv_heads: int, val_blocks, method: str = "svd", calib_blocks=None) -> dict:
    """Validation loss of `model` with each layer alone compressed to `kv_heads` (the model is left unchanged)."""
    config = model.config
    baseline = mean_token_loss(model, val_blocks)
    current = config.component_heads_per_layer
    candidates = [i for i in range(config.num_hidden_layers) if current[i] > kv_heads]
    layers = []
    trials = each_layer_compressed_alone(model, kv_heads, candidates, method, calib_blocks)
    for index, trial in tqdm(trials, total=len(candidates), desc="layers"):
        loss = mean_token_loss(trial, val_blocks)
        layers.append({"layer": index, "loss": loss, "delta": loss - baseline})
        del trial
    return {
        "kv_heads": kv_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "component_heads": current,
        "method": method,
        "baseline_loss": baseline,
        "layers": layers,
    }


def kv_fraction_after(report: dict, layers) -> float:
    """KV fraction of the model once `layers` are compressed to the report's kv_heads."""
    heads = [report["kv_heads"] if i in set(layers) else h for i, h in enumerate(report["component_heads"])]
    return sum(heads) / (report["num_key_value_heads"] * len(heads))


def suggest_layers(report: dict, budget: float, config=None) -> list[int]:
    """The fewest, least sensitive layers whose compression brings the KV cache to at most `budget`."""
    if config is not None and len(report["component_heads"]) != config.num_hidden_layers:
        raise ValueError(
            f"the sensitivity file covers {len(report['component_heads'])} layers, the model has {config.num_hidden_layers}."
        )
    if not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise ValueError(f"budget must be a KV fraction in (0, 1], got {budget!r}.")
    ranked = [entry["layer"] for entry in sorted(report["layers"], key=lambda entry: (entry["delta"], entry["layer"]))]
    chosen: list[int] = []
    while kv_fraction_after(report, chosen) > budget + 1e-9:
        if len(chosen) == len(ranked):
            lowest = kv_fraction_after(report, ranked)
            raise ValueError(
                f"budget {budget} is out of reach: compressing every measured layer to {report['kv_heads']} heads "
                f"gives a KV fraction of {lowest:.3f}. Measure sensitivity with fewer --kv-heads."
            )
        chosen.append(ranked[len(chosen)])
    return sorted(chosen)


def read_report(path) -> dict:
    """A sensitivity.json (or the folder holding it), checked for the fields `suggest_layers` needs."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--sensitivity {path}: no such file")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in ("kv_heads", "num_key_value_heads", "component_heads", "layers") if key not in report]
    except (json.JSONDecodeError, TypeError):
        report, missing = None, ["valid JSON"]
    if missing:
        raise ValueError(f"--sensitivity {path} is not a sensitivity report (missing {', '.join(missing)}).")
    return report


def plot_report(report: dict, path) -> Path:
    """Bar chart of the loss increase per compressed layer; the suggested layers are highlighted."""
    from ..utils.plots import plt, save_figure

    suggested = set(report.get("suggested_layers", []))
    layers = [entry["layer"] for entry in report["layers"]]
    figure, axes = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    colors = ["tab:green" if layer in suggested else "tab:gray" for layer in layers]
    axes.bar(layers, [entry["delta"] for entry in report["layers"]], color=colors)
    axes.set_xticks(layers)
    axes.set_xlabel("layer compressed alone")
    axes.set_ylabel("validation loss increase (nats/token)")
    axes.set_title(
        f"{report['method']} to {report['kv_heads']}/{report['num_key_value_heads']} KV heads; "
        f"green: suggested for KV budget {report.get('budget')}"
    )
    axes.grid(True, axis="y", alpha=0.3)
    return save_figure(figure, path)
