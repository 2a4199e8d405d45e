"""Keras callbacks shared by every experiment.

* `EvaluationLogger`: one `history.csv` row and one set of TensorBoard scalars per
  evaluation, indexed by training step (not epoch); rows are rewritten atomically
  so a resumed run never duplicates or half-writes a row.
* `ResumableCheckpoint`: atomically written, fsynced and checksummed
  `.weights.h5` checkpoints (weights, optimizer slots, every other model
  variable such as algorithm state, and the SeedGenerator states that Keras'
  save_weights leaves out) from which a rerun resumes exactly; an unreadable
  newest checkpoint falls back to the newest one that reads back.
* `DivergenceGuard`: stops the run with `TrainingDiverged` when the loss or any
  other training metric is NaN/inf, before the bad state is checkpointed.
* `ProgressLogger`: a periodic log line with step, rate and ETA; inside a
  `SweepProgress` loop it also shows the run's place in the sweep and the whole
  sweep's ETA.

In `fit()` one "epoch" is one evaluation period of `eval_every` steps; the last
period of a run whose steps are not a multiple of `eval_every` is shorter (see
`EvaluationSchedule`, which the callbacks take to turn epochs into steps).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
import re
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from absl import logging

from dni_tf.harness import results, tensorboard_views, timing
from dni_tf.errors import CheckpointError, TrainingDiverged


@dataclasses.dataclass(frozen=True)
class EvaluationSchedule:
    """Which training step each fit() epoch (evaluation period) ends at.

    Epoch `first_epoch` starts at step `first_step` (a resumed run: the
    checkpoint's epochs and step); each period is `eval_every` steps long,
    except the last, which ends at `total_steps`. A fresh run, or one resumed
    from a checkpoint at a multiple of `eval_every`, evaluates at every multiple
    of `eval_every` below `total_steps` and at `total_steps`.
    """

    eval_every: int
    total_steps: Optional[int] = None
    first_epoch: int = 0
    first_step: int = 0

    def start_step(self, epoch: int) -> int:
        return self.first_step + (epoch - self.first_epoch) * self.eval_every

    def end_step(self, epoch: int) -> int:
        step = self.start_step(epoch) + self.eval_every
        return step if self.total_steps is None else min(step, self.total_steps)

    def epochs(self) -> int:
        """The fit() `epochs` argument: one past the epoch that reaches `total_steps`."""
        remaining = max(self.total_steps - self.first_step, 0)
        return self.first_epoch + -(-remaining // self.eval_every)


def period_end_step(epoch: int, eval_every: int,
                    schedule: Optional[EvaluationSchedule] = None) -> int:
    """The training step at the end of fit() epoch `epoch` (0-based): `schedule`'s, else
    `(epoch + 1) * eval_every`."""
    return (epoch + 1) * eval_every if schedule is None else schedule.end_step(epoch)


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
    """Writes `history.csv`, `timing.csv` and TensorBoard scalars at each evaluation.

    After the first evaluation of each `fit()` it also writes the run's
    custom-scalar layout (`dni_tf.harness.tensorboard_views.write_scalar_layout`).

    Args:
      workdir: run directory; `history.csv`, `timing.csv` (each evaluation
        period's wall time and machine: `dni_tf.harness.timing`) and the
        TensorBoard event files go there (directly, so `tensorboard --logdir
        SWEEP_ROOT` names the run by its folder; event files of the old
        `workdir/tensorboard/` are moved up).
      eval_every: training steps per fit() epoch, to turn epochs into steps.
      eval_prefix: column prefix of the validation_data metrics ("test"/"val").
      extra_metrics: optional `fn(model) -> dict` evaluated at each evaluation
        (e.g. accuracy on a second split); its keys become columns.
    """

    def __init__(self, workdir: str, eval_every: int, eval_prefix: str = "test",
                 extra_metrics=None, schedule: Optional[EvaluationSchedule] = None):
        super().__init__()
        self.path = os.path.join(workdir, results.HISTORY_FILE)
        self.eval_every = eval_every
        self.schedule = schedule  # epochs -> steps when periods are not all eval_every long
        self.eval_prefix = eval_prefix
        self.extra_metrics = extra_metrics
        tensorboard_views.adopt_legacy_events(workdir)
        self.writer = tf.summary.create_file_writer(workdir)
        self._layout_written = False
        # The run's whole history, earlier processes included: read once here
        # (a resumed run), then kept in memory and rewritten at each evaluation.
        self.history = results.load_history(workdir)
        self.timing_path = os.path.join(workdir, timing.TIMING_FILE)
        self.timing = timing.load_timing(workdir)
        self._machine = timing.machine_description()
        self._period_began = time.time()

    def on_train_begin(self, logs=None):
        self._period_began = time.time()

    def on_epoch_end(self, epoch, logs=None):
        step = period_end_step(epoch, self.eval_every, self.schedule)
        row = {"step": step, **split_logs(logs, self.eval_prefix)}
        if self.extra_metrics is not None:
            row.update({k: float(v) for k, v in self.extra_metrics(self.model).items()})
        tags = []
        with self.writer.as_default(step=step):
            for key, value in row.items():
                if key != "step":
                    tags.append(tensorboard_views.column_tag(key))
                    tf.summary.scalar(tags[-1], value)
            if not self._layout_written:  # the tags are known after the first evaluation
                tensorboard_views.write_scalar_layout(tags, self.model, step=step)
                self._layout_written = True
        self.writer.flush()
        self.history = _rewritten_from(self.history, step, pd.DataFrame([row]))
        results.write_csv(self.path, self.history)
        now = time.time()
        self.timing = _rewritten_from(self.timing, step, pd.DataFrame(
            [(step, now - self._period_began, self._machine)], columns=list(timing.COLUMNS)))
        results.write_csv(self.timing_path, self.timing)
        self._period_began = now


def _rewritten_from(frame: pd.DataFrame, step: int, row: pd.DataFrame) -> pd.DataFrame:
    """`frame`'s rows before `step`, then `row`: a resumed run replaces what it retrains."""
    earlier = frame[frame["step"].astype(int) < step]
    return pd.concat([earlier, row], ignore_index=True) if len(earlier) else row


class ResumableCheckpoint(keras.callbacks.Callback):
    """Saves every model variable after each evaluation; restores at train begin.

    Checkpoints are `ckpt-{epochs}.weights.h5` (`epochs`: evaluation periods
    completed; the training step is stored inside, see `checkpoint_step`),
    written to `tmp-{pid}.weights.h5`,
    fsynced and renamed (then the directory is fsynced), so a kill never leaves a
    partial checkpoint under the real name; the temporary a kill leaves behind is
    deleted at the next train begin. Each checkpoint carries a checksum of its
    contents. On resume the newest checkpoint that reads back whole is used:
    newer unreadable ones (truncated, say, by a crash of the filesystem) are
    renamed to `*.corrupt` with one warning line, and when none reads back the
    run fails with `CheckpointError` naming the file.

    Keras builds the model and its optimizer before `on_train_begin`, which is
    where the restore happens; models with extra optimizers or state must create
    their variables in `build()`.

    `guard`, if given, runs each save: `guard(write)` must call `write()` (it may
    call it again after a failure it repaired, e.g.
    `LostWorkerHandler.retry_after_rejoin` waits for a lost worker's blocks).
    """

    _PATTERN = re.compile(r"^ckpt-(\d+)\.weights\.h5$")
    TEMPORARY_GLOB = "tmp-*.weights.h5"
    CORRUPT_SUFFIX = ".corrupt"

    def __init__(self, directory: str, keep: int = 2,
                 schedule: Optional[EvaluationSchedule] = None,
                 guard: Optional[Callable[[Callable[[], None]], None]] = None):
        super().__init__()
        self.directory = directory
        self.keep = keep
        self.schedule = schedule  # gives the step stored in each checkpoint
        self.guard = guard
        os.makedirs(directory, exist_ok=True)

    @classmethod
    def checkpoints(cls, directory: str) -> List[Tuple[int, str]]:
        """`(epochs, path)` of every checkpoint file in `directory`, newest first."""
        found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(directory, "ckpt-*.weights.h5"))
                 if (m := cls._PATTERN.match(os.path.basename(p)))]
        return sorted(found, reverse=True)

    @classmethod
    def latest(cls, directory: str) -> Tuple[int, Optional[str]]:
        """`(epochs, path)` of the newest checkpoint that reads back whole; `(0, None)` if none exists.

        Newer checkpoints that do not read back are renamed to `*.corrupt` (one
        warning line names them and the checkpoint used instead), so the next
        save and the pruning of old checkpoints never see them.

        Raises:
          dni_tf.errors.CheckpointError: there are checkpoints but none reads back.
        """
        bad = []
        for epochs, path in cls.checkpoints(directory):
            problem = verify(path)
            if problem is None:
                if bad:
                    for bad_path, _ in bad:
                        os.replace(bad_path, bad_path + cls.CORRUPT_SUFFIX)
                    results.fsync_directory(directory)
                    logging.warning(
                        "checkpoint %s is unreadable (%s): moved it aside to *%s; resuming "
                        "from %s instead", ", ".join(p for p, _ in bad), bad[0][1],
                        cls.CORRUPT_SUFFIX, path)
                return epochs, path
            bad.append((path, problem))
        if bad:
            older = f"; the {len(bad) - 1} older one(s) do not read back either" if len(bad) > 1 else ""
            raise CheckpointError(
                f"cannot resume: checkpoint {bad[0][0]} is unreadable ({bad[0][1]}){older}; "
                f"remove {directory} to start the run over")
        return 0, None

    @classmethod
    def completed_epochs(cls, directory: str) -> int:
        """Epochs (evaluation periods) in the checkpoint a resume loads (`latest`), 0 if none."""
        return cls.latest(directory)[0]

    @classmethod
    def resume_point(cls, directory: str, eval_every: int) -> Tuple[int, int]:
        """`(epochs, step)` of the checkpoint a resume loads (`latest`); `(0, 0)` if none.

        The step is the one stored in the checkpoint; one written before steps
        were stored counts `epochs * eval_every`.
        """
        epochs, path = cls.latest(directory)
        if path is None:
            return 0, 0
        step = checkpoint_step(path)
        return epochs, (epochs * eval_every if step is None else step)

    def _path(self, epochs: int) -> str:
        return os.path.join(self.directory, f"ckpt-{epochs:07d}.weights.h5")

    def on_train_begin(self, logs=None):
        for stale in glob.glob(os.path.join(self.directory, self.TEMPORARY_GLOB)):
            os.remove(stale)
            logging.info("removed %s, left behind by a killed checkpoint save", stale)
        _, path = self.latest(self.directory)
        if path is not None:
            try:
                restore(self.model, path)
            except Exception as exc:  # noqa: BLE001 - h5py/Keras raise many kinds
                raise CheckpointError(f"cannot resume from checkpoint {path}: "
                                      f"{_first_line(exc)}") from exc
            logging.info("resumed from %s", path)

    def on_epoch_end(self, epoch, logs=None):
        path = self._path(epoch + 1)
        tmp = os.path.join(self.directory, f"tmp-{os.getpid()}.weights.h5")
        step = None if self.schedule is None else self.schedule.end_step(epoch)

        def write():
            try:
                save(self.model, tmp, step=step)
                results.fsync_file(tmp)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise

        if self.guard is None:
            write()
        else:
            self.guard(write)
        results.fsync_directory(self.directory)
        for _, old in self.checkpoints(self.directory)[self.keep:]:
            os.remove(old)


