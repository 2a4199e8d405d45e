"""The targeted-dropout / pruning study (the write-up *targeted-dropout: An inquiry
into the nature of pruning and targeted dropout*) as importable code.

`run_study(...)` trains the write-up's MLP once per (regime, seed) cell
("none", "dropout", "targeted_weight", "targeted_unit" and the ramped
"targeted_weight_ramp", "targeted_unit_ramp"; each cell in
`workdir/<regime>/seed_<seed>/`, resumable, through
`dni_tf.harness.training.train_and_evaluate`), prunes each trained network with
`dni_tf.pruning` at every fraction with weight and unit pruning (no retraining),
and after every cell rewrites, from all finished cells, `pruning_accuracy.csv`
(one row per cell, kind and fraction) / `.md` (mean over the finished seeds,
next to `PUBLISHED_BASELINE` on Fashion-MNIST), `pruning_accuracy.png`,
`weight_magnitudes.png` and `results.json` (status "completed" once every cell
is done, "partial" before, with the missing cells listed). Seeds are the outer
loop, so the first seed of every regime finishes first. A finished cell (its
results.json completed with the same settings) is read back, not retrained; a
cell trained with other settings is an error. The CLI
`python -m experiments.targeted_dropout` calls it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import keras
import numpy as np
import pandas as pd

from dni_tf.data.images import IMAGE_DATASETS
from dni_tf.harness import results
from dni_tf.harness.cli import value_label
from dni_tf.errors import UsageError
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.fast_path import (FastPath, FastPathOptions, default_steps_per_execution,
                                      evaluation_periods, log_once, under_distribution)
from dni_tf.targeted_dropout import EVALUATIONS, REGIMES, RAMPS, regime_variant, \
    set_evaluation, targeted_dropout_mlp

STUDY = "targeted_dropout"  # written into results.json: the reproduction report reads it
# Public baseline: the plain 784-1000-1000-500-200-10 MLP on
# Fashion-MNIST, Adam 1e-3, batch 128, 20 epochs; test accuracy % by pruning %.
PUBLISHED_BASELINE = {
    "weight": {0: 88.5, 25: 88.6, 50: 88.6, 60: 88.2, 70: 86.9, 80: 86.3, 90: 80.5,
               95: 59.6, 97: 41.1, 99: 16.1},
    "unit": {0: 88.5, 25: 88.5, 50: 87.6, 60: 85.8, 70: 81.4, 80: 56.0, 90: 30.2,
             95: 20.7, 97: 12.3, 99: 2.3},
}
BASELINE_EPOCHS = 20
BASELINE_LABEL = f"published baseline (none, {BASELINE_EPOCHS} epochs)"
PUBLISHED = results.Published(
    title="Targeted dropout and pruning",
    source="Gomez et al. 2019, *Learning Sparse Networks Using Targeted Dropout*, "
           "arXiv 1905.13678, and the write-up *targeted-dropout: An inquiry into the nature "
           "of pruning and targeted dropout*; the baseline table is a public one for this "
           "exact network and setup",
    claims=("Targeted dropout makes a network robust to magnitude pruning (weight or unit) "
            "without retraining.",
            "Baseline (no targeted dropout, 20 epochs): table below."),
    setup={"dataset": "fashion_mnist", "hidden": [1000, 1000, 500, 200], "batch_size": 128,
           "learning_rate": 1e-3, "epochs": BASELINE_EPOCHS, "alpha": 0.5, "gamma": 0.5})
# How the "0%" column was evaluated (targeted regimes; plain networks are the same).
EVALUATION_LABELS = {"dense": "dense", "remove_targets": "targets removed"}
# Settings a cell is trained with: a rerun with other values is refused (steps may grow).
CELL_SETTINGS = ("dataset", "hidden", "alpha", "gamma", "dropout_rate", "ramp_steps", "ramp",
                 "rank_every", "drop_bias", "use_bias", "batch_size", "learning_rate")


@dataclasses.dataclass
class TargetedDropoutConfig(FastPathOptions):
    """The study's settings; the defaults are the write-up's setup (20 epochs, 3 seeds)."""

    dataset: str = option("fashion_mnist", "Image dataset.", choices=IMAGE_DATASETS)
    data_dir: Optional[str] = option(None, "Dataset directory (default: $DNI_TF_DATA_DIR).")
    regimes: Sequence[str] = option(
        ("none", "dropout", "targeted_weight", "targeted_unit"),
        "Training regimes (*_ramp: the paper's ramp); one cell per regime and seed.",
        choices=REGIMES)
    alpha: float = option(0.5, "Targeted dropout: drop probability inside the target set.",
                          low=0.0, high=1.0)
    gamma: float = option(0.5, "Targeted dropout: targeted fraction.", low=0.0, high=1.0)
    dropout_rate: float = option(0.25, "Plain dropout rate (default alpha*gamma).",
                                 low=0.0, high=1.0, high_open=True)
    ramp_epochs: float = option(
        0.0, "*_ramp regimes: ramp length in epochs (0: the whole run). gamma reaches "
        "0.95*gamma half-way and gamma at the end.", low=0.0)
    ramp_schedule: str = option(
        "paper", "*_ramp regimes: paper (ramp gamma only) or official (also ramp alpha "
        "linearly, as for-ai/TD's targeted_*_piecewise).", choices=RAMPS)
    evaluation: str = option(
        "dense", "How targeted layers are evaluated: dense (every weight) or remove_targets "
        "(the whole target set removed, as the official code).", choices=EVALUATIONS)
    drop_bias: bool = option(False, "targeted_unit: a dropped unit also loses its bias (the "
                             "official code keeps it).")
    rank_every: int = option(1, "targeted_weight: re-rank |w| every this many steps "
                             "(1: exact, every step).", low=1)
    epochs: float = option(20.0, "Training epochs (ignored when --steps > 0).",
                           low=0.0, low_open=True)
    steps: int = option(0, "Training steps (0: use --epochs).", low=0)
    eval_every: int = option(0, "Steps between evaluations (0: one epoch).", low=0)
    batch_size: int = option(128, "Batch size.", low=1)
    learning_rate: float = option(1e-3, "Adam learning rate.", low=0.0, low_open=True)
    use_bias: bool = option(True, "Dense layers with biases.")
    hidden: Sequence[int] = option((1000, 1000, 500, 200), "Hidden layer widths.", low=1,
                                   distinct=False)
    prune_fractions: Sequence[float] = option(
        (0.0, 25.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.0, 99.0),
        "Pruning fractions in percent (one table column each).", low=0.0, high=100.0,
        high_open=True)
    prune_logits: bool = option(False, "Also prune the logits layer.")
    seeds: Sequence[int] = option((0,), "Seeds, one cell per regime and seed.", low=0,
                                  high=2**31 - 2)
    xla_regimes: Sequence[str] = option(
        (), "Regimes whose train and test steps are compiled with XLA, one step per call; "
        "the others run without XLA, --steps_per_execution steps per call (empty: "
        "--jit_compile decides; its auto is XLA for the targeted_weight regimes only).",
        choices=REGIMES, allow_empty=True)

    def validate(self) -> None:
        """Raises UsageError naming the flag and its allowed values."""
        check_fields(self)
        if self.xla_regimes and self.jit_compile is not None:
            raise UsageError("--xla_regimes: give it or --jit_compile, not both (--xla_regimes "
                             "compiles only the regimes it names)")
        # The evaluation periods depend on the data (eval_every 0 = one epoch):
        # `run_study` checks --steps_per_execution against them before training.
        self.check_fast_path(periods=())

    def mixed_precision_unsupported(self):
        # float16 too: Keras' own train step scales the loss for its LossScaleOptimizer.
        return None

    def regime_fast_path(self, regime: str, periods) -> FastPath:
        """jit_compile and steps per call for one regime (`periods`: evaluation periods).

        Measured on CPU (docs/targeted_dropout.md): XLA pays off for the weight
        variant's exact ranking, one step per call; the other regimes gain more
        from several steps per call without XLA (XLA with them was slower).
        """
        periods = list(periods)
        if under_distribution():  # the shared rules: no XLA by default, one step per call
            return self.resolve(None, periods)
        self.check_fast_path(periods)
        auto_spe = self.steps_per_execution or default_steps_per_execution(periods)
        if self.xla_regimes:
            xla = regime in self.xla_regimes
            return FastPath(xla, 1 if xla else auto_spe, self.mixed_precision)
        if self.jit_compile is None:
            if regime_variant(regime) == "weight":
                log_once([f"{regime}: XLA, {self.steps_per_execution or 1} step(s) per call "
                          "(XLA pays off for the exact ranking)"])
                return FastPath(True, self.steps_per_execution or 1, self.mixed_precision)
            log_once([f"{regime}: jit_compile off by default, {auto_spe} steps per call "
                      "(faster than XLA for this regime on the measured CPU)"])
            return FastPath(False, auto_spe, self.mixed_precision)
        return FastPath(bool(self.jit_compile), auto_spe, self.mixed_precision)

    def schedule(self, train_size: int):
        """(steps, eval_every, steps_per_epoch) for a train split of `train_size`."""
        per_epoch = max(train_size // self.batch_size, 1)
        steps = self.steps or max(int(round(self.epochs * per_epoch)), 1)
        # Evaluations every eval_every steps (default: one epoch) and at the last step.
        eval_every = min(self.eval_every or per_epoch, steps)
        return steps, eval_every, per_epoch


def compiled_model(regime: str, input_shape, num_classes: int, learning_rate: float = 1e-3,
                   jit_compile="auto", steps_per_execution: int = 1, **kwargs) -> keras.Model:
    """`targeted_dropout_mlp(regime, ...)` compiled with Adam and logits cross-entropy."""
    model = targeted_dropout_mlp(regime, input_shape=input_shape, num_classes=num_classes,
                                 **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    return model


def pruning_sweep(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                  fractions_percent: Sequence[float], include_logits: bool = False,
                  evaluation: str = "dense"):
    """Accuracy of pruned copies of `model` at each fraction (percent), both kinds.

    `evaluation` is how targeted layers of the pruned copy are evaluated:
    "dense" (every remaining weight used) or "remove_targets" (each targeted
    layer also removes its whole target set, ranked on the pruned kernel, as
    the official code's evaluation). Returns a DataFrame with columns kind,
    fraction (percent), accuracy (0-1), sparsity and model_sparsity (see
    `pruning.PruneReport`; the pruning's own sparsity, not counting targets
    removed at evaluation), evaluation.
    """
    from dni_tf import pruning

    rows = []
    for kind in pruning.KINDS:
        for percent in fractions_percent:
            pruned, report = pruning.prune_model(model, percent / 100.0, kind, include_logits)
            set_evaluation(pruned, evaluation)
            rows.append({"kind": kind, "fraction": float(percent),
                         "accuracy": pruning.accuracy(pruned, images, labels),
                         "sparsity": report.sparsity, "model_sparsity": report.model_sparsity,
                         "evaluation": evaluation})
            del pruned
    return pd.DataFrame(rows)


def hidden_weight_magnitudes(model: keras.Model, include_logits: bool = False,
                             max_per_layer: int = 100_000, seed: int = 0):
    """DataFrame (layer, magnitude) of |w| of the prunable kernels (subsampled)."""
    from dni_tf import pruning

    rng = np.random.default_rng(seed)
    frames = []
    for layer in pruning.prunable_layers(model, include_logits):
        values = np.abs(layer.kernel.numpy().ravel())
        if values.size > max_per_layer:
            values = rng.choice(values, max_per_layer, replace=False)
        frames.append(pd.DataFrame({"layer": layer.name, "magnitude": values}))
    return pd.concat(frames, ignore_index=True)


def fraction_label(fraction: float, evaluation: Optional[str] = None) -> str:
    """Column label of a pruning fraction; 0% names its evaluation ("0% (dense)")."""
    label = f"{value_label(fraction)}%"
    if evaluation and float(fraction) == 0.0:
        label += f" ({EVALUATION_LABELS[evaluation]})"
    return label


def wide_table(table, baseline: bool, evaluation: Optional[str] = None):
    """Long sweep table -> wide (kind, regime, seeds) x fraction, mean accuracy in percent.

    A `seed` column (if any) is averaged over; `seeds` counts the seeds per row.
    With `evaluation`, the 0% column is labelled with it.
    """
    frame = table.assign(accuracy=100.0 * table["accuracy"])
    if "seed" not in frame.columns:
        frame = frame.assign(seed=0)
    counts = frame.groupby(["kind", "regime"], sort=False)["seed"].nunique()
    frame = frame.groupby(["kind", "regime", "fraction"], sort=False, as_index=False)[
        "accuracy"].mean()
    frame["seeds"] = [str(counts[(k, r)]) for k, r in zip(frame["kind"], frame["regime"])]
    rows = []
    if baseline:
        for kind, values in PUBLISHED_BASELINE.items():
            for fraction, acc in values.items():
                rows.append({"kind": kind, "regime": BASELINE_LABEL, "fraction": float(fraction),
                             "accuracy": acc, "seeds": "-"})
    frame = pd.concat([frame[["kind", "regime", "seeds", "fraction", "accuracy"]],
                       pd.DataFrame(rows)], ignore_index=True)
    # Baseline rows right after their kind's own rows.
    frame["_kind"] = frame["kind"].map({"weight": 0, "unit": 1})
    frame = frame.sort_values("_kind", kind="stable").drop(columns="_kind")
    wide = frame.pivot_table(index=["kind", "regime", "seeds"], columns="fraction",
                             values="accuracy", sort=False)
    wide.columns = [fraction_label(c, evaluation) for c in wide.columns]
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
    """Accuracy vs pruning fraction: a line per regime (mean over seeds), a panel per kind."""
    import matplotlib.pyplot as plt
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
    layers = list(dict.fromkeys(frame["layer"]))
    # Axes of our own rather than seaborn's figure-level displot: its FacetGrid
    # layout took most of a tiny study's time (1.3 s per figure here).
    figure, axes = plt.subplots(1, max(len(layers), 1), squeeze=False,
                                figsize=(3.1 * max(len(layers), 1), 2.8), sharex=True)
    for index, (axis, layer) in enumerate(zip(axes[0], layers)):
        sns.histplot(data=frame[frame["layer"] == layer], x="magnitude", hue=hue, ax=axis,
                     element="step", fill=False, stat="density", common_norm=False,
                     bins=80, log_scale=(True, False), legend=hue is not None and index == 0)
        axis.set_title(str(layer))
        axis.set_xlabel("|w|")
        axis.set_ylabel("density" if index == 0 else "")
    figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(figure)


def cell_dir(workdir: str, regime: str, seed: int) -> str:
    """The run directory of one (regime, seed) cell."""
    return os.path.join(workdir, regime, f"seed_{seed}")


class CellMismatch(ValueError):
    """A cell's folder holds a run trained with other settings."""


def _check_cell(rundir: str, settings: dict) -> Optional[dict]:
    """The cell's saved results (None if none yet); CellMismatch if trained with other settings."""
    saved = results.load_results(rundir)
    if saved is None:
        return None
    old = saved.get("config", {}).get("cell", {})
    changed = [f"{k}={old.get(k)!r} (now {settings.get(k)!r})" for k in CELL_SETTINGS
               if k in old and old.get(k) != settings.get(k)]
    if changed:
        raise CellMismatch(f"{rundir} was trained with other settings: {', '.join(changed)}; "
                         "use another workdir")
    return saved


def run_study(data, workdir: str, config: TargetedDropoutConfig,
              extra_config: Optional[dict] = None) -> dict:
    """Trains each (regime, seed) cell, prunes it, writes tables and figures.

    `data` is a `dni_tf.data.ImageData` (the caller loads `config.dataset`);
    `config.prune_fractions` are percentages; each of `config.seeds` seeds
    initialisation, data order and masks of its cells. The ramp of the "*_ramp"
    regimes lasts `config.ramp_epochs` (0: the whole run); the other regimes
    never ramp. `config.evaluation` ("dense" or "remove_targets") is how
    targeted layers are evaluated in the pruning sweep (and in the training
    curves). A rerun resumes each cell from its checkpoints; a finished cell is
    read back. Returns the metrics dict written to `workdir/results.json`
    (means over the finished seeds), whose config is `config` plus
    `extra_config` and the step schedule.

    Speed (`config.regime_fast_path`): by default the targeted_weight regimes
    are compiled with XLA, one step per call (XLA pays off for the weight
    variant, whose exact ranking dominates its step; it changes float rounding,
    not the masks); the others run several steps per call without XLA
    (bit-identical to one step per call; an explicit --steps_per_execution must
    divide every evaluation period, else UsageError). `config.xla_regimes` or
    `config.jit_compile` override the choice of XLA.
    """
    from dni_tf.harness import tensorboard_views, training

    config.validate()
    steps, eval_every, per_epoch = config.schedule(len(data.train[1]))
    periods = evaluation_periods(steps, eval_every)
    config.check_fast_path(periods)  # before any training
    record = dict(dataclasses.asdict(config), **(extra_config or {}), workdir=workdir,
                  total_steps=steps, eval_every_steps=eval_every, steps_per_epoch=per_epoch)
    regimes, seeds, hidden = list(config.regimes), list(config.seeds), list(config.hidden)
    alpha, gamma, dropout_rate = config.alpha, config.gamma, config.dropout_rate
    rank_every, ramp, drop_bias = config.rank_every, config.ramp_schedule, config.drop_bias
    ramp_steps = int(math.ceil(config.ramp_epochs * per_epoch))
    use_bias, evaluation, batch_size = config.use_bias, config.evaluation, config.batch_size
    learning_rate, prune_logits = config.learning_rate, config.prune_logits
    baseline = data.name == "fashion_mnist"
    fractions = sorted(float(f) for f in config.prune_fractions)
    cells = [(r, s) for s in seeds for r in regimes]

    def settings_of(regime):
        """The settings that change what this cell trains (a none cell ignores alpha...)."""
        settings = {"dataset": data.name, "hidden": [int(h) for h in hidden],
                    "use_bias": use_bias, "batch_size": batch_size,
                    "learning_rate": learning_rate}
        variant = regime_variant(regime)
        if regime == "dropout":
            settings["dropout_rate"] = dropout_rate
        if variant is not None:
            settings.update(alpha=alpha, gamma=gamma)
            settings.update({"rank_every": rank_every} if variant == "weight"
                            else {"drop_bias": drop_bias})
        if regime.endswith("_ramp"):
            settings.update(ramp_steps=ramp_steps or steps, ramp=ramp)
        return settings

    finished = {}  # (regime, seed) -> (pruning table, magnitudes, metrics, history)
    metrics = None  # from the last write_tables; None once a read-back cell is not in it
    sweep = training.SweepProgress(cells, lambda c: f"{c[0]} seed {c[1]}")
    for regime, cell_seed in sweep:
        rundir = cell_dir(workdir, regime, cell_seed)
        settings = settings_of(regime)
        saved = _check_cell(rundir, settings)
        cell_config = dict(record, regime=regime, seed=cell_seed, cell=settings)
        pruning_csv = os.path.join(rundir, "pruning.csv")
        if (saved and saved.get("status") == "completed"
                and saved["metrics"].get("step") == steps and os.path.exists(pruning_csv)):
            table = pd.read_csv(pruning_csv)
            if (set(table.get("evaluation", [])) == {evaluation}
                    and sorted(set(table["fraction"])) == fractions):
                mags_path = os.path.join(rundir, "weight_magnitudes.csv")
                mags = pd.read_csv(mags_path) if os.path.exists(mags_path) else None
                finished[(regime, cell_seed)] = (table, mags, saved["metrics"],
                                                 results.load_history(rundir))
                metrics = None
                continue
        os.makedirs(rundir, exist_ok=True)
        results.save_results(rundir, cell_config, {}, status="running", study=STUDY)
        keras.utils.clear_session()
        fast = config.regime_fast_path(regime, periods)
        config.apply_mixed_precision()
        model = compiled_model(regime, data.image_shape, data.num_classes, learning_rate,
                               jit_compile=fast.jit_compile,
                               steps_per_execution=fast.steps_per_execution,
                               hidden=hidden, use_bias=use_bias, alpha=alpha, gamma=gamma,
                               dropout_rate=dropout_rate, ramp_steps=settings.get("ramp_steps", 0),
                               ramp=ramp, rank_every=rank_every, drop_bias=drop_bias,
                               evaluation=evaluation, seed=cell_seed)
        outcome = training.train_and_evaluate(
            model, data.train_dataset(batch_size, seed=cell_seed), data.test_dataset(1000),
            steps=steps, eval_every=eval_every, workdir=rundir, label=f"{regime} seed {cell_seed}",
            sweep=sweep)
        last = outcome.final
        table = pruning_sweep(model, *data.test, fractions, prune_logits, evaluation)
        table = table.assign(regime=regime, seed=cell_seed)
        results.write_csv(pruning_csv, table)
        mags = hidden_weight_magnitudes(model, prune_logits, seed=cell_seed)
        results.write_csv(os.path.join(rundir, "weight_magnitudes.csv"), mags)
        plot_magnitudes(mags, os.path.join(rundir, "weight_magnitudes.png"))
        run_metrics = {"test_accuracy": last.get("test_accuracy"), "step": last.get("step")}
        for row in table.itertuples():
            label = value_label(row.fraction)  # exact: 50 and 50.0000001 stay apart
            run_metrics[f"{row.kind}_pruned_{label}_accuracy"] = row.accuracy
            run_metrics[f"{row.kind}_pruned_{label}_sparsity"] = row.sparsity
        results.save_results(rundir, cell_config, run_metrics, study=STUDY)
        finished[(regime, cell_seed)] = (table, mags, run_metrics, outcome.history)
        # After every trained cell, so an interrupted sweep leaves its tables complete so far.
        metrics = write_tables(workdir, record, cells, finished, baseline, evaluation)
    if metrics is None:
        metrics = write_tables(workdir, record, cells, finished, baseline, evaluation)
    tensorboard_views.log_sweep(workdir, [
        (cell_dir(workdir, r, s), {"regime": r, "seed": s}, *finished[(r, s)][2:])
        for r, s in cells])
    return metrics


def write_tables(workdir: str, config: dict, cells, finished: dict, baseline: bool,
                 evaluation: str) -> dict:
    """Tables, figures and results.json from the finished cells; returns the metrics.

    Metrics `<regime>/<kind>_pruned_<f>_accuracy` (and `test_accuracy`) are means
    over the regime's finished seeds; `<regime>/seed_<s>/...` the cells' own.
    """

    if not finished:
        return {}
    table = pd.concat([finished[c][0] for c in cells if c in finished], ignore_index=True)
    results.write_csv(os.path.join(workdir, "pruning_accuracy.csv"), table)
    wide = wide_table(table, baseline, evaluation)
    results.atomic_write_text(os.path.join(workdir, "pruning_accuracy.md"), markdown_table(wide))
    plot_accuracy(table, os.path.join(workdir, "pruning_accuracy.png"), baseline)
    mags = []
    for regime in dict.fromkeys(r for r, _ in cells):
        first = next((finished[c][1] for c in cells if c[0] == regime and c in finished
                      and finished[c][1] is not None), None)
        if first is not None:
            mags.append(first.assign(regime=regime))
    if mags:
        plot_magnitudes(pd.concat(mags, ignore_index=True),
                        os.path.join(workdir, "weight_magnitudes.png"))
    metrics = {}
    for (regime, seed), (_, _, cell_metrics, _) in finished.items():
        metrics.update({f"{regime}/seed_{seed}/{k}": v for k, v in cell_metrics.items()})
    for regime in dict.fromkeys(r for r, _ in cells):
        done = [finished[c][2] for c in cells if c[0] == regime and c in finished]
        keys = [k for k in done[0] if k != "step"] if done else []
        for key in keys:
            values = [m[key] for m in done if m.get(key) is not None]
            if values:
                metrics[f"{regime}/{key}"] = float(np.mean(values))
    missing = [f"{r} seed {s}" for r, s in cells if (r, s) not in finished]
    extra = {"published_baseline": PUBLISHED_BASELINE} if baseline else {}
    results.save_results(workdir, config, metrics,
                         status="completed" if not missing else "partial",
                         missing_cells=missing, study=STUDY, **extra)
    return metrics
