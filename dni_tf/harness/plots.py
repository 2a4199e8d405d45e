"""Seaborn figures written as PNG files (atomic rename), without touching pyplot's state.

Importing this module changes nothing global: matplotlib's backend is left as
the user (or Jupyter, whose default is inline figures) chose it. Figures drawn
here are plain `matplotlib.figure.Figure`s on an Agg canvas (`new_figure`), so
they need no display and never enter pyplot's list of open figures;
`save_figure` also accepts a figure made through pyplot (e.g. by seaborn's
`relplot`) and closes it there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Optional

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@contextlib.contextmanager
def numbers_as_categories():
    """Quiets matplotlib's INFO line "Using categorical units to plot a list of strings
    that are all parsable as floats" while seaborn draws numbers (T, k) as categories
    (its bar plots pass them on as strings); the logger's level is restored after."""
    logger = logging.getLogger("matplotlib.category")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def new_figure(**kwargs) -> Figure:
    """A figure for files only: an Agg canvas, outside pyplot (no backend, no display)."""
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: str, dpi: int = 120) -> str:
    """Saves `figure` to `path` through a temporary file and closes it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        plt.close(figure)  # a pyplot figure leaves pyplot's list; a new_figure() is untouched
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def learning_curves(history: pd.DataFrame, x: str, hue: str, path: str,
                    y: str = "test_accuracy", xlabel: Optional[str] = None,
                    ylabel: Optional[str] = None, title: Optional[str] = None,
                    col: Optional[str] = None, ylim=None, errorbar=("ci", 95)) -> str:
    """Line plot of `y` against `x`, one line per `hue` value (a panel per `col`).

    Several rows per (`hue`, `x`) (seeds) are drawn as their mean with a band:
    `errorbar` as seaborn takes it, e.g. ("pi", 100) for the lowest-highest range.
    """
    frame = history.copy()
    frame[hue] = frame[hue].astype(str)
    hue_order = list(pd.unique(frame[hue]))
    palette = dict(zip(hue_order, sns.color_palette("viridis_r", len(hue_order))))
    panels = [(None, frame)] if col is None else list(frame.groupby(col, sort=True))
    figure = new_figure(figsize=(5.2 * len(panels), 4))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for index, (ax, (value, panel)) in enumerate(zip(axes, panels)):
        last = index == len(panels) - 1
        sns.lineplot(data=panel, x=x, y=y, hue=hue, hue_order=hue_order, palette=palette,
                     marker="o", markersize=3, ax=ax, legend=last, errorbar=errorbar)
        ax.set(xlabel=xlabel or x, ylabel=(ylabel or y.replace("_", " ")) if index == 0 else "")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # 5-digit steps stay readable
        if col is not None:
            ax.set_title(f"{col} = {value}")
        if ylim is not None:
            ax.set_ylim(ylim)
        ax.grid(alpha=0.3)
        if last:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title=hue)
    if title:
        figure.suptitle(title, y=1.02)
    return save_figure(figure, path)
