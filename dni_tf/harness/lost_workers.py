"""A pipelined DNI run that survives a lost worker: a Keras callback for `fit()`.

`LostWorkerHandler` watches a `PipelinedDNIClassifier` whose blocks live on the
tasks of a TensorFlow cluster (`dni_tf.pipelined_cluster`):

* it writes a rejoin checkpoint (`<checkpoint_dir>/rejoin.weights.h5`, every
  variable, atomically replaced) at train begin and every `checkpoint_every`
  steps while every block is alive;
* when a step fails because a worker task is gone (`LOST_WORKER_ERRORS`, and
  the message names the task or its port no longer accepts connections), it
  logs one warning line, drops the blocks on that task
  (`pipelined_cluster.lose_block`: the blocks below keep training, that
  block's updates are lost), and retries the step on the next batch (the
  batch of the failed step is skipped);
* every `probe_seconds` it tries a TCP connection to the lost task (no
  TensorFlow call); once the port is open it reconnects and brings the block
  back into the running model from the newest checkpoint
  (`pipelined_cluster.rejoin_in_place`: the returning block's variables from
  the checkpoint, every other variable as it is now), one info line;
* an evaluation needs every block: if one is lost when `fit()` starts
  evaluating, it waits (probing) up to `wait_seconds` for the worker, then
  raises `WorkerLost`; a worker that dies during an evaluation is dropped and
  waited for the same way, and the evaluation goes on without the test batch
  that failed (a warning says so; not tested);
* TensorBoard: the scalar `cluster/blocks_alive` at train begin, at each loss
  and at each rejoin.

Use it after the callback that restores a resumed run's checkpoint (in
`train_and_evaluate` pass it in `callbacks=`). A worker killed in the middle
of a step can leave an operation pending on it whose error surfaces at the
next read once the worker is back; the handler reads each step's logs itself
(`_read`), so that error reaches it, not Keras' loop; it reads each batch
itself too, outside the step, since a step cancelled while it reads from the
tf.data iterator cancels the iterator (`_next_batch`); and since Keras waits
for every pending operation when an epoch's batches end, a lost block is
waited for (up to `wait_seconds`) after the epoch's last batch rather than
at the evaluation (docs/pipelined_dni.md, "A lost worker"). A save of
`ResumableCheckpoint` needs every block too: given `retry_after_rejoin` as its
guard (`train_and_evaluate(checkpoint_guard=...)`), a worker lost during the
save is dropped, waited for (up to `wait_seconds`) and the save is redone.
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Optional

import keras
import tensorflow as tf
from absl import logging

from dni_tf import pipelined_cluster
from dni_tf.errors import CheckpointError, WorkerLost
from dni_tf.harness.callbacks import ResumableCheckpoint, checkpoint_step, save

REJOIN_CHECKPOINT = "rejoin.weights.h5"


def _sync() -> None:
    """Waits for the pending (remote) ops of this process; raises their errors.

    Private TensorFlow API (`context.async_wait`): with remote devices an op's
    error can surface at a later op, e.g. while Keras reads the step's logs.
    """
    from tensorflow.python.eager import context

    context.async_wait()


def _read(logs):
    """The step's logs as numpy values, read here rather than by Keras.

    Keras reads the logs right after each call (to hand them to the callbacks).
    With remote devices that read is where the error of an operation left
    pending on a dead worker by a step that failed midway surfaces once the
    worker is back ("Unable to find a context_id"): reading here puts it inside
    the handler's try, so it is handled like any failed step instead of ending
    fit().
    """
    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, logs)


def _next_batch(iterator) -> list:
    """The next batch of a Keras epoch's input, read here rather than in the compiled step.

    Keras' step function reads its batch from the tf.data iterator inside the
    function when handed the iterator, and runs the step on the batches when
    handed a list. A step cancelled by a dead worker while it waits on the
    input cancels the iterator with it: the prefetch thread stops, and after
    the batches already buffered the epoch's input ends (OutOfRangeError, which
    Keras takes for the end of the data). Read here, the batch is never part of
    a step that can be cancelled. StopIteration at the real end of the data
    ends the epoch as usual. (Handed batches, the step traces once more for a
    last, smaller test batch, as Keras' `test_on_batch` would.)
    """
    return [next(iterator)]


def _join(items) -> str:
    return ", ".join(map(str, items))


def _blocks(blocks) -> str:
    return ("block " if len(blocks) == 1 else "blocks ") + _join(blocks)


class LostWorkerHandler(keras.callbacks.Callback):
    """Drops the blocks of a dead worker task and brings them back when it returns.

    Args:
      make_model: builds and compiles the same model (same devices) with every
        variable created (`dni_tf.core.build_for_restore`); called after
        reconnecting, once per rejoin.
      checkpoint_dir: where the rejoin checkpoint is written; a rejoin uses the
        newest (by step) of it and the `ResumableCheckpoint` files there.
      checkpoint_every: steps between rejoin checkpoints (a returning block
        loses at most this many of its own updates besides the outage).
      probe_seconds: time between probes of a lost worker.
      wait_seconds: how long an evaluation waits for a lost worker.
      log_dir: TensorBoard directory for `cluster/blocks_alive` (None: none).
      resolver: the cluster resolver (default: TF_CONFIG).

    After training, `events` lists what happened: dicts with `event` ("lost"
    or "rejoined"), `step`, `blocks`, `tasks` and timings in seconds.
    """

    MAX_RETRIES = 3  # failed steps in a row, while a block is lost, before giving up
    SETTLE_PROBES = 20  # probes 0.1 s apart when an error names no task

    def __init__(self, make_model: Callable[[], keras.Model], checkpoint_dir: str,
                 checkpoint_every: int = 50, probe_seconds: float = 2.0,
                 wait_seconds: float = 600.0, log_dir: Optional[str] = None, resolver=None):
        super().__init__()
        if checkpoint_every < 1 or probe_seconds <= 0 or wait_seconds < 0:
            raise ValueError("checkpoint_every >= 1, probe_seconds > 0 and wait_seconds >= 0")
        self.make_model = make_model
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = int(checkpoint_every)
        self.probe_seconds = float(probe_seconds)
        self.wait_seconds = float(wait_seconds)
        self.resolver = resolver
        self.writer = None if log_dir is None else tf.summary.create_file_writer(
            log_dir, filename_suffix=".lost_workers")
        self.events: List[dict] = []
        self.step = 0
        self._inner = self._inner_test = None
        self._next_probe = 0.0
        self._lost_at = None  # (monotonic time, step) of the loss

    # ----------------------------------------------------------------- helpers
    @property
    def path(self) -> str:
        return os.path.join(self.checkpoint_dir, REJOIN_CHECKPOINT)

    def _blocks_alive(self) -> int:
        return len(self.model.block_slices) - len(self.model.lost_blocks)

    def _scalar(self) -> None:
        if self.writer is not None:
            with self.writer.as_default(step=self.step):
                tf.summary.scalar("cluster/blocks_alive", float(self._blocks_alive()))
            self.writer.flush()

    def _tasks(self, blocks) -> List[int]:
        return sorted({pipelined_cluster.task_of(self.model.devices[j]) for j in blocks})

    def _install(self) -> None:
        """Wraps the model's (re)traced train and test functions so a failed step is caught."""
        model = self.model
        if model.train_function is not None and model.train_function != self._guarded_step:
            self._inner = model.train_function
            model.train_function = self._guarded_step
        if model.test_function is not None and model.test_function != self._guarded_test:
            self._inner_test = model.test_function
            model.test_function = self._guarded_test

    def _guarded_step(self, iterator):
        retries = 0
        while True:
            batch = _next_batch(iterator)
            start = time.monotonic()
            try:
                logs = self._inner(batch)
                if not self.model.lost_blocks:
                    # Remote ops may fail after the call returns: raise here, not in fit().
                    # Not while a block is lost: an operation of the failed step may stay
                    # pending on the dead task until it is back (see _try_rejoin).
                    _sync()
                return _read(logs)
            except pipelined_cluster.LOST_WORKER_ERRORS as exc:
                tf.experimental.async_clear_error()
                # The failed step's batch is skipped; this step trains on the next one.
                if self._lose(exc, time.monotonic() - start):
                    continue
                if not self.model.lost_blocks or retries >= self.MAX_RETRIES:
                    raise
                # With a block lost, a step can still fail because of the lost task: a
                # late reply of the dead one, or the restarted worker refusing this
                # client's old context ("Unable to find a context_id"). Rejoin now if
                # it listens again, else go on without it.
                retries += 1
                logging.info("step %d failed while %s is lost (%s); %s", self.step,
                             _blocks(self.model.lost_blocks), type(exc).__name__,
                             "rejoined" if self._try_rejoin() else "retrying")

    def _guarded_test(self, iterator):
        while True:
            batch = _next_batch(iterator)
            start = time.monotonic()
            try:
                logs = self._inner_test(batch)
                _sync()
                return _read(logs)
            except pipelined_cluster.LOST_WORKER_ERRORS as exc:
                tf.experimental.async_clear_error()
                if not self._lose(exc, time.monotonic() - start):
                    raise
                self._wait_for_rejoin()
                logging.warning("the evaluation at step %d skips the test batch that was being "
                                "evaluated when the worker died", self.step)

    def _lose(self, exc: BaseException, seconds: float) -> bool:
        blocks = pipelined_cluster.dead_blocks(self.model, exc, self.addresses)
        for _ in range(self.SETTLE_PROBES):
            if blocks:
                break
            # A dying worker resets its connections before its port closes: probe again.
            time.sleep(0.1)
            blocks = pipelined_cluster.dead_blocks(self.model, None, self.addresses)
        if not blocks:
            return False
        tasks = self._tasks(blocks)
        if self.model.method == "backprop" or self.model.unlock != "update":
            raise WorkerLost(
                f"worker task {_join(tasks)} lost at step {self.step}: "
                f"{'backprop is locked' if self.model.method == 'backprop' else 'complete unlock'}"
                " cannot train without a block; rerun to resume from the last checkpoint") from exc
        for j in blocks:
            pipelined_cluster.lose_block(self.model, j)
        self._install()
        self._lost_at = (time.monotonic(), self.step)
        self._next_probe = time.monotonic() + self.probe_seconds
        alive = [j for j in range(len(self.model.block_slices)) if j not in self.model.lost_blocks]
        logging.warning(
            "worker task %s lost at step %d (%s, %.1f s into the step): %s dropped, %s on; "
            "probing %s every %g s", _join(tasks), self.step, type(exc).__name__, seconds,
            _blocks(blocks), _blocks(alive) + (" trains" if len(alive) == 1 else " train"),
            ", ".join(self.addresses.get(t, "?") for t in tasks), self.probe_seconds)
        self.events.append({"event": "lost", "step": self.step, "blocks": blocks, "tasks": tasks,
                            "error": type(exc).__name__, "detect_seconds": round(seconds, 3)})
        self._scalar()
        return True

    def newest_checkpoint(self):
        """(path, step) of the newest checkpoint in `checkpoint_dir`; CheckpointError if none."""
        candidates = [p for _, p in ResumableCheckpoint.checkpoints(self.checkpoint_dir)[:1]]
        if os.path.exists(self.path):
            candidates.append(self.path)
        # Step 0 (the train-begin checkpoint) is a step; -1 only for a file without one.
        steps = [(-1 if (step := checkpoint_step(p)) is None else step, p) for p in candidates]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.checkpoint_dir} to rejoin from")
        step, path = max(steps)
        return path, step

    def _save(self) -> None:
        tmp = os.path.join(self.checkpoint_dir, "rejoin-tmp.weights.h5")
        try:
            save(self.model, tmp, step=self.step)
            os.replace(tmp, self.path)
        except pipelined_cluster.LOST_WORKER_ERRORS as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not self._lose(exc, 0.0):
                raise

    def _try_rejoin(self) -> bool:
        """Probes the lost tasks; rejoins when all listen again. True once rejoined."""
        self._next_probe = time.monotonic() + self.probe_seconds
        blocks = list(self.model.lost_blocks)
        tasks = self._tasks(blocks)
        if not all(pipelined_cluster.worker_alive(self.addresses[t]) for t in tasks
                   if t in self.addresses):
            return False
        path, step = self.newest_checkpoint()
        start = time.monotonic()
        try:
            try:
                # The returning worker refuses what the failed step left pending on the
                # dead one ("Unable to find a context_id"): let that error out here.
                _sync()
            except pipelined_cluster.LOST_WORKER_ERRORS:
                tf.experimental.async_clear_error()
            pipelined_cluster.rejoin_in_place(self.model, self.make_model, path,
                                              resolver=self.resolver)
        except pipelined_cluster.LOST_WORKER_ERRORS as exc:  # listening, not serving yet
            logging.info("worker task %s answers but cannot rejoin yet (%s); retrying in %g s",
                         _join(tasks), type(exc).__name__, self.probe_seconds)
            return False
        self._install()
        seconds = time.monotonic() - start
        lost_time, lost_step = self._lost_at
        logging.info(
            "worker task %s back: %s rejoined at step %d from %s (step %d) in %.1f s; "
            "%d steps without it (%.1f s)", _join(tasks), _blocks(blocks), self.step, path,
            step, seconds, self.step - lost_step, time.monotonic() - lost_time)
        self.events.append({"event": "rejoined", "step": self.step, "blocks": blocks,
                            "tasks": tasks, "checkpoint_step": step,
                            "rejoin_seconds": round(seconds, 3),
                            "outage_seconds": round(time.monotonic() - lost_time, 3),
                            "steps_without": self.step - lost_step})
        self._lost_at = None
        self._scalar()
        return True

    # ----------------------------------------------------------------- callback
    def on_train_begin(self, logs=None):
        model = self.model
        if not getattr(model, "devices", None) or not hasattr(model, "lost_blocks"):
            raise ValueError("LostWorkerHandler needs a PipelinedDNIClassifier with devices")
        if int(model.steps_per_execution) != 1:
            raise ValueError("LostWorkerHandler needs steps_per_execution=1 in compile(): it "
                             "drops a dead worker's block between steps")
        self.addresses = pipelined_cluster.task_addresses(self.resolver)
        self.step = int(model.optimizer.iterations.numpy())
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self._save()
        self._install()
        self._scalar()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.model.lost_blocks:
            steps = (self.params or {}).get("steps")
            if self.model.stop_training or (steps and batch + 1 >= steps):
                # The epoch's last batch: Keras now waits for every pending operation
                # (where an op left on the dead worker fails once it is back, outside
                # this callback) and then evaluates, which needs every block anyway.
                self._wait_for_rejoin()
            elif time.monotonic() >= self._next_probe:
                self._try_rejoin()
        elif self.step % self.checkpoint_every == 0:
            self._save()

    def on_test_begin(self, logs=None):
        self._install()  # evaluate() may have made the test function just now
        if self.model.lost_blocks:
            self._wait_for_rejoin()

    def retry_after_rejoin(self, action: Callable[[], None]) -> None:
        """Runs `action` (which needs every block, e.g. a checkpoint save); when a
        worker dies during it, drops that worker's blocks, waits (up to
        `wait_seconds`) for them to rejoin and runs `action` again.

        Raises `WorkerLost` when the worker does not come back in time, and the
        original error when it names no lost task.
        """
        while True:
            try:
                return action()
            except pipelined_cluster.LOST_WORKER_ERRORS as exc:
                tf.experimental.async_clear_error()
                if not self._lose(exc, 0.0):
                    raise
                logging.warning("the checkpoint save at step %d failed: it is redone once %s "
                                "rejoins", self.step, _blocks(self.model.lost_blocks))
                self._wait_for_rejoin("the checkpoint save")

    def _wait_for_rejoin(self, what: str = "the evaluation") -> None:
        deadline = time.monotonic() + self.wait_seconds
        logging.info("%s at step %d waits up to %g s for %s", what, self.step,
                     self.wait_seconds, _blocks(self.model.lost_blocks))
        while not self._try_rejoin():
            if time.monotonic() >= deadline:
                raise WorkerLost(
                    f"worker task {_join(self._tasks(self.model.lost_blocks))} "
                    f"did not come back within {self.wait_seconds:g} s ({what} at step "
                    f"{self.step} needs every block); rerun to resume from the last checkpoint")
            time.sleep(self.probe_seconds)

    def on_train_end(self, logs=None):
        # A later fit() or evaluate() gets the plain functions.
        if self.model.train_function == self._guarded_step:
            self.model.train_function = self._inner
        if self.model.test_function == self._guarded_test:
            self.model.test_function = self._inner_test