_RNG_GROUP = "dni_tf_rng_state"
_CHECKSUM_ATTR = "dni_tf_sha256"
_STEP_ATTR = "dni_tf_step"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _rng_state(model: keras.Model):
    """Variables `save_weights` skips: the states of every SeedGenerator."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _checksum(h5file) -> str:
    """SHA-256 over the name, dtype, shape and bytes of every dataset in the file."""
    import h5py

    digest = hashlib.sha256()

    def add(name, item):
        if isinstance(item, h5py.Dataset):
            value = np.asarray(item[()])
            digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
            digest.update(value.tobytes() if value.dtype != object
                          else repr(value.tolist()).encode())

    h5file.visititems(add)
    return digest.hexdigest()


def save(model: keras.Model, path: str, step: Optional[int] = None) -> None:
    """`model.save_weights(path)` plus the random generators' states and a checksum.

    `step`, the training steps done, is stored for `checkpoint_step`.
    """
    import h5py

    model.save_weights(path)
    with h5py.File(path, "a") as f:
        group = f.create_group(_RNG_GROUP)
        for i, variable in enumerate(_rng_state(model)):
            group.create_dataset(str(i), data=variable.numpy()).attrs["path"] = variable.path
        if step is not None:
            f.attrs[_STEP_ATTR] = int(step)
        f.attrs[_CHECKSUM_ATTR] = _checksum(f)


def checkpoint_step(path: str) -> Optional[int]:
    """The training step stored in a checkpoint by `save`; None if it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        step = f.attrs.get(_STEP_ATTR)
    return None if step is None else int(step)


