"""Keras callbacks shared by every experiment.

* `EvaluationLogger`: one `history.csv` row and one set of TensorBoard scalars per
  evaluation, indexed by training step (not epoch); rows are rewritten atomically
  so a resumed run never duplicates or half-writes a row.
* `ResumableCheckpoint`: atomically written `.weights.h5` checkpoints (weights,
  optimizer slots, every other model variable such as algorithm state, and the
  SeedGenerator states that Keras' save_weights leaves out) from which a rerun
  resumes exactly.
* `DivergenceGuard`: stops the run with `TrainingDiverged` on a NaN/inf loss,
  before the bad state is checkpointed.
* `ProgressLogger`: a periodic log line with step, rate and ETA; inside a
  `SweepProgress` loop it also shows the run's place in the sweep and the whole
  sweep's ETA.

In `fit()` one "epoch" is one evaluation period of `eval_every` steps.
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
from typing import Callable, Dict, Iterable, List, Optional

import keras
import pandas as pd
import tensorflow as tf
from absl import logging

from dni_tf import results, tensorboard_views
from dni_tf.cli import TrainingDiverged


def split_logs(logs: Dict[str, float], eval_prefix: str = "test") -> Dict[str, float]:
    """Keras epoch logs -> history columns: `train_*` and `{eval_prefix}_*`."""
    row = {}
    for key, value in (logs or {}).items():
        value = float(value)
        if key.startswith("val_"):
            row[f"{eval_prefix}_{key[4:]}"] = value
        else:
            row[f"train_{key}"] = value
    return row


class EvaluationLogger(keras.callbacks.Callback):
    """Writes `history.csv` and TensorBoard scalars at each evaluation.

    After the first evaluation of each `fit()` it also writes the run's
    custom-scalar layout (`dni_tf.tensorboard_views.write_scalar_layout`).

    Args:
      workdir: run directory; `history.csv` and `tensorboard/` go there.
      eval_every: training steps per fit() epoch, to turn epochs into steps.
      eval_prefix: column prefix of the validation_data metrics ("test"/"val").
      extra_metrics: optional `fn(model) -> dict` evaluated at each evaluation
        (e.g. accuracy on a second split); its keys become columns.
    """

    def __init__(self, workdir: str, eval_every: int, eval_prefix: str = "test",
                 extra_metrics=None):
        super().__init__()
        self.path = os.path.join(workdir, results.HISTORY_FILE)
        self.eval_every = eval_every
        self.eval_prefix = eval_prefix
        self.extra_metrics = extra_metrics
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
        self._layout_written = False

    def on_epoch_end(self, epoch, logs=None):
        step = (epoch + 1) * self.eval_every
        row = {"step": step, **split_logs(logs, self.eval_prefix)}
        if self.extra_metrics is not None:
            row.update({k: float(v) for k, v in self.extra_metrics(self.model).items()})
        tags = []
        with self.writer.as_default(step=step):
            for key, value in row.items():
                if key != "step":
                    group, _, name = key.partition("_")
                    tags.append(f"{group}/{name}")
                    tf.summary.scalar(tags[-1], value)
            if not self._layout_written:  # the tags are known after the first evaluation
                tensorboard_views.write_scalar_layout(tags, self.model, step=step)
                self._layout_written = True
        self.writer.flush()
        history = results.load_history(os.path.dirname(self.path))
        history = history[history["step"] < step]
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        results.write_csv(self.path, history)


class ResumableCheckpoint(keras.callbacks.Callback):
    """Saves every model variable after each evaluation; restores at train begin.

    Checkpoints are `ckpt-{epoch}.weights.h5`, written to a temporary name and
    renamed, so a kill never leaves a partial checkpoint under the real name.
    Keras builds the model and its optimizer before `on_train_begin`, which is
    where the restore happens; models with extra optimizers or state must create
    their variables in `build()`.
    """

    _PATTERN = re.compile(r"ckpt-(\d+)\.weights\.h5$")

    def __init__(self, directory: str, keep: int = 2):
        super().__init__()
        self.directory = directory
        self.keep = keep
        os.makedirs(directory, exist_ok=True)

    @classmethod
    def completed_epochs(cls, directory: str) -> int:
        """Number of epochs (evaluation periods) in the latest checkpoint, 0 if none."""
        epochs = [int(m.group(1)) for p in glob.glob(os.path.join(directory, "ckpt-*.weights.h5"))
                  if (m := cls._PATTERN.search(p))]
        return max(epochs, default=0)

    def _path(self, epochs: int) -> str:
        return os.path.join(self.directory, f"ckpt-{epochs:07d}.weights.h5")

    def on_train_begin(self, logs=None):
        epochs = self.completed_epochs(self.directory)
        if epochs:
            restore(self.model, self._path(epochs))
            logging.info("resumed from %s", self._path(epochs))

    def on_epoch_end(self, epoch, logs=None):
        path = self._path(epoch + 1)
        tmp = os.path.join(self.directory, f"tmp-{os.getpid()}.weights.h5")
        save(self.model, tmp)
        os.replace(tmp, path)
        for old in sorted(glob.glob(os.path.join(self.directory, "ckpt-*.weights.h5")))[:-self.keep]:
            os.remove(old)


_RNG_GROUP = "dni_tf_rng_state"


def _rng_state(model: keras.Model):
    """Variables `save_weights` skips: the states of every SeedGenerator."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def save(model: keras.Model, path: str) -> None:
    """`model.save_weights(path)` plus the random generators' states."""
    import h5py

    model.save_weights(path)
    with h5py.File(path, "a") as f:
        group = f.create_group(_RNG_GROUP)
        for i, variable in enumerate(_rng_state(model)):
            group.create_dataset(str(i), data=variable.numpy()).attrs["path"] = variable.path


