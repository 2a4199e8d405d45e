"""Chief (task 0) of a two-process pipelined DNI cluster on 127.0.0.1, for the tests.

    TF_CONFIG=<cluster, task 0> python tests/pipelined_cluster_chief.py OUT.npz

Starts worker task 1 itself (`python -m dni_tf.pipelined_cluster`, TF_CONFIG
task 1, one thread, exits with this process), connects, and trains a 2-block
cDNI FCN pipelined over "/job:worker/task:0" and "/job:worker/task:1".
First 6 steps, then every variable goes to OUT.npz (to compare with two
devices in one process); the same 6 steps of a fresh model under
mixed_bfloat16 go to OUT.bf16.npz. Then: a checkpoint, 1 step, SIGKILL the worker, the
next step fails, block 1 is marked lost, 2 steps train block 0 alone, the
worker is restarted and rejoins from the checkpoint, 2 more steps; OUT.json
says what happened.

Then the study (`run_single` with `cluster=True`, so `LostWorkerHandler`
drives the cycle inside `fit()`) on the same worker, 30 steps of digits; after
step 6 the worker is killed; two steps after the loss it is restarted (and
this waits until it listens); the handler's probe brings block 1 back.
`KillAndRestart` records every variable after each step, so the returning
block can be compared with the checkpoint it was restored from;
OUT.study.json says what happened.

Last, a second study run in which a worker failure escapes the handler:
`FailOutsideTheStep` kills the worker at the end of the first evaluation
period (after the checkpoint), reads a variable of block 1 (which raises),
restarts the worker and re-raises; `run_single` waits for the worker,
reconnects and resumes from the checkpoint in the same process.
OUT.restart.json says what happened.
"""

import glob
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dni_tf import pipelined_cluster  # noqa: E402
from dni_tf.dni_feedforward import fcn_layers  # noqa: E402
from dni_tf.pipelined_dni import PipelinedDNIClassifier  # noqa: E402

BATCH = 8


def data(steps=12):
    rng = np.random.RandomState(0)
    return [(rng.rand(BATCH, 6).astype("float32"), rng.randint(0, 3, BATCH).astype("int32"))
            for _ in range(steps)]


