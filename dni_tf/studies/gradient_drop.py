"""The gradient-dropping study as importable code.

Source: the write-up *Effective learning while misplacing gradient updates*.

`run_sweep(config, workdir)` trains the tutorial CNN once per `keep_prob` (each in
`workdir/keep_prob_<p>/`, resumable), then writes beside them the combined
`history.csv` (with `keep_prob` and `prorated_step` = step x keep_prob columns),
`summary.csv`/`summary.md`, `results.json`, and the write-up's two figures: test
accuracy against batches (`results_raw.png`) and against batches x keep_prob
(`results_prorated.png`). The CLI
`python -m experiments.gradient_drop` and the notebook both call it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import keras
import pandas as pd
from absl import logging

from dni_tf import data as data_lib
from dni_tf import models
from dni_tf.harness import plots, results, tensorboard_views
from dni_tf.harness import cli
from dni_tf.errors import TrainingDiverged
from dni_tf.gradient_dropping import DROPPED_STATES, GRANULARITIES, GradientDropping
from dni_tf.harness.training import SweepProgress, train_and_evaluate

# Published numbers (the write-up, after 20k batches of 50 on MNIST).
SEED_TEST_ACCURACY = {1.0: 0.992, 0.8: 0.992, 0.5: 0.992, 0.2: 0.899}


@dataclasses.dataclass
class GradientDropConfig:
    """Everything one sweep needs; the defaults are the write-up's setup."""

    keep_probs: Sequence[float] = (1.0, 0.8, 0.5, 0.2)
    granularity: str = "variable"
    num_workers: int = 4
    rescale: bool = False
    dropped_state: str = "zero_gradient"
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    steps: int = 20000
    batch_size: int = 50
    learning_rate: float = 1e-4
    eval_every: int = 500
    eval_batch_size: int = 1000
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError naming the field and the allowed values."""
        cli.check_finite_fields(self)
        for p in self.keep_probs:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"keep_probs: {p} is outside [0, 1]")
        if not self.keep_probs:
            raise ValueError("keep_probs: give at least one value")
        labels = [cli.value_label(p) for p in self.keep_probs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"keep_probs: each value must be distinct (one run folder per "
                             f"value), got {', '.join(labels)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {self.granularity!r} not in {', '.join(GRANULARITIES)}")
        if self.dropped_state not in DROPPED_STATES:
            raise ValueError(f"dropped_state: {self.dropped_state!r} not in {', '.join(DROPPED_STATES)}")
        if self.dataset not in data_lib.IMAGE_DATASETS:
            raise ValueError(f"dataset: {self.dataset!r} not in {', '.join(data_lib.IMAGE_DATASETS)}")
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "num_workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.rescale and 0.0 in self.keep_probs:
            raise ValueError("rescale: needs every keep_prob > 0")


def build_model(config: GradientDropConfig, keep_prob: float, image_shape, num_classes) -> GradientDropping:
    """The write-up's tutorial CNN wrapped in `GradientDropping`, compiled with Adam."""
    keras.utils.set_random_seed(config.seed)
    network = models.tutorial_cnn(image_shape, num_classes, seed=config.seed)
    model = GradientDropping(network, keep_prob=keep_prob, granularity=config.granularity,
                             num_workers=config.num_workers, rescale=config.rescale,
                             dropped_state=config.dropped_state, seed=config.seed)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def run_dir(workdir: str, keep_prob: float) -> str:
    # Exact names: two different keep_probs never share (and resume) one folder.
    return os.path.join(workdir, f"keep_prob_{cli.value_label(keep_prob)}")


def check_batch_size(config: GradientDropConfig, image_data: data_lib.ImageData) -> None:
    """UsageError unless --batch_size fits the training split (batches are full)."""
    count = len(image_data.train[1])
    cli.check_batch_size(config.batch_size, count,
                         f"{image_data.name} has {count} training examples")


