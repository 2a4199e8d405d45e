"""The feed-forward DNI study (arXiv 1608.05343, Sec. 3.1) as importable code.

`run_single(config, workdir)` trains one network (backprop, DNI or cDNI) and
writes results.json / history.csv / TensorBoard / checkpoints (resumable).
`run_grid(config, methods, depths, workdir)` runs method x depth, each in
`workdir/<model><layers>_<method>/`, then writes beside them the paper-style
test error table (`table.csv`, `table.md`: one row per method, one column per
depth), the combined `history.csv`, `results.json` and the learning-curve
figures `test_error.png` (test error against step, a panel per depth) and
`sg_loss.png` (mean synthetic-gradient loss against step). With several
seeds each run is in `<model><layers>_<method>_seed<seed>/`, the table holds
the mean over seeds and `table_seeds.csv` every run. The CLI
`python -m experiments.dni_feedforward` calls these.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import keras
import pandas as pd
from absl import logging

from dni_tf.harness import cli
from dni_tf import data as data_lib
from dni_tf.harness import plots, results, tensorboard_views
from dni_tf.dni_feedforward import (GRADIENT_UNITS, INPUT_TARGETS, METHODS, POINT_CHOICES,
                                    UNLOCKS, build_classifier)
from dni_tf.harness.training import SweepProgress, train_and_evaluate

MODELS = ("fcn", "cnn")
# The paper's schedule: Adam, batch 256, lr 3e-5 divided by 10 at 300k and 400k of 500k.
# "cpu": a schedule of the same shape that fits a shared CPU (lr raised for the short run).
# "parity": the known setup of issue 20 (MNIST, MLP 784-256-256-10, one decoupling
# point after the second hidden layer, modules with one hidden layer of 256, batch
# 64, Adam 1e-3 for everything, 10 epochs = 10 x 937 steps, seeds 1, 2, 3; XLA).
# A preset sets DNIConfig fields and, with "methods"/"seeds", the grid; flags
# given explicitly win.
PRESETS = {
    "paper": dict(steps=500_000, learning_rate=3e-5, eval_every=5_000),
    "cpu": dict(steps=1_500, learning_rate=1e-3, eval_every=250),
    "parity": dict(model="fcn", layers=3, decouple=(2,), sg_hidden_layers=1, sg_units=256,
                   batch_size=64, learning_rate=1e-3, lr_boundaries=(), steps=9_370,
                   eval_every=937, jit_compile=True, diagnostics=True,
                   methods=("backprop", "dni", "cdni"),
                   seeds=(1, 2, 3)),
}


@dataclasses.dataclass
class DNIConfig:
    """One run's settings; the defaults are the paper's (`PRESETS["paper"]`)."""

    dataset: str = "mnist"
    data_dir: Optional[str] = None
    model: str = "fcn"
    layers: int = 4
    width: Optional[int] = None  # units per FCN layer (256) / filters per CNN layer (128)
    method: str = "cdni"
    decouple: Optional[Sequence[int]] = None  # None = every layer
    point: str = "auto"  # pre_relu (BN output before the ReLU) for dni, post_relu otherwise
    sg_hidden_layers: int = 0
    sg_units: Optional[int] = None
    gradient_units: str = "auto"  # batch_mean for dni, per_example (B x larger) for cdni
    sg_scale: float = 1.0
    lambda_mix: float = 0.0  # BP(lambda): 1 = backprop
    target_mix: float = 0.0  # true gradient in the module targets only (the old lambda_mix)
    update_prob: float = 1.0
    unlock: str = "update"
    input_targets: str = "real"  # complete unlock: the real chain, or "chained"
    steps: int = 500_000
    batch_size: int = 256
    learning_rate: float = 3e-5
    lr_boundaries: Sequence[float] = (0.6, 0.8)  # fractions of steps; lr / 10 at each
    eval_every: int = 5_000
    eval_batch_size: int = 1000
    diagnostics: bool = False
    oracle: bool = False
    jit_compile: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError("<field>...") naming the field and the allowed values."""
        cli.check_finite_fields(self)  # NaN would slip through the range tests below
        if self.dataset not in data_lib.IMAGE_DATASETS:
            raise ValueError(f"dataset={self.dataset!r}: choose from {', '.join(data_lib.IMAGE_DATASETS)}")
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: choose from {', '.join(MODELS)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose from {', '.join(METHODS)}")
        if self.unlock not in UNLOCKS:
            raise ValueError(f"unlock={self.unlock!r}: choose from {', '.join(UNLOCKS)}")
        for name, allowed in (("point", POINT_CHOICES), ("gradient_units", GRADIENT_UNITS),
                              ("input_targets", INPUT_TARGETS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose from {', '.join(allowed)}")
        if self.layers < 2:
            raise ValueError(f"layers={self.layers}: must be >= 2 (a decoupling point needs 2 layers)")
        if self.decouple is not None:
            bad = [k for k in self.decouple if not 1 <= k <= self.layers - 1]
            if bad or not self.decouple:
                raise ValueError(f"decouple={','.join(map(str, self.decouple))}: decoupling points "
                                 f"must be 'all' or integers in [1, {self.layers - 1}] (layers={self.layers})")
        if self.sg_hidden_layers not in (0, 1, 2):
            raise ValueError(f"sg_hidden_layers={self.sg_hidden_layers}: allowed 0, 1, 2")
        if not 0.0 < self.update_prob <= 1.0:
            raise ValueError(f"update_prob={self.update_prob}: allowed (0, 1]")
        if not 0.0 <= self.lambda_mix <= 1.0:
            raise ValueError(f"lambda_mix={self.lambda_mix}: allowed [0, 1]")
        if not 0.0 <= self.target_mix <= 1.0:
            raise ValueError(f"target_mix={self.target_mix}: allowed [0, 1]")
        if self.lambda_mix > 0.0 and (self.unlock != "update" or self.oracle):
            raise ValueError("lambda_mix > 0 (BP(lambda)) needs --unlock=update and no --oracle")
        if not self.sg_scale > 0.0:
            raise ValueError(f"sg_scale={self.sg_scale}: must be > 0")
        if self.method == "backprop" and (self.update_prob < 1 or self.unlock != "update"
                                          or self.oracle):
            raise ValueError("method=backprop: --update_prob < 1, --unlock=complete and --oracle "
                             "need --method=dni or cdni")
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.width is not None and self.width <= 0:
            raise ValueError(f"width={self.width}: must be > 0")
        if self.sg_units is not None and self.sg_units <= 0:
            raise ValueError(f"sg_units={self.sg_units}: must be > 0")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0")
        if any(not 0.0 < b < 1.0 for b in self.lr_boundaries) or list(self.lr_boundaries) != sorted(
                self.lr_boundaries):
            raise ValueError(f"lr_boundaries={self.lr_boundaries}: increasing fractions in (0, 1)")


def learning_rate_schedule(config: DNIConfig):
    """Piecewise constant: lr, lr/10, lr/100 ... at `lr_boundaries` x steps."""
    if not config.lr_boundaries:
        return config.learning_rate
    boundaries = [int(round(b * config.steps)) for b in config.lr_boundaries]
    values = [config.learning_rate * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build_model(config: DNIConfig, image_shape, num_classes):
    """The compiled `DNIClassifier` for `config` (Adam, cross-entropy on logits)."""
    keras.utils.set_random_seed(config.seed)
    model = build_classifier(
        config.model, config.layers, image_shape, num_classes, seed=config.seed,
        width=config.width, point=config.point, method=config.method, decouple=config.decouple,
        sg_hidden_layers=config.sg_hidden_layers, sg_units=config.sg_units,
        gradient_units=config.gradient_units, sg_scale=config.sg_scale,
        lambda_mix=config.lambda_mix, target_mix=config.target_mix,
        update_prob=config.update_prob, unlock=config.unlock, input_targets=config.input_targets,
        oracle=config.oracle, diagnostics=config.diagnostics)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate_schedule(config)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=config.jit_compile)
    return model


def run_single(config: DNIConfig, workdir: str, image_data=None,
               extra_config: Optional[dict] = None) -> dict:
    """Trains one configuration in `workdir` (resumes); returns its final metrics."""
    config.validate()
    image_data = image_data or data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)
    model = build_model(config, image_data.image_shape, image_data.num_classes)
    start = time.time()
    final = train_and_evaluate(
        model, image_data.train_dataset(config.batch_size, seed=config.seed),
        image_data.test_dataset(config.eval_batch_size), steps=config.steps,
        eval_every=config.eval_every, workdir=workdir,
        label=f"{config.model}{config.layers} {config.method}")
    metrics = {k: v for k, v in final.items() if k != "step"}
    metrics.update(test_error=1.0 - final["test_accuracy"], steps=final["step"],
                   wall_seconds_this_call=round(time.time() - start, 1),
                   data_source=image_data.source)
    results.save_results(workdir, {**dataclasses.asdict(config), **(extra_config or {})}, metrics)
    return metrics


def check_batch_size(config: DNIConfig, image_data) -> None:
    """UsageError unless --batch_size fits the training split (batches are full)."""
    count = len(image_data.train[1])
    cli.check_batch_size(config.batch_size, count,
                         f"{image_data.name} has {count} training examples")


def run_dir(workdir: str, config: DNIConfig, with_seed: bool = False) -> str:
    name = f"{config.model}{config.layers}_{config.method}"
    return os.path.join(workdir, f"{name}_seed{config.seed}" if with_seed else name)


def run_grid(config: DNIConfig, methods: Sequence[str], depths: Sequence[int], workdir: str,
             extra_config: Optional[dict] = None,
             seeds: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Runs every method x depth (x seed), then writes the table and figures; returns the table.

    `seeds`: None (or one seed) = `config.seed`, one folder per method x depth;
    several = a folder per method x depth x seed and the table holds the mean.
    Runs are trained in order; rerunning resumes and skips finished ones.
    """
    with_seed = seeds is not None and len(seeds) > 1
    seeds = list(seeds) if seeds else [config.seed]
    configs = [dataclasses.replace(config, method=m, layers=d, seed=s)
               for d in depths for m in methods for s in seeds]
    if len({run_dir(workdir, c, with_seed) for c in configs}) != len(configs):
        raise ValueError(f"methods {list(methods)}, depths {list(depths)} and seeds {seeds} "
                         "must each be distinct: two configurations would share one run folder")
    for c in configs:
        c.validate()
    image_data = data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)  # before the first configuration trains
    logging.info("data: %s from %s", config.dataset, image_data.source)
    finals, frames = [], []
    for c in SweepProgress(configs, lambda c: f"{c.method}, {c.layers} layers, seed {c.seed}"):
        metrics = run_single(c, run_dir(workdir, c, with_seed), image_data, extra_config)
        finals.append({"method": c.method, "layers": c.layers, "seed": c.seed, **metrics})
        frame = results.load_history(run_dir(workdir, c, with_seed)).copy()
        frame.insert(0, "seed", c.seed)
        frame.insert(0, "layers", c.layers)
        frame.insert(0, "method", c.method)
        frames.append(frame)
    tensorboard_views.log_sweep(workdir, [
        (run_dir(workdir, c, with_seed), {"method": c.method, "layers": c.layers, "seed": c.seed},
         f) for c, f in zip(configs, finals)])
    history = pd.concat(frames, ignore_index=True)
    history["test_error"] = 1.0 - history["test_accuracy"]
    sg_cols = [col for col in history.columns if col.startswith("train_sg_loss_")]
    if sg_cols:
        history["train_sg_loss_mean"] = history[sg_cols].mean(axis=1)
    results.write_csv(os.path.join(workdir, results.HISTORY_FILE), history)
    table = error_table(pd.DataFrame(finals), config.model)
    results.write_csv(os.path.join(workdir, "table.csv"), table)
    per_seed = pd.DataFrame(finals)[["method", "layers", "seed", "test_error", "test_accuracy",
                                     "train_accuracy"]]
    results.write_csv(os.path.join(workdir, "table_seeds.csv"), per_seed)
    seed_note = (f", mean of seeds {', '.join(map(str, seeds))}" if with_seed else "")
    results.atomic_write_text(
        os.path.join(workdir, "table.md"),
        f"Test error (%) on {config.dataset}, {config.model.upper()}, after {config.steps} steps "
        f"of batch {config.batch_size}{seed_note}\n\n" + results.markdown_table(table, "{:.2f}"))
    title = f"{config.dataset} {config.model.upper()}"
    curves(history, "test_error", os.path.join(workdir, "test_error.png"), "test error",
           f"{title}: test error", log=True)
    if sg_cols:
        curves(history.dropna(subset=["train_sg_loss_mean"]), "train_sg_loss_mean",
               os.path.join(workdir, "sg_loss.png"), "mean synthetic-gradient loss",
               f"{title}: synthetic-gradient regression loss (train)", log=True)
    results.save_results(workdir, {**dataclasses.asdict(config), "methods": list(methods),
                                   "depths": list(depths), "seeds": seeds, **(extra_config or {})},
                         {"runs": finals})
    return table


def curves(history: pd.DataFrame, y: str, path: str, ylabel: str, title: str,
           log: bool = False) -> str:
    """Learning curves: `y` against step, a line per method, a panel per depth (2 a row)."""
    import seaborn as sns  # plotting only

    frame = history.copy()
    frame["layers"] = frame["layers"].astype(str)
    grid = sns.relplot(data=frame, x="step", y=y, hue="method", col="layers", kind="line",
                       marker="o", markersize=3, height=2.6, aspect=1.4,
                       col_wrap=min(2, frame["layers"].nunique()),
                       hue_order=[m for m in METHODS if m in set(frame["method"])],
                       palette={m: f"C{i}" for i, m in enumerate(METHODS)})
    grid.set_axis_labels("training step", ylabel)
    grid.set_titles("{col_name} layers")
    for ax in grid.axes.flat:
        ax.grid(alpha=0.3, which="both")
        if log:
            ax.set_yscale("log")
    grid.figure.suptitle(title, y=1.02)
    return plots.save_figure(grid.figure, path, dpi=100)


def error_table(finals: pd.DataFrame, model: str) -> pd.DataFrame:
    """Paper-style table: a row per method, a column per depth, test error in % (seed mean)."""
    table = finals.pivot_table(index="method", columns="layers", values="test_error",
                               aggfunc="mean") * 100.0
    order = [m for m in METHODS if m in table.index]
    table = table.loc[order]
    table.columns = [f"{model.upper()} {d} layers" for d in table.columns]
    return table.reset_index()
