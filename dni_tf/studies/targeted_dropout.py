"""The targeted-dropout / pruning study as importable code.

Sources: Gomez et al. 2019 (arXiv:1905.13678) and the write-up
*targeted-dropout: An inquiry into the nature of pruning and targeted dropout*.

`run_study(...)` trains the 784-1000-1000-500-200-10 MLP once per regime ("none",
"dropout",
"targeted_weight", "targeted_unit"; each in `workdir/<regime>/`, resumable, through
`dni_tf.training.train_and_evaluate`), prunes each trained network with
`dni_tf.pruning` at every fraction with weight and unit pruning (no retraining),
and writes beside them `pruning_accuracy.csv`/`.md` (next to `PUBLISHED_BASELINE`
on Fashion-MNIST), `pruning_accuracy.png`, `weight_magnitudes.png` and
`results.json`. The CLI `python -m experiments.targeted_dropout` calls it.
"""

from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np

from dni_tf.cli import value_label
from dni_tf.targeted_dropout import targeted_dropout_mlp

# Public baseline: the plain 784-1000-1000-500-200-10 MLP on
# Fashion-MNIST, Adam 1e-3, batch 128, 20 epochs; test accuracy % by pruning %.
PUBLISHED_BASELINE = {
    "weight": {0: 88.5, 25: 88.6, 50: 88.6, 60: 88.2, 70: 86.9, 80: 86.3, 90: 80.5,
               95: 59.6, 97: 41.1, 99: 16.1},
    "unit": {0: 88.5, 25: 88.5, 50: 87.6, 60: 85.8, 70: 81.4, 80: 56.0, 90: 30.2,
             95: 20.7, 97: 12.3, 99: 2.3},
}
BASELINE_LABEL = "published baseline (none, 20 epochs)"


