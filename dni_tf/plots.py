"""Seaborn figures written as PNG (Agg backend, atomic rename)."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; works without a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def save_figure(figure, path: str, dpi: int = 120) -> str:
    """Saves `figure` to `path` through a temporary file and closes it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def learning_curves(history: pd.DataFrame, x: str, hue: str, path: str,
                    y: str = "test_accuracy", xlabel: Optional[str] = None,
                    ylabel: Optional[str] = None, title: Optional[str] = None,
                    col: Optional[str] = None, ylim=None) -> str:
    """Line plot of `y` against `x`, one line per `hue` value (a panel per `col`)."""
    frame = history.copy()
    frame[hue] = frame[hue].astype(str)
    grid = sns.relplot(data=frame, x=x, y=y, hue=hue, col=col, kind="line", marker="o",
                       markersize=3, height=4, aspect=1.3, palette="viridis_r")
    grid.set_axis_labels(xlabel or x, ylabel or y.replace("_", " "))
    if ylim is not None:
        grid.set(ylim=ylim)
    if title:
        grid.figure.suptitle(title, y=1.02)
    for ax in grid.axes.flat:
        ax.grid(alpha=0.3)
    return save_figure(grid.figure, path)
