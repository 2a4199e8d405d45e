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
from dni_tf.harness.fast_path import FastPathOptions, evaluation_periods
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.training import SweepProgress, train_and_evaluate

STUDY = "threshold_updates"  # written into results.json: the reproduction report reads it
PUBLISHED = results.Published(
    title="Threshold-triggered, unsynchronised updates",
    source="the blog post *Backprop without synchronization* (2016), "
           "a proposal with no experiment: no published numbers",
    claims=("Far fewer weight updates: small noisy gradients cancel before firing.",
            "Sparser backprop, with dropout-like effects.",
            "Increasing T acts like changing the learning rate."))
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass
class ThresholdSweepConfig(FastPathOptions):
    """Everything one sweep needs (the command line's flags, parsed)."""

    thresholds: Sequence[float] = option((0.0, 1e-4, 1e-3, 1e-2),
                                         "Thresholds T >= 0; one run per value.", low=0.0)
    accumulation: str = option("sum", "Accumulation strategy.", choices=ACCUMULATIONS)
    decay: float = option(0.9, "Accumulator decay per step (accumulation=decay).",
                          low=0.0, high=1.0)
    clip: float = option(0.0, "Bound on a fired element's emitted value; 0 = no clipping.",
                         low=0.0)
    noise_stddev: float = option(0.0, "Std of Gaussian noise added to each gradient element.",
                                 low=0.0)
    sparse_backward: bool = option(
        False, "Only units with a fired incoming weight pass their error down.")
    max_delay: int = option(0, "Per-layer random delay d in [0, max_delay] steps.", low=0)
    statistics_every: int = option(
        1, "Compute notify_fraction, acc_norm and cancelled_fraction on every k-th step only "
        "(faster; update counts stay exact).", low=1)
    dataset: str = option("mnist", "Image dataset.", choices=data_lib.IMAGE_DATASETS)
    data_dir: Optional[str] = option(None, "Dataset files (default: $DNI_TF_DATA_DIR).")
    model: str = option("mlp", "mlp, or cnn (the tutorial CNN).", choices=MODELS)
    hidden: Sequence[int] = option((256, 256), "MLP hidden layer widths.", low=1,
                                   distinct=False)
    optimizer: str = option("sgd", "Base optimizer (momentum: SGD with 0.9).",
                            choices=OPTIMIZERS)
    learning_rate: float = option(0.1, "Base optimizer learning rate.", low=0.0, low_open=True)
    steps: int = option(3000, "Training steps per threshold.", low=1)
    eval_every: int = option(500, "Evaluate every this many steps and at the last step.", low=1)
    batch_size: int = option(64, "Batch size.", low=1)
    seed: int = option(0, "Seed for weights, data order, noise and delays.", low=0)
    target_accuracy: float = option(0.9, "Report the weight updates needed to reach this.",
                                    low=0.0, high=1.0)

    def validate(self) -> None:
        """Raises `UsageError` naming the flag and its allowed values."""
        check_fields(self)
        self.check_fast_path()

    def fast_path_periods(self):
        return evaluation_periods(self.steps, self.eval_every)

    def mixed_precision_unsupported(self):
        if self.mixed_precision == "float16":
            return ("thresholds compare unscaled gradients, and float16 needs loss scaling "
                    "(use --mixed_precision=bfloat16)")
        return None


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
    sweep = SweepProgress(config.thresholds, lambda t: f"T={cli.value_label(t)}")
    for threshold in sweep:
        # Exact folder names: 1e-4 and 1.000001e-4 must not share (and resume) one run.
        subdir = os.path.join(workdir, f"threshold_{cli.value_label(threshold)}")
        config.apply_mixed_precision()
        network = build_classifier(config, data)
        fast = config.resolve(network)
        model = ThresholdUpdates(
            network, threshold=threshold,
            accumulation=config.accumulation, decay=config.decay, clip=config.clip or None,
            noise_stddev=config.noise_stddev, sparse_backward=config.sparse_backward,
            max_delay=config.max_delay, seed=config.seed,
            statistics_every=config.statistics_every)
        model.compile(optimizer=_base_optimizer(config.optimizer, config.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], **fast.compile_kwargs())
        history = train_and_evaluate(
            model, data.train_dataset(config.batch_size, seed=config.seed),
            data.test_dataset(1000), steps=config.steps, eval_every=config.eval_every,
            workdir=subdir, label=f"T={cli.value_label(threshold)}", sweep=sweep,
            settings={**dataclasses.asdict(config), "thresholds": [threshold]}).history
        row = summarize_run(history, threshold, model.num_weights, config.target_accuracy)
        results.save_results(subdir, {**config_dict, "thresholds": [threshold]}, row,
                             study=STUDY)
        rows.append(row)
        runs.append((subdir, {"threshold": threshold, "accumulation": config.accumulation,
                              "sparse_backward": config.sparse_backward,
                              "max_delay": config.max_delay}, row, history))
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
    results.save_results(workdir, config_dict, metrics, study=STUDY)
    return metrics


def summarize_run(history, threshold: float, num_weights: int, target_accuracy: float) -> dict:
    """One summary row from a run's history (columns written by `ThresholdUpdates`)."""
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