def compiled_model(regime: str, input_shape, num_classes: int, learning_rate: float = 1e-3,
                   **kwargs) -> keras.Model:
    """`targeted_dropout_mlp(regime, ...)` compiled with Adam and logits cross-entropy."""
    model = targeted_dropout_mlp(regime, input_shape=input_shape, num_classes=num_classes,
                                 **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def pruning_sweep(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                  fractions_percent: Sequence[float], include_logits: bool = False):
    """Accuracy of pruned copies of `model` at each fraction (percent), both kinds.

    Returns a DataFrame with columns kind, fraction (percent), accuracy (0-1),
    sparsity and model_sparsity (see `pruning.PruneReport`).
    """
    import pandas as pd

    from dni_tf import pruning

    rows = []
    for kind in pruning.KINDS:
        for percent in fractions_percent:
            pruned, report = pruning.prune_model(model, percent / 100.0, kind, include_logits)
            rows.append({"kind": kind, "fraction": float(percent),
                         "accuracy": pruning.accuracy(pruned, images, labels),
                         "sparsity": report.sparsity, "model_sparsity": report.model_sparsity})
            del pruned
    return pd.DataFrame(rows)


def hidden_weight_magnitudes(model: keras.Model, include_logits: bool = False,
                             max_per_layer: int = 100_000, seed: int = 0):
    """DataFrame (layer, magnitude) of |w| of the prunable kernels (subsampled)."""
    import pandas as pd

    from dni_tf import pruning

    rng = np.random.default_rng(seed)
    frames = []
    for layer in pruning.prunable_layers(model, include_logits):
        values = np.abs(layer.kernel.numpy().ravel())
        if values.size > max_per_layer:
            values = rng.choice(values, max_per_layer, replace=False)
        frames.append(pd.DataFrame({"layer": layer.name, "magnitude": values}))
    return pd.concat(frames, ignore_index=True)


def wide_table(table, baseline: bool):
    """Long sweep table -> wide (kind, regime) x fraction accuracy in percent."""
    import pandas as pd

    frame = table.assign(accuracy=100.0 * table["accuracy"])
    rows = []
    if baseline:
        for kind, values in PUBLISHED_BASELINE.items():
            for fraction, acc in values.items():
                rows.append({"kind": kind, "regime": BASELINE_LABEL, "fraction": float(fraction),
                             "accuracy": acc})
    frame = pd.concat([frame[["kind", "regime", "fraction", "accuracy"]], pd.DataFrame(rows)],
                      ignore_index=True)
    wide = frame.pivot_table(index=["kind", "regime"], columns="fraction", values="accuracy",
                             sort=False)
    wide.columns = [f"{value_label(c)}%" for c in wide.columns]
    return wide.reset_index()


def markdown_table(wide) -> str:
    header = "| " + " | ".join(wide.columns) + " |"
    lines = [header, "|" + "---|" * len(wide.columns)]
    for _, row in wide.iterrows():
        cells = [f"{v:.1f}" if isinstance(v, float) and not np.isnan(v) else
                 ("-" if isinstance(v, float) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(table, path: str, baseline: bool) -> None:
    """Accuracy vs pruning fraction: a line per regime, a panel per pruning kind."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = table.assign(accuracy=100.0 * table["accuracy"], source="this run")
    if baseline:
        rows = [{"kind": k, "regime": BASELINE_LABEL, "fraction": float(f), "accuracy": a,
                 "source": "published"}
                for k, values in PUBLISHED_BASELINE.items() for f, a in values.items()]
        frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
    grid = sns.relplot(data=frame, x="fraction", y="accuracy", hue="regime", style="source",
                       col="kind", kind="line", marker="o", height=3.6, aspect=1.15,
                       facet_kws={"sharey": True})
    grid.set_axis_labels("pruned (%)", "test accuracy (%)")
    grid.set_titles("{col_name} pruning")
    grid.figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)


def plot_magnitudes(magnitudes, path: str) -> None:
    """|w| histograms (log x): a panel per layer, a line per regime if present."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = magnitudes[magnitudes["magnitude"] > 0]
    hue = "regime" if "regime" in frame.columns else None
    grid = sns.displot(data=frame, x="magnitude", hue=hue, col="layer", kind="hist",
                       element="step", fill=False, stat="density", common_norm=False,
                       bins=80, log_scale=(True, False), height=2.8, aspect=1.1)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("|w|", "density")
    grid.figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(grid.figure)


def run_study(data, workdir: str, config: dict, *, regimes: Sequence[str],
              fractions: Sequence[float], hidden: Sequence[int], steps: int, eval_every: int,
              alpha: float = 0.5, gamma: float = 0.5, dropout_rate: float = 0.25,
              rank_every: int = 1, ramp_steps: int = 0, use_bias: bool = True,
              batch_size: int = 128, learning_rate: float = 1e-3, prune_logits: bool = False,
              seed: int = 0) -> dict:
    """Trains each regime in `workdir/<regime>/`, prunes it, writes tables and figures.

    `data` is a `dni_tf.data.ImageData`; `fractions` are percentages. A rerun
    resumes each regime from its checkpoints (a finished regime is only reloaded
    and pruned again). Returns the metrics dict written to `workdir/results.json`.
    """
    import pandas as pd

    from dni_tf import results, tensorboard_views, training

    if len(set(regimes)) != len(regimes):
        raise ValueError(f"regimes must be distinct (one folder each), got {list(regimes)}")
    labels = [value_label(f) for f in fractions]
    if len(set(labels)) != len(labels):
        raise ValueError(f"fractions must be distinct, got {', '.join(labels)}")
    baseline = data.name == "fashion_mnist"
    tables, magnitudes, metrics, runs = [], [], {}, []
    for regime in training.SweepProgress(regimes):
        rundir = os.path.join(workdir, regime)
        keras.utils.clear_session()
        model = compiled_model(regime, data.image_shape, data.num_classes, learning_rate,
                               hidden=hidden, use_bias=use_bias, alpha=alpha, gamma=gamma,
                               dropout_rate=dropout_rate, ramp_steps=ramp_steps,
                               rank_every=rank_every, seed=seed)
        last = training.train_and_evaluate(
            model, data.train_dataset(batch_size, seed=seed), data.test_dataset(1000),
            steps=steps, eval_every=eval_every, workdir=rundir, label=regime)
        table = pruning_sweep(model, *data.test, fractions, prune_logits).assign(regime=regime)
        results.write_csv(os.path.join(rundir, "pruning.csv"), table)
        mags = hidden_weight_magnitudes(model, prune_logits, seed=seed)
        plot_magnitudes(mags, os.path.join(rundir, "weight_magnitudes.png"))
        run_metrics = {"test_accuracy": last.get("test_accuracy"), "step": last.get("step")}
        for row in table.itertuples():
            label = value_label(row.fraction)  # exact: 50 and 50.0000001 stay apart
            run_metrics[f"{row.kind}_pruned_{label}_accuracy"] = row.accuracy
            run_metrics[f"{row.kind}_pruned_{label}_sparsity"] = row.sparsity
        results.save_results(rundir, dict(config, regime=regime), run_metrics)
        runs.append((rundir, {"regime": regime}, run_metrics))
        metrics.update({f"{regime}/{k}": v for k, v in run_metrics.items()})
        tables.append(table)
        magnitudes.append(mags.assign(regime=regime))
    tensorboard_views.log_sweep(workdir, runs)
    table = pd.concat(tables, ignore_index=True)
    results.write_csv(os.path.join(workdir, "pruning_accuracy.csv"), table)
    wide = wide_table(table, baseline)
    results.atomic_write_text(os.path.join(workdir, "pruning_accuracy.md"), markdown_table(wide))
    plot_accuracy(table, os.path.join(workdir, "pruning_accuracy.png"), baseline)
    plot_magnitudes(pd.concat(magnitudes, ignore_index=True),
                    os.path.join(workdir, "weight_magnitudes.png"))
    extra = {"published_baseline": PUBLISHED_BASELINE} if baseline else {}
    results.save_results(workdir, config, metrics, **extra)
    return metrics
