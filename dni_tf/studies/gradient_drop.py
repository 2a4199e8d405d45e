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
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import pandas as pd
from absl import logging

from dni_tf import data as data_lib
from dni_tf import models
from dni_tf.harness import plots, results, tensorboard_views
from dni_tf.harness import cli
from dni_tf.errors import TrainingDiverged
from dni_tf.gradient_dropping import DROPPED_STATES, GRANULARITIES, GradientDropping
from dni_tf.harness.fast_path import FastPathOptions, evaluation_periods
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.training import SweepProgress, train_and_evaluate

STUDY = "gradient_drop"  # written into results.json: the reproduction report reads it
# Published numbers (the write-up, after 20k batches of 50 on MNIST).
SEED_TEST_ACCURACY = {1.0: 0.992, 0.8: 0.992, 0.5: 0.992, 0.2: 0.899}
SEED_STEPS = 20_000
# The TensorFlow tutorial's `read_data_sets` holds 5,000 of MNIST's 60,000 training
# images out for validation and trains on 55,000 (here the last 5,000 are held out).
TUTORIAL_HOLDOUT = {"mnist": 5000}
# The tutorial's `tf.train.AdamOptimizer` epsilon (Keras' default is 1e-7).
TUTORIAL_ADAM_EPSILON = 1e-8
# The masks' random stream starts apart from the dropout layer's (both seeded by --seed).
MASK_SEED_OFFSET = 1_000_003


PUBLISHED = results.Published(
    title="Gradient dropping",
    source="the write-up *Effective learning while misplacing gradient updates* "
           "(MNIST, TensorFlow tutorial CNN, batch 50, 20,000 steps)",
    claims=("After 20k batches of 50 on MNIST, keep_prob >= 0.5 reaches about 99.2% test "
            "accuracy and keep_prob 0.2 about 89.9%.",
            "Pro-rated by keep_prob, keep_prob 0.5 trains a little faster than twice as "
            "slowly as keep_prob 1.0."),
    setup={"dataset": "mnist", "steps": SEED_STEPS, "batch_size": 50,
           "granularity": "variable", "dropped_state": "zero_gradient", "rescale": False,
           # the TensorFlow tutorial CNN the write-up trains uses Adam 1e-4 (epsilon
           # 1e-8) on 55,000 of MNIST's training images
           "learning_rate": 1e-4, "adam_epsilon": TUTORIAL_ADAM_EPSILON,
           "train_images": 55000})


@dataclasses.dataclass
class GradientDropConfig(FastPathOptions):
    """Everything one sweep needs; the defaults are the write-up's setup."""

    keep_probs: Sequence[float] = option(
        (1.0, 0.8, 0.5, 0.2), "Probabilities of keeping each gradient part; one run per value.",
        low=0.0, high=1.0)
    granularity: str = option(
        "variable", "What is kept or dropped together: a variable (the write-up), a layer, "
        "each element, or a simulated worker's share.", choices=GRANULARITIES)
    num_workers: int = option(4, "Simulated machines for --granularity=worker.", low=1)
    rescale: bool = option(False, "Multiply kept gradients by 1/keep_prob.")
    dropped_state: str = option(
        "zero_gradient", "zero_gradient: the optimizer gets a zero gradient (the write-up's "
        "method); freeze: a dropped variable and its optimizer slots are untouched.",
        choices=DROPPED_STATES)
    dataset: str = option("mnist", "Image dataset.", choices=data_lib.IMAGE_DATASETS)
    data_dir: Optional[str] = option(None, "Directory with mnist/ etc.; default $DNI_TF_DATA_DIR.")
    steps: int = option(20000, "Training batches per run.", low=1)
    batch_size: int = option(50, "Training batch size.", low=1)
    learning_rate: float = option(1e-4, "Adam learning rate.", low=0.0, low_open=True)
    eval_every: int = option(500, "Evaluate on the test set every this many steps.", low=1)
    eval_batch_size: int = option(1000, "Test batch size.", low=1)
    seed: int = option(0, "Seed for initialisation, data order and masks.", low=0)

    def validate(self) -> None:
        """Raises UsageError / ValueError naming the field and the allowed values."""
        check_fields(self)
        if self.rescale and 0.0 in self.keep_probs:
            raise ValueError("rescale: needs every keep_prob > 0")
        self.check_fast_path()

    def fast_path_periods(self):
        return evaluation_periods(self.steps, self.eval_every)

    def mixed_precision_unsupported(self):
        # float16 too: the step differentiates the optimizer's scaled loss, and Keras'
        # LossScaleOptimizer unscales and skips overflowing steps
        # (tests/test_fast_path.py::test_float16_scales_the_loss_and_follows_the_float32_run).
        return None


def load_data(config: GradientDropConfig) -> data_lib.ImageData:
    """The training and test images, with the tutorial's holdout for MNIST."""
    return data_lib.load_image_data(config.dataset, config.data_dir,
                                    validation_size=TUTORIAL_HOLDOUT.get(config.dataset, 0))