def verify(path: str) -> Optional[str]:
    """None if the checkpoint at `path` reads back whole, else what is wrong with it (one line).

    Reads every dataset; a checkpoint written by `save` must also match its checksum.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if _RNG_GROUP not in f:
                return "incomplete: it has no random-generator state"
            expected = f.attrs.get(_CHECKSUM_ATTR)
            actual = _checksum(f)
            if expected is not None and expected != actual:
                return "its contents do not match its checksum"
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError...
        return _first_line(exc)
    return None


def restore(model: keras.Model, path: str) -> None:
    """Inverse of `save`; the model (and its optimizers) must be built.

    The optimizer keeps the learning rate it was compiled with, not the
    checkpoint's: a resumed run has the same one, and a fork (`--fork_from`)
    may change it.
    """
    import h5py

    optimizer = getattr(model, "optimizer", None)
    compiled_rates = [(v, v.numpy()) for v in getattr(optimizer, "variables", [])
                      if v.path.split("/")[-1] == "learning_rate"]
    model.load_weights(path)
    for variable, value in compiled_rates:
        variable.assign(value)
    states = _rng_state(model)
    with h5py.File(path, "r") as f:
        group = f.get(_RNG_GROUP)
        if group is None or len(group) != len(states):
            raise ValueError(f"{path}: random-generator state does not match the model "
                             f"({0 if group is None else len(group)} saved, {len(states)} in model)")
        for i, variable in enumerate(states):
            variable.assign(group[str(i)][()])


class DivergenceGuard(keras.callbacks.Callback):
    """Raises `TrainingDiverged` when any training metric of an evaluation period is NaN or inf.

    Every training log value counts (the loss and an algorithm's own metrics,
    e.g. the norm of an accumulator), and so does a positive count named
    `nonfinite_*`: an algorithm's report of NaN/inf gradients or state that
    need not reach the loss (e.g. `ThresholdUpdates`' `nonfinite_steps`: a NaN
    accumulator never fires). The message names the key. Evaluation
    metrics (`val_*`) are not checked. Place it before `ResumableCheckpoint` in
    the callback list so the diverged state is never saved; `checkpoint_dir`
    lets the message name the checkpoint that is kept.
    """

    def __init__(self, eval_every: int, checkpoint_dir: Optional[str] = None,
                 schedule: Optional[EvaluationSchedule] = None):
        super().__init__()
        self.eval_every = eval_every
        self.checkpoint_dir = checkpoint_dir
        self.schedule = schedule  # epochs -> steps when periods are not all eval_every long

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for key in sorted(logs, key=lambda k: k != "loss"):  # the loss first
            if key.startswith("val_"):
                continue
            try:
                value = np.asarray(logs[key], dtype=np.float64)
            except (TypeError, ValueError):
                continue  # not a number
            step = period_end_step(epoch, self.eval_every, self.schedule)
            if not np.all(np.isfinite(value)):
                shown = value.item() if value.size == 1 else value.tolist()
                raise TrainingDiverged(f"{key} became {shown} by step {step}; {self._kept(epoch)}")
            if key.startswith("nonfinite_") and np.any(value > 0):
                raise TrainingDiverged(f"{key}={value.max():g} by step {step}: a gradient or "
                                       f"algorithm state became NaN or inf; {self._kept(epoch)}")

    def _kept(self, epoch: int) -> str:
        if self.checkpoint_dir is None:
            step = period_end_step(epoch - 1, self.eval_every, self.schedule) if epoch else 0
            return f"the last good checkpoint (step {step}) is kept"
        found = ResumableCheckpoint.checkpoints(self.checkpoint_dir)
        if not found:
            return "no checkpoint had been written"
        epochs, path = found[0]
        try:
            step = checkpoint_step(path)
        except Exception:  # noqa: BLE001 - an unreadable file: the step it should have
            step = None
        if step is None:
            step = epochs * self.eval_every
        return f"the last good checkpoint ({path}, step {step}) is kept"


class StopAtLastStep(keras.callbacks.Callback):
    """Ends fit()'s last epoch after `schedule.total_steps`: a short last period.

    fit() epochs all have `steps_per_epoch` = `eval_every` batches; when the
    period `schedule` gives an epoch is shorter (the run's last), training stops
    after its last batch and Keras still evaluates and ends the epoch, so one
    fit() call and one pass over the data stream cover the whole run.
    """

    def __init__(self, schedule: EvaluationSchedule):
        super().__init__()
        self.schedule = schedule
        self._length = schedule.eval_every

    def on_epoch_begin(self, epoch, logs=None):
        self._length = self.schedule.end_step(epoch) - self.schedule.start_step(epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self._length < self.schedule.eval_every and batch + 1 >= self._length:
            self.model.stop_training = True


class SweepProgress:
    """Iterates a sweep's configurations and tracks the whole sweep's progress.

    Each run starts with a `[sweep i/n] <description>` line, and the progress
    lines of a run given the sweep (`train_and_evaluate(..., sweep=sweep)`,
    `ProgressLogger(..., sweep=sweep)`) also show `sweep i/n` and the sweep's
    ETA:

        sweep = SweepProgress(keep_probs, lambda p: f"keep_prob={p:g}")
        for keep_prob in sweep:
            train_and_evaluate(..., sweep=sweep)

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
        start = time.time()
        for index, item in enumerate(self.items):
            self.index = index
            logging.info("[sweep %d/%d] %s", index + 1, len(self.items), self.describe(item))
            yield item
        logging.info("[sweep] %d runs done in %s", len(self.items),
                     _format_seconds(time.time() - start))

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


class ProgressLogger(keras.callbacks.Callback):
    """Logs `step N/M (p%) rate ETA [sweep i/n ETA] metrics` after every evaluation."""

    def __init__(self, total_steps: int, eval_every: int, label: str = "",
                 eval_prefix: str = "test", schedule: Optional[EvaluationSchedule] = None,
                 sweep: Optional[SweepProgress] = None):
        super().__init__()
        self.sweep = sweep  # the sweep this run belongs to: its position and ETA are shown
        self.total_steps = total_steps
        self.eval_every = eval_every
        self.schedule = schedule or EvaluationSchedule(eval_every, total_steps)
        self.label = f"[{label}] " if label else ""
        self.eval_prefix = eval_prefix
        self._start: Optional[float] = None  # when (and at which step) this process began
        self._start_step: Optional[int] = None  # training, over every fit() of the run
        self._epoch_start = 0.0

    def on_train_begin(self, logs=None):
        self._start_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.time()
        if self._start_step is None:
            self._start_step = self.schedule.start_step(epoch)
            self._start = self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        step = self.schedule.end_step(epoch)
        elapsed = max(now - self._start, 1e-9)
        rate = (step - self._start_step) / elapsed
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        sweep = ""
        if self.sweep is not None:
            self.sweep.record(step - self.schedule.start_step(epoch), now - self._epoch_start)
            sweep = " " + self.sweep.position(step, self.total_steps)
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
