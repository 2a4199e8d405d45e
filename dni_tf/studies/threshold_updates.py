"""The threshold-updates study as importable code: one run per threshold T.

Source: the blog post *Backprop without synchronization* (2016), which proposes
the rule and runs no experiment. `run_sweep(config, workdir)` trains a network
with `dni_tf.threshold_updates.ThresholdUpdates` once per threshold (each in
`workdir/threshold_<T>/`, resumable), then writes beside them `summary.csv/.md`
(one row per T), `curves.csv` (accuracy against steps and against weight
updates applied), `curves.png`, `accuracy_vs_sparsity.png` and `results.json`.
`python -m experiments.threshold_updates` (`dni-tf threshold-updates`) and the
notebook both call it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import keras
import matplotlib.ticker
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from dni_tf import models
from dni_tf.harness import cli, results, tensorboard_views
from dni_tf import data as data_lib
from dni_tf.threshold_updates import ACCUMULATIONS, ThresholdUpdates
from dni_tf.harness.training import SweepProgress, train_and_evaluate

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass
class ThresholdSweepConfig:
    """Everything one sweep needs (the command line's flags, parsed)."""

    thresholds: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2)
    accumulation: str = "sum"
    decay: float = 0.9
    clip: float = 0.0  # 0: no clipping
    noise_stddev: float = 0.0
    sparse_backward: bool = False
    max_delay: int = 0
    statistics_every: int = 1
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    model: str = "mlp"
    hidden: Sequence[int] = (256, 256)
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    steps: int = 3000
    eval_every: int = 500
    batch_size: int = 64
    seed: int = 0
    target_accuracy: float = 0.9

    def validate(self) -> None:
        """Raises `cli.UsageError` (a ValueError) naming the flag and its allowed values."""
        # Finite, >= 0 and distinct: each threshold trains in its own folder.
        self.thresholds = cli.parse_floats("thresholds", list(self.thresholds), low=0.0)
        cli.check_choice("accumulation", self.accumulation, ACCUMULATIONS)
        cli.check_range("decay", self.decay, 0.0, 1.0)
        cli.check_range("clip", self.clip, 0.0)
        cli.check_range("noise_stddev", self.noise_stddev, 0.0)
        cli.check_range("max_delay", self.max_delay, 0)
        cli.check_range("statistics_every", self.statistics_every, 1)
        cli.check_choice("dataset", self.dataset, data_lib.IMAGE_DATASETS)
        cli.check_choice("model", self.model, MODELS)
        self.hidden = cli.parse_ints("hidden", list(self.hidden), low=1, distinct=False)
        cli.check_choice("optimizer", self.optimizer, OPTIMIZERS)
        cli.check_range("learning_rate", self.learning_rate, 0.0, low_open=True)
        cli.check_range("steps", self.steps, 1)
        cli.check_range("eval_every", self.eval_every, 1)
        cli.check_range("batch_size", self.batch_size, 1)
        cli.check_range("target_accuracy", self.target_accuracy, 0.0, 1.0)


def build_classifier(config: ThresholdSweepConfig, data) -> keras.Model:
    """The network named by `config.model`: "mlp" with `config.hidden`, or "cnn"."""
    if config.model == "cnn":
        return models.tutorial_cnn(data.image_shape, data.num_classes, seed=config.seed)
    return models.mlp(data.image_shape, hidden=tuple(config.hidden),
                      num_classes=data.num_classes, seed=config.seed)


def _base_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    return keras.optimizers.SGD(learning_rate, momentum=0.9 if name == "momentum" else 0.0)