def run_single(config: GradientDropConfig, keep_prob: float, workdir: str,
               image_data: Optional[data_lib.ImageData] = None) -> dict:
    """Trains one `keep_prob`; writes results.json/history.csv in `workdir`; returns metrics."""
    image_data = image_data or data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)
    model = build_model(config, keep_prob, image_data.image_shape, image_data.num_classes)
    run_config = {**dataclasses.asdict(config), "keep_prob": keep_prob}
    run_config.pop("keep_probs")
    try:
        final = train_and_evaluate(
            model,
            image_data.train_dataset(config.batch_size, seed=config.seed),
            image_data.test_dataset(config.eval_batch_size),
            steps=config.steps, eval_every=config.eval_every, workdir=workdir,
            label=f"keep_prob={cli.value_label(keep_prob)}")
    except TrainingDiverged as exc:
        results.save_results(workdir, run_config, {}, status="diverged", error=str(exc))
        raise
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "test_error": 1.0 - final["test_accuracy"],
        "test_loss": final["test_loss"],
        "kept_fraction": final["train_kept_fraction"],
        "steps": final["step"],
        "data_source": image_data.source,
    }
    results.save_results(workdir, run_config, metrics)
    return metrics


def run_sweep(config: GradientDropConfig, workdir: str, extra_config: Optional[dict] = None) -> pd.DataFrame:
    """Runs every keep_prob, then writes the combined table, results and figures.

    Returns the combined history (one row per keep_prob and evaluation).
    """
    config.validate()
    image_data = data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)
    logging.info("data: %s from %s (%d train, %d test)", config.dataset, image_data.source,
                 len(image_data.train[1]), len(image_data.test[1]))
    finals = {}
    for keep_prob in SweepProgress(config.keep_probs, lambda p: f"keep_prob={cli.value_label(p)}"):
        finals[cli.value_label(keep_prob)] = run_single(config, keep_prob, run_dir(workdir, keep_prob), image_data)
    tensorboard_views.log_sweep(workdir, [
        (run_dir(workdir, p), {"keep_prob": p, "granularity": config.granularity,
                               "dropped_state": config.dropped_state}, finals[cli.value_label(p)])
        for p in config.keep_probs])
    history = combined_history(workdir, config.keep_probs)
    results.write_csv(os.path.join(workdir, results.HISTORY_FILE), history)
    plots.learning_curves(history, x="step", hue="keep_prob",
                          path=os.path.join(workdir, "results_raw.png"),
                          xlabel="training batches", title="Test accuracy (raw)")
    plots.learning_curves(history, x="prorated_step", hue="keep_prob",
                          path=os.path.join(workdir, "results_prorated.png"),
                          xlabel="training batches x keep_prob", title="Test accuracy (pro-rated)")
    summary = summary_table(finals, config.dataset, config.steps)
    results.write_csv(os.path.join(workdir, "summary.csv"), summary)
    results.atomic_write_text(os.path.join(workdir, "summary.md"), results.markdown_table(summary))
    results.save_results(workdir, {**dataclasses.asdict(config), **(extra_config or {})},
                         {"by_keep_prob": finals})
    return history


def combined_history(workdir: str, keep_probs: Sequence[float]) -> pd.DataFrame:
    """All runs' histories stacked, with `keep_prob` and `prorated_step` columns."""
    frames = []
    for keep_prob in keep_probs:
        frame = results.load_history(run_dir(workdir, keep_prob)).copy()
        frame.insert(0, "keep_prob", keep_prob)
        frame["prorated_step"] = frame["step"] * keep_prob
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summary_table(finals: dict, dataset: str, steps: int) -> pd.DataFrame:
    """Final test accuracy per keep_prob beside the write-up's (MNIST, 20k steps)."""
    rows = []
    for key, metrics in finals.items():
        published = SEED_TEST_ACCURACY.get(float(key)) if dataset == "mnist" else None
        rows.append({"keep_prob": float(key), "steps": steps,
                     "test_accuracy_%": round(100 * metrics["test_accuracy"], 2),
                     "seed_000_at_20k_%": None if published is None else round(100 * published, 1),
                     "applied_fraction": round(metrics["kept_fraction"], 3)})
    return pd.DataFrame(rows)