def restore(model: keras.Model, path: str) -> None:
    """Inverse of `save`; the model (and its optimizers) must be built."""
    import h5py

    model.load_weights(path)
    states = _rng_state(model)
    with h5py.File(path, "r") as f:
        group = f.get(_RNG_GROUP)
        if group is None or len(group) != len(states):
            raise ValueError(f"{path}: random-generator state does not match the model "
                             f"({0 if group is None else len(group)} saved, {len(states)} in model)")
        for i, variable in enumerate(states):
            variable.assign(group[str(i)][()])


class DivergenceGuard(keras.callbacks.Callback):
    """Raises `TrainingDiverged` when an evaluation period's loss is NaN or inf.

    Place it before `ResumableCheckpoint` in the callback list so the diverged
    weights are never saved.
    """

    def __init__(self, eval_every: int, key: str = "loss"):
        super().__init__()
        self.eval_every = eval_every
        self.key = key

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.key, 0.0))
        if not math.isfinite(value):
            step = (epoch + 1) * self.eval_every
            raise TrainingDiverged(
                f"{self.key} became {value} by step {step}; the last good checkpoint "
                f"(step {epoch * self.eval_every}) is kept")


class SweepProgress:
    """Iterates a sweep's configurations and tracks the whole sweep's progress.

    While the loop body runs, every `ProgressLogger` line also shows
    `sweep i/n` and the sweep's ETA, and each run starts with a
    `[sweep i/n] <description>` line:

        for keep_prob in SweepProgress(keep_probs, lambda p: f"keep_prob={p:g}"):
            train_and_evaluate(...)

    The ETA assumes every remaining run has as many steps as the current one and
    trains at the rate measured so far in this process; runs read back or
    resumed from a checkpoint cost no time and do not count towards the rate, so
    while later runs are already finished the ETA is an upper bound.
    """

    def __init__(self, items: Iterable, describe: Callable[[object], str] = str):
        self.items = list(items)
        self.describe = describe
        self.index = 0
        self._trained_steps = 0
        self._trained_seconds = 0.0

    def __iter__(self):
        _ACTIVE_SWEEPS.append(self)
        start = time.time()
        try:
            for index, item in enumerate(self.items):
                self.index = index
                logging.info("[sweep %d/%d] %s", index + 1, len(self.items), self.describe(item))
                yield item
            logging.info("[sweep] %d runs done in %s", len(self.items),
                         _format_seconds(time.time() - start))
        finally:
            _ACTIVE_SWEEPS.remove(self)

    def record(self, steps: int, seconds: float) -> None:
        """Adds `steps` trained in `seconds` (one evaluation period) to the rate."""
        self._trained_steps += steps
        self._trained_seconds += seconds

    def eta_seconds(self, run_step: int, run_total_steps: int) -> float:
        """Seconds left in the sweep when the current run is at `run_step`."""
        if not self._trained_steps:
            return float("inf")
        rate = self._trained_steps / max(self._trained_seconds, 1e-9)
        runs_after = len(self.items) - self.index - 1
        return (run_total_steps - run_step + runs_after * run_total_steps) / rate

    def position(self, run_step: int, run_total_steps: int) -> str:
        return (f"sweep {self.index + 1}/{len(self.items)} ETA "
                f"{_format_seconds(self.eta_seconds(run_step, run_total_steps))}")


# The innermost `SweepProgress` loop running now, read by `ProgressLogger`.
_ACTIVE_SWEEPS: List[SweepProgress] = []


class ProgressLogger(keras.callbacks.Callback):
    """Logs `step N/M (p%) rate ETA [sweep i/n ETA] metrics` after every evaluation."""

    def __init__(self, total_steps: int, eval_every: int, label: str = "",
                 eval_prefix: str = "test"):
        super().__init__()
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.label = f"[{label}] " if label else ""
        self.eval_prefix = eval_prefix
        self._start: Optional[float] = None
        self._start_step = 0
        self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        self._start = time.time()
        self._start_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()
        if self._start_step is None:
            self._start_step = epoch * self.eval_every
            self._start = self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        step = (epoch + 1) * self.eval_every
        elapsed = max(now - self._start, 1e-9)
        rate = (step - self._start_step) / elapsed
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        sweep = ""
        if _ACTIVE_SWEEPS:
            _ACTIVE_SWEEPS[-1].record(self.eval_every, now - self._epoch_start)
            sweep = " " + _ACTIVE_SWEEPS[-1].position(step, self.total_steps)
        shown = " ".join(f"{k}={v:.4g}" for k, v in split_logs(logs, self.eval_prefix).items())
        logging.info("%sstep %d/%d (%.0f%%) %.1f steps/s ETA %s%s %s", self.label, step,
                     self.total_steps, 100.0 * step / self.total_steps, rate,
                     _format_seconds(eta), sweep, shown)


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