def run_sweep(config: ThresholdSweepConfig, workdir: str, data=None,
              extra_config: Optional[dict] = None) -> dict:
    """Trains one model per threshold in `workdir/threshold_<T>/`; writes the tables.

    `data` is an `ImageData` (default: `config.dataset` loaded from
    `config.data_dir`). Returns the per-threshold metrics, also written to
    `workdir/results.json` with the config (and `extra_config`).
    """
    config.validate()
    if data is None:
        data = data_lib.load_image_data(config.dataset, config.data_dir)
    cli.check_batch_size(config.batch_size, len(data.train[1]),
                         f"{data.name} has {len(data.train[1])} training examples")
    config_dict = {**dataclasses.asdict(config), **(extra_config or {})}
    rows, curves, runs = [], [], []
    for threshold in SweepProgress(config.thresholds, lambda t: f"T={cli.value_label(t)}"):
        # Exact folder names: 1e-4 and 1.000001e-4 must not share (and resume) one run.
        subdir = os.path.join(workdir, f"threshold_{cli.value_label(threshold)}")
        model = ThresholdUpdates(
            build_classifier(config, data), threshold=threshold,
            accumulation=config.accumulation, decay=config.decay, clip=config.clip or None,
            noise_stddev=config.noise_stddev, sparse_backward=config.sparse_backward,
            max_delay=config.max_delay, seed=config.seed,
            statistics_every=config.statistics_every)
        model.compile(optimizer=_base_optimizer(config.optimizer, config.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        train_and_evaluate(model, data.train_dataset(config.batch_size, seed=config.seed),
                           data.test_dataset(1000), steps=config.steps,
                           eval_every=config.eval_every, workdir=subdir,
                           label=f"T={cli.value_label(threshold)}")
        history = results.load_history(subdir)
        row = summarize_run(history, threshold, model.num_weights, config.target_accuracy)
        results.save_results(subdir, {**config_dict, "thresholds": [threshold]}, row)
        rows.append(row)
        runs.append((subdir, {"threshold": threshold, "accumulation": config.accumulation,
                              "sparse_backward": config.sparse_backward,
                              "max_delay": config.max_delay}, row))
        curves.append(pd.DataFrame({
            "threshold": threshold, "step": history["step"],
            "weight_updates": history["train_weight_updates"],
            "test_accuracy": history["test_accuracy"],
            "update_fraction": history["train_update_fraction"]}))
    tensorboard_views.log_sweep(workdir, runs)
    summary = pd.DataFrame(rows)
    curves = pd.concat(curves, ignore_index=True)
    results.write_csv(os.path.join(workdir, "summary.csv"), summary)
    results.atomic_write_text(os.path.join(workdir, "summary.md"), results.markdown_table(summary))
    results.write_csv(os.path.join(workdir, "curves.csv"), curves)
    plot_sweep(summary, curves, workdir)
    metrics = {f"T={cli.value_label(r['threshold'])}": r for r in rows}
    results.save_results(workdir, config_dict, metrics)
    return metrics


def summarize_run(history, threshold: float, num_weights: int, target_accuracy: float) -> dict:
    """One summary row from a run's history.csv (columns written by `ThresholdUpdates`)."""
    last = history.iloc[-1]
    steps = int(last["step"])
    updates = float(last["train_weight_updates"])
    reached = history[history["test_accuracy"] >= target_accuracy]
    return {
        "threshold": threshold,
        "steps": steps,
        "test_accuracy": float(last["test_accuracy"]),
        "best_test_accuracy": float(history["test_accuracy"].max()),
        "test_loss": float(last["test_loss"]),
        "weight_updates": updates,
        # Weight updates applied as a fraction of what backprop+SGD applies
        # (every weight, every step).
        "update_fraction": updates / (steps * num_weights),
        "notify_fraction": float(history["train_notify_fraction"].mean()),
        "cancelled_fraction": float(last["train_cancelled_fraction"]),
        "acc_norm": float(last["train_acc_norm"]),
        f"updates_to_{target_accuracy:g}": (float(reached["train_weight_updates"].iloc[0])
                                            if len(reached) else float("nan")),
        "num_weights": num_weights,
    }


def plot_sweep(summary, curves, workdir: str) -> None:
    """`curves.png` (accuracy vs steps and vs updates) and `accuracy_vs_sparsity.png`."""
    curves = curves.assign(T=curves["threshold"].map(cli.value_label))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    sns.lineplot(data=curves, x="step", y="test_accuracy", hue="T", marker="o", ax=axes[0])
    sns.lineplot(data=curves, x="weight_updates", y="test_accuracy", hue="T", marker="o",
                 ax=axes[1], legend=False)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xlabel("weight updates applied")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)
    plt.close(fig)

    table = summary.assign(T=summary["threshold"].map(cli.value_label))
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    sns.scatterplot(data=table, x="update_fraction", y="test_accuracy", hue="T", s=70, ax=ax)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low, high = table["test_accuracy"].min(), table["test_accuracy"].max()
    if high - low < 0.02:  # Do not blow up differences of a few test examples.
        middle = (high + low) / 2
        ax.set_ylim(middle - 0.012, middle + 0.012)
    ax.set_xlabel("fraction of weight updates applied (vs backprop)")
    ax.set_ylabel("final test accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "accuracy_vs_sparsity.png"), dpi=100)
    plt.close(fig)
