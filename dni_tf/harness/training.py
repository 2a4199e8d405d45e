"""The shared `fit()` loop: periodic evaluation, history, TensorBoard, resume.

Every experiment trains through `train_and_evaluate`, so every algorithm gets the
same contract: `history.csv` (one row per evaluation), TensorBoard scalars,
atomic checkpoints after each evaluation, resume on rerun, progress lines and a
clean stop on divergence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import keras
import pandas as pd
import tensorflow as tf
from absl import logging

from dni_tf.core import build_for_restore, prepare_for_multi_worker, zeros_of_spec
from dni_tf.errors import UsageError
from dni_tf.harness import fast_path, results, timing
from dni_tf.harness.callbacks import (DivergenceGuard, EvaluationLogger, EvaluationSchedule,
                                      ProgressLogger, ResumableCheckpoint, StopAtLastStep,
                                      SweepProgress, checkpoint_step)

FORK_FILE = "forked_from.json"


@dataclasses.dataclass
class TrainingOutcome:
    """What `train_and_evaluate` returns.

    `history` has one row per evaluation of the whole run (earlier processes
    included, as in history.csv): `step`, `train_*` and `<eval_prefix>_*`.
    """

    history: pd.DataFrame

    @property
    def final(self) -> Dict[str, float]:
        """The last evaluation (`step` and every metric) as a dict."""
        return {k: (int(v) if k == "step" else float(v))
                for k, v in self.history.iloc[-1].items()}


def train_and_evaluate(model: keras.Model, train_data, eval_data, *, steps: int,
                       eval_every: int, workdir: str, eval_prefix: str = "test",
                       callbacks: Sequence[keras.callbacks.Callback] = (),
                       extra_metrics: Optional[Callable[[keras.Model], Dict[str, float]]] = None,
                       label: str = "", sweep: Optional[SweepProgress] = None,
                       checkpoint_guard: Optional[Callable[[Callable[[], None]], None]] = None,
                       settings: Optional[Mapping[str, Any]] = None,
                       verbose: int = 0) -> TrainingOutcome:
    """Trains a compiled `model` for `steps` steps, evaluating every `eval_every` and at the end.

    Evaluations happen at every multiple of `eval_every` below `steps` and at
    `steps` itself, so `steps` need not be a multiple of `eval_every` (the last
    period is shorter) and an `eval_every` above `steps` evaluates once, at the
    end. One fit() "epoch" is one evaluation period; one fit() call trains the
    whole run (`StopAtLastStep` ends a short last period). A run resumed from a
    checkpoint that is not at a multiple of `eval_every` (it was run with fewer
    steps, or another `eval_every`) evaluates every `eval_every` steps from
    that checkpoint's step.

    Args:
      model: a compiled Keras model (any custom `train_step`/`test_step`).
      train_data: an infinite (repeated) `tf.data.Dataset` whose order depends
        only on its seed; on resume the already-consumed batches are skipped, so
        a resumed run sees the same batches as an uninterrupted one.
      eval_data: a finite dataset evaluated with `test_step` at each evaluation.
      steps: total training steps.
      eval_every: training steps between evaluations.
      workdir: run directory (history.csv, tensorboard/, checkpoints/).
      eval_prefix: history column prefix for `eval_data` metrics.
      callbacks: extra Keras callbacks.
      extra_metrics: optional `fn(model) -> dict` logged at each evaluation.
      label: prefix of the progress lines (e.g. the sweep value).
      sweep: the `SweepProgress` this run belongs to (its position and ETA are
        added to the progress lines).
      checkpoint_guard: runs each checkpoint save (`ResumableCheckpoint`'s
        `guard`), e.g. `LostWorkerHandler.retry_after_rejoin`.
      settings: the run's configuration (field -> value). Recorded in
        `workdir/settings.json`; a rerun that would resume the run under other
        settings (beyond the budget, evaluation and placement settings that
        `results.claim_run_directory` allows), or with fewer `steps` than it has
        trained, raises UsageError before training.

    Returns:
      A `TrainingOutcome`: the run's whole history (also in history.csv) and
      its last row.

    Raises:
      dni_tf.errors.TrainingDiverged: the loss or another training metric became
        NaN/inf (the last good checkpoint is kept).
      dni_tf.errors.CheckpointError: there are checkpoints, but none can be resumed from.
    """
    if steps <= 0 or eval_every <= 0:
        raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be positive")
    os.makedirs(workdir, exist_ok=True)
    results.remove_stale_temporaries(workdir)  # left by a kill during a history.csv write
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    # The checkpoint ResumableCheckpoint restores at train begin (an unreadable
    # newest one is moved aside here), so the data stream skips exactly its steps.
    done_epochs, done_step = ResumableCheckpoint.resume_point(checkpoint_dir, eval_every)
    if settings is not None:
        if done_step > steps:
            raise UsageError(f"{workdir} holds a run trained for {done_step} steps, more than "
                             f"--steps={steps}: rerun with --steps >= {done_step} to resume it, "
                             "or use another --workdir")
        results.claim_run_directory(workdir, settings, trains_on=done_step < steps)
    finished = results.load_results(workdir) if done_step == 0 else None
    if finished and finished.get("status") == "completed":
        # Checkpoints stay on the machine that made them (scripts/archive_runs.py).
        logging.warning("%s holds a finished run but no checkpoint to train it on from: "
                        "it trains again from step 0 to --steps=%d", workdir, steps)
    schedule = EvaluationSchedule(eval_every, steps, first_epoch=done_epochs, first_step=done_step)
    multi_worker = isinstance(tf.distribute.get_strategy(),
                              tf.distribute.MultiWorkerMirroredStrategy)
    # Every variable before fit() traces the step: a checkpoint can be restored
    # into it, and the step is traced once (Keras alone would create optimizer
    # slots and metrics inside the first trace and trace again; plain Keras
    # models such as targeted dropout's MLP lack `BuildsBeforeTracing`).
    batch = zeros_of_spec(train_data.element_spec)
    if batch is not None:
        build_for_restore(model, batch)
    if multi_worker:
        prepare_for_multi_worker(model)
    _align_steps_per_execution(model, eval_every, steps - done_step)
    # One fit() and one iterator over train_data: a second iterator over the
    # same dataset would draw another shuffle order. A finished run (or one
    # asked for fewer steps than it has) runs no epochs; the checkpoint is
    # still restored at train begin.
    evaluation_logger = EvaluationLogger(workdir, eval_every, eval_prefix, extra_metrics,
                                         schedule=schedule)
    model.fit(
        train_data.skip(done_step),
        epochs=schedule.epochs(),
        initial_epoch=done_epochs,
        steps_per_epoch=eval_every,
        validation_data=eval_data,
        callbacks=[
            StopAtLastStep(schedule),
            DivergenceGuard(eval_every, checkpoint_dir, schedule=schedule),
            evaluation_logger,
            ResumableCheckpoint(checkpoint_dir, schedule=schedule, guard=checkpoint_guard),
            ProgressLogger(steps, eval_every, label, eval_prefix, schedule=schedule, sweep=sweep),
            *callbacks,
        ],
        shuffle=False,  # the dataset shuffles itself (seeded)
        verbose=verbose,
    )
    return TrainingOutcome(evaluation_logger.history)


def fork_run(source: str, workdir: str) -> int:
    """Starts the run in `workdir` from the newest checkpoint of the run in `source`.

    Copies that checkpoint (every model variable: weights, optimizer state,
    carried state, curriculum, the step) and the history and timing rows up to
    its step,
    and records `forked_from.json` (`source`, `step`, the source's settings).
    `train_and_evaluate` in `workdir` then resumes from it under the settings it
    is given, which may differ from the source's (an ablation from a shared
    point: the fork sees the batches the source would have seen). `source` is
    only read. Rerunning a fork that already trained resumes it; one killed
    before its checkpoint landed is copied again. Returns the step forked at.

    Raises:
      UsageError: `workdir` holds another run (or a fork of another source), or
        `source` has no checkpoint.
      dni_tf.errors.CheckpointError: `source` has checkpoints, none readable.
    """
    source, workdir = os.path.abspath(source), os.path.abspath(workdir)
    if source == workdir:
        raise UsageError(f"--fork_from={source} is --workdir itself: fork into a new directory")
    source_checkpoints = os.path.join(source, "checkpoints")
    checkpoints = os.path.join(workdir, "checkpoints")
    record_path = os.path.join(workdir, FORK_FILE)
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["source"] != source:
            raise UsageError(f"--workdir={workdir} was forked from {record['source']}, not "
                             f"{source}: fork into a new directory")
        if ResumableCheckpoint.checkpoints(checkpoints):
            return int(record["step"])  # the fork trained: resume it
    elif (ResumableCheckpoint.checkpoints(checkpoints)
          or any(os.path.exists(os.path.join(workdir, name))
                 for name in (results.SETTINGS_FILE, results.HISTORY_FILE))):
        raise UsageError(f"--workdir={workdir} already holds a run: fork into a new directory")
    epochs, path = ResumableCheckpoint.latest(source_checkpoints)
    if path is None:
        raise UsageError(f"--fork_from={source}: no checkpoint to start from in "
                         f"{source_checkpoints}")
    step = checkpoint_step(path)
    settings = results.saved_settings(source) or {}
    if step is None:  # written before checkpoints stored their step
        step = epochs * int(settings.get("eval_every", 0))
    if step <= 0:
        raise UsageError(f"--fork_from={source}: its checkpoint {path} does not say its step")
    # The record first: a fork killed before its checkpoint lands is copied again.
    results.write_json(record_path, {"source": source, "step": step,
                                     "checkpoint": os.path.basename(path),
                                     "source_settings": settings})
    history = results.load_history(source)
    results.write_csv(os.path.join(workdir, results.HISTORY_FILE),
                      history[history["step"] <= step])
    source_timing = timing.load_timing(source)
    if len(source_timing):  # the time the shared part took, as its history rows
        results.write_csv(os.path.join(workdir, timing.TIMING_FILE),
                          source_timing[source_timing["step"].astype(int) <= step])
    os.makedirs(checkpoints, exist_ok=True)
    temporary = os.path.join(checkpoints, f"tmp-{os.getpid()}.weights.h5")
    shutil.copyfile(path, temporary)
    results.fsync_file(temporary)
    os.replace(temporary, os.path.join(checkpoints, os.path.basename(path)))
    results.fsync_directory(checkpoints)
    return step


def _align_steps_per_execution(model: keras.Model, eval_every: int, remaining: int) -> None:
    """Lowers the model's steps per call, with one logged line, when an evaluation
    period of this fit() is not a whole number of calls (a resume from a checkpoint
    written with another --eval_every or --steps); the study configs refuse such
    values up front, so this only acts on resumes."""
    k = int(getattr(model, "steps_per_execution", 1) or 1)
    periods = (eval_every, remaining % eval_every)
    if k > 1 and remaining > 0 and any(p % k for p in periods if p):
        new = fast_path.default_steps_per_execution(periods, cap=k)
        fast_path.log_once([f"steps_per_execution {k} -> {new}: this run's evaluation "
                            f"periods are {sorted({p for p in periods if p})} steps"])
        model.steps_per_execution = new
        model.train_function = None  # retraced with the new number of steps per call