def make_model(devices):
    keras.utils.set_random_seed(0)
    model = PipelinedDNIClassifier(fcn_layers(2, 3, width=8, seed=3), 3, method="cdni", seed=3,
                                   execution="pipelined", devices=devices, batch_size=BATCH)
    model.build((None, 6))
    model.compile(optimizer=keras.optimizers.Adam(1e-2, epsilon=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def start_worker():
    config = json.loads(os.environ["TF_CONFIG"])
    config["task"]["index"] = 1
    env = {**os.environ, "TF_CONFIG": json.dumps(config)}
    return subprocess.Popen([sys.executable, "-m", "dni_tf.pipelined_cluster", "--threads=1",
                             "--exit_with_parent"], env=env)


def state(model):
    return [v.numpy() for v in pipelined_cluster.all_variables(model)]


class KillAndRestart(keras.callbacks.Callback):
    """Kills worker task 1 after step `kill_at`; restarts it `restart_after` steps after the loss.

    Runs before the `LostWorkerHandler` in each step's callbacks. It records
    every variable after each step (None for those on a lost device), sees the
    loss and the rejoin in `model.lost_blocks`, and checks the rejoined model
    against the newest checkpoint on disk (the handler's rejoin file or a
    periodic one).
    """

    def __init__(self, worker, checkpoint_dir, kill_at=6, restart_after=2):
        super().__init__()
        self.worker, self.checkpoint_dir = worker, checkpoint_dir
        self.kill_at, self.restart_after = kill_at, restart_after
        self.step, self.snapshots, self.log, self.lost_at = 0, {}, {}, None

    def newest_checkpoint_step(self):
        from dni_tf.harness.callbacks import ResumableCheckpoint, checkpoint_step

        paths = [p for _, p in ResumableCheckpoint.checkpoints(self.checkpoint_dir)]
        paths.append(os.path.join(self.checkpoint_dir, "rejoin.weights.h5"))
        return max(checkpoint_step(p) for p in paths if os.path.exists(p))

    def on_train_batch_begin(self, batch, logs=None):
        model = self.model
        if self.lost_at is not None and not model.lost_blocks and "rejoined_at" not in self.log:
            # The handler rejoined at the end of the last step (or before an evaluation).
            self.log["rejoined_at"] = self.step
            ckpt = self.snapshots[self.log.setdefault("checkpoint_step",
                                                      self.newest_checkpoint_step())]
            before = self.snapshots["before_rejoin"]
            variables = [v.numpy() for v in pipelined_cluster.all_variables(model)]
            lost = [i for i, value in enumerate(before) if value is None]
            self.log["lost_variables"] = len(lost)
            self.log["lost_restored_from_checkpoint"] = bool(lost) and all(
                np.array_equal(variables[i], ckpt[i]) for i in lost)
            self.log["survivors_kept"] = all(np.array_equal(variables[i], value)
                                             for i, value in enumerate(before) if value is not None)
            self.block1 = [v.numpy() for v in model.net_layers[-1].trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        model = self.model
        values = [None if pipelined_cluster.on_lost_device(model, v) else v.numpy()
                  for v in pipelined_cluster.all_variables(model)]
        self.snapshots["before_rejoin" if model.lost_blocks else self.step] = values
        if self.step == self.kill_at:
            self.worker.kill()
            self.worker.wait()
            self.log["killed_after_step"] = self.step
        if model.lost_blocks and self.lost_at is None:
            self.lost_at = self.step
            self.block0 = [v.numpy() for v in model.net_layers[0].trainable_variables]
        if self.lost_at is not None and "restarted_at" not in self.log \
                and self.step >= self.lost_at + self.restart_after:
            self.log["block0_trained_while_lost"] = bool(all(
                np.abs(a - v.numpy()).max() > 0
                for a, v in zip(self.block0, model.net_layers[0].trainable_variables)))
            self.worker = start_worker()
            start = time.time()
            address = pipelined_cluster.task_addresses()[1]
            while not pipelined_cluster.worker_alive(address) and time.time() - start < 120:
                time.sleep(0.1)
            self.log["worker_listening_after_s"] = round(time.time() - start, 2)
            self.log["restarted_at"] = self.step

    def on_train_end(self, logs=None):
        if "rejoined_at" in self.log:
            self.log["block1_trains_after_rejoin"] = bool(all(
                np.abs(a - v.numpy()).max() > 0
                for a, v in zip(self.block1, self.model.net_layers[-1].trainable_variables)))


def study(out, worker):
    """The study's run with a cluster: kill, drop, restart, rejoin inside fit()."""
    from absl import logging

    from dni_tf.studies.dni_feedforward import DNIConfig, run_single

    logging.set_verbosity(logging.INFO)
    workdir = os.path.join(os.path.dirname(out), "study")
    config = DNIConfig(dataset="digits", layers=3, decouple=(2,), width=16, method="cdni",
                       execution="pipelined", cluster=True, steps=30, eval_every=15,
                       batch_size=32, learning_rate=1e-3, lr_boundaries=(),
                       cluster_checkpoint_every=4, cluster_probe_seconds=0.2,
                       cluster_wait_seconds=120)
    callback = KillAndRestart(worker, os.path.join(workdir, "checkpoints"))
    try:
        metrics, _ = run_single(config, workdir, callbacks=[callback])
        alive = []
        for path in glob.glob(os.path.join(workdir, "*.lost_workers")):
            for event in tf.compat.v1.train.summary_iterator(path):
                alive += [(event.step, float(tf.make_ndarray(v.tensor))) for v in event.summary.value
                          if v.tag == "cluster/blocks_alive"]
        log = {**callback.log, "blocks_alive": sorted(alive), "steps": metrics["steps"], "worker_losses": metrics["worker_losses"],
               "rejoins": metrics["rejoins"], "events": metrics["cluster_events"],
               "test_accuracy": metrics["test_accuracy"]}
        with open(out + ".study.json", "w") as f:
            json.dump(log, f, default=str)
    except BaseException:
        callback.worker.kill()
        callback.worker.wait()
        raise
    return callback.worker


class FailOutsideTheStep(keras.callbacks.Callback):
    """At the first epoch end: snapshot, kill the worker, read its variable (raises), restart it."""

    def __init__(self, worker):
        super().__init__()
        self.worker, self.log, self.snapshot = worker, {}, None

    def on_train_batch_begin(self, batch, logs=None):
        if self.snapshot is not None and "restored_equals_checkpoint" not in self.log:
            self.log["restored_equals_checkpoint"] = all(
                np.array_equal(a, b) for a, b in zip(self.snapshot, state(self.model)))

    def on_epoch_end(self, epoch, logs=None):
        if self.snapshot is not None:
            return
        self.snapshot = state(self.model)
        self.worker.kill()
        self.worker.wait()
        try:
            self.model.net_layers[-1].trainable_variables[0].numpy()
            self.log["read_after_kill"] = "succeeded"
        except pipelined_cluster.LOST_WORKER_ERRORS as exc:
            self.log["read_after_kill"] = type(exc).__name__
            self.worker = start_worker()
            raise


def restart_study(out, worker):
    """A failure outside the step: run_single resumes from the checkpoint in this process."""
    from dni_tf.studies.dni_feedforward import DNIConfig, run_single

    workdir = os.path.join(os.path.dirname(out), "study_restart")
    config = DNIConfig(dataset="digits", layers=3, decouple=(2,), width=16, method="cdni",
                       execution="pipelined", cluster=True, steps=30, eval_every=15,
                       batch_size=32, learning_rate=1e-3, lr_boundaries=(),
                       cluster_probe_seconds=0.2, cluster_wait_seconds=120)
    callback = FailOutsideTheStep(worker)
    try:
        metrics, history = run_single(config, workdir, callbacks=[callback])
        log = {**callback.log, "steps": metrics["steps"], "restarts": metrics["restarts"],
               "events": metrics["cluster_events"], "history_steps": list(history["step"]),
               "traceback_written": os.path.exists(os.path.join(workdir,
                                                                "worker_lost_traceback.txt"))}
        with open(out + ".restart.json", "w") as f:
            json.dump(log, f, default=str)
    finally:
        callback.worker.kill()
        callback.worker.wait()


def train_under_bfloat16(devices, batches):
    from dni_tf.harness import fast_path

    fast_path.set_mixed_precision("bfloat16")
    try:
        model = make_model(devices)
        for x, y in batches:
            model.train_on_batch(x, y)
        return model
    finally:
        fast_path.set_mixed_precision("none")


def main(out):
    worker = start_worker()
    try:
        devices = pipelined_cluster.connect(2)
        model = make_model(devices)
        batches = data()
        for x, y in batches[:6]:
            model.train_on_batch(x, y)
        np.savez(out, *state(model))
        np.savez(out + ".bf16.npz", *state(train_under_bfloat16(devices, batches[:6])))
        log = {}
        checkpoint = out + ".weights.h5"
        model.save_weights(checkpoint)
        saved = state(model)
        model.train_on_batch(*batches[6])
        worker.kill()
        worker.wait()
        start = time.time()
        try:
            model.train_on_batch(*batches[7])
            log["step_after_kill"] = "succeeded"
        except pipelined_cluster.LOST_WORKER_ERRORS as exc:
            log["step_after_kill"] = type(exc).__name__
        log["seconds_to_fail"] = round(time.time() - start, 1)
        pipelined_cluster.lose_block(model, 1)
        block0 = [v.numpy() for v in model.net_layers[0].trainable_variables]
        module = [v.numpy() for v in model.sg_modules[0].variables]
        for x, y in batches[8:10]:
            model.train_on_batch(x, y)
        log["block0_trained_while_lost"] = bool(all(
            np.abs(a - v.numpy()).max() > 0
            for a, v in zip(block0, model.net_layers[0].trainable_variables)))
        log["module_frozen_while_lost"] = bool(all(
            np.array_equal(a, v.numpy()) for a, v in zip(module, model.sg_modules[0].variables)))
        current = [None if pipelined_cluster.on_lost_device(model, v) else v.numpy()
                   for v in pipelined_cluster.all_variables(model)]
        worker = start_worker()
        model = pipelined_cluster.rejoin(model, lambda: make_model(devices), checkpoint)
        rejoined = state(model)
        log["lost_restored_from_checkpoint"] = bool(all(
            np.array_equal(r, s) for r, s, c in zip(rejoined, saved, current) if c is None))
        log["survivors_kept"] = bool(all(
            np.array_equal(r, c) for r, c in zip(rejoined, current) if c is not None))
        log["lost_variables"] = sum(c is None for c in current)
        block1 = [v.numpy() for v in model.net_layers[1].trainable_variables]
        for x, y in batches[10:12]:
            model.train_on_batch(x, y)
        log["block1_trains_after_rejoin"] = bool(all(
            np.abs(a - v.numpy()).max() > 0
            for a, v in zip(block1, model.net_layers[1].trainable_variables)))
        with open(out + ".json", "w") as f:
            json.dump(log, f)
    except BaseException:
        worker.kill()
        worker.wait()
        raise
    worker = study(out, worker)  # the restarted worker serves the study's runs too
    restart_study(out, worker)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