def build_model(config: GradientDropConfig, keep_prob: float, image_shape, num_classes) -> GradientDropping:
    """The write-up's tutorial CNN wrapped in `GradientDropping`, compiled with Adam
    (the tutorial's epsilon, 1e-8)."""
    keras.utils.set_random_seed(config.seed)
    config.apply_mixed_precision()
    network = models.tutorial_cnn(image_shape, num_classes, seed=config.seed)
    fast = config.resolve(network)
    model = GradientDropping(network, keep_prob=keep_prob, granularity=config.granularity,
                             num_workers=config.num_workers, rescale=config.rescale,
                             dropped_state=config.dropped_state,
                             seed=config.seed + MASK_SEED_OFFSET)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate,
                                                  epsilon=TUTORIAL_ADAM_EPSILON),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  **fast.compile_kwargs())
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
               image_data: Optional[data_lib.ImageData] = None,
               sweep: Optional[SweepProgress] = None) -> Tuple[dict, pd.DataFrame]:
    """Trains one `keep_prob`; writes results.json/history.csv in `workdir`.

    Returns (final metrics, the run's history: one row per evaluation).
    """
    image_data = image_data or load_data(config)
    check_batch_size(config, image_data)
    model = build_model(config, keep_prob, image_data.image_shape, image_data.num_classes)
    run_config = {**dataclasses.asdict(config), "keep_prob": keep_prob}
    run_config.pop("keep_probs")
    try:
        outcome = train_and_evaluate(
            model,
            image_data.train_dataset(config.batch_size, seed=config.seed),
            image_data.test_dataset(config.eval_batch_size),
            steps=config.steps, eval_every=config.eval_every, workdir=workdir,
            label=f"keep_prob={cli.value_label(keep_prob)}", sweep=sweep,
            settings=run_config)
    except TrainingDiverged as exc:
        results.save_results(workdir, run_config, {}, status="diverged", error=str(exc),
                             study=STUDY)
        raise
    final = outcome.final
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "test_error": 1.0 - final["test_accuracy"],
        "test_loss": final["test_loss"],
        # Keras resets the metric every evaluation period: the run's fraction is the
        # mean over the periods, weighted by their lengths.
        "kept_fraction": _run_fraction(outcome.history),
        "steps": final["step"],
        "data_source": image_data.source,
    }
    results.save_results(workdir, run_config, metrics, study=STUDY)
    return metrics, outcome.history


def _run_fraction(history: pd.DataFrame) -> float:
    """The fraction of gradient parts applied over the whole run, from the per-period
    `train_kept_fraction` of each evaluation row (periods weighted by their steps)."""
    steps = history["step"].diff().fillna(history["step"].iloc[0])
    return float((history["train_kept_fraction"] * steps).sum() / steps.sum())


def run_sweep(config: GradientDropConfig, workdir: str, extra_config: Optional[dict] = None) -> pd.DataFrame:
    """Runs every keep_prob, then writes the combined table, results and figures.

    Returns the combined history (one row per keep_prob and evaluation).
    """
    config.validate()
    image_data = load_data(config)
    check_batch_size(config, image_data)
    held_out = image_data.validation
    logging.info("data: %s from %s (%d train, %d test%s)", config.dataset, image_data.source,
                 len(image_data.train[1]), len(image_data.test[1]),
                 f"; {len(held_out[1])} training images held out, as in the TensorFlow "
                 "tutorial" if held_out is not None else "")
    finals, histories = {}, {}
    sweep = SweepProgress(config.keep_probs, lambda p: f"keep_prob={cli.value_label(p)}")
    for keep_prob in sweep:
        label = cli.value_label(keep_prob)
        finals[label], histories[keep_prob] = run_single(
            config, keep_prob, run_dir(workdir, keep_prob), image_data, sweep)
    tensorboard_views.log_sweep(workdir, [
        (run_dir(workdir, p), {"keep_prob": p, "granularity": config.granularity,
                               "dropped_state": config.dropped_state},
         finals[cli.value_label(p)], histories[p])
        for p in config.keep_probs])
    history = combined_history(histories)
    results.write_csv(os.path.join(workdir, results.HISTORY_FILE), history)
    draw_curves(history, workdir)
    summary = summary_table(finals, config.dataset, config.steps)
    results.write_csv(os.path.join(workdir, "summary.csv"), summary)
    results.atomic_write_text(os.path.join(workdir, "summary.md"), results.markdown_table(summary))
    results.save_results(workdir, {**dataclasses.asdict(config), **(extra_config or {})},
                         {"by_keep_prob": finals}, study=STUDY)
    return history


def draw_curves(history: pd.DataFrame, out_dir: str, suffix: str = "", note: str = "",
                errorbar=("ci", 95)) -> List[str]:
    """results_raw<suffix>.png and results_prorated<suffix>.png: test accuracy per
    keep_prob against batches and against batches x keep_prob; returns their paths."""
    return [plots.learning_curves(history, x=x, hue="keep_prob", errorbar=errorbar,
                                  path=os.path.join(out_dir, f"results_{name}{suffix}.png"),
                                  xlabel=xlabel, title=f"Test accuracy ({label}){note}")
            for name, x, xlabel, label in (
                ("raw", "step", "training batches", "raw"),
                ("prorated", "prorated_step", "training batches x keep_prob", "pro-rated"))]


def seed_figures(histories: Dict[int, pd.DataFrame], out_dir: str) -> List[str]:
    """Raw and pro-rated curves over seeds: the mean per keep_prob, shaded lowest-highest.

    `histories`: {seed: a sweep's combined history (keep_prob, step, test_accuracy)}.
    Writes results_raw_seeds.png and results_prorated_seeds.png into `out_dir`.
    """
    history = pd.concat([h.assign(seed=seed) for seed, h in histories.items()],
                        ignore_index=True)
    history["prorated_step"] = history["step"] * history["keep_prob"]
    os.makedirs(out_dir, exist_ok=True)
    seeds = ", ".join(str(s) for s in histories)
    return draw_curves(history, out_dir, suffix="_seeds", errorbar=("pi", 100),
                       note=f", mean and range over seeds {seeds}")


def combined_history(histories: Dict[float, pd.DataFrame]) -> pd.DataFrame:
    """The runs' histories ({keep_prob: history}) stacked, with `keep_prob` and
    `prorated_step` columns."""
    frames = []
    for keep_prob, history in histories.items():
        frame = history.copy()
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
