"""Shared matplotlib helpers: headless (Agg) line plots written atomically as PNG files."""

import os
from pathlib import Path

import matplotlib

from .atomic import atomic_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write `figure` to `path` (PNG) through a temporary file and a rename, then close it."""
    try:
        with atomic_file(path, suffix=".png") as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)


def line_plot(
    path: str | os.PathLike,
    series: dict[str, tuple[list, list]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    marker: str | None = None,
) -> Path:
    """One line per `series` entry ({label: (xs, ys)}); None/NaN y values leave gaps. Returns the PNG path."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        axes.plot(xs, [float("nan") if y is None else y for y in ys], label=label, marker=marker)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    if logx:
        axes.set_xscale("log")
    if logy:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return save_figure(figure, path)
