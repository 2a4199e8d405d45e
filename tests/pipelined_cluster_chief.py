"""Chief (task 0) of a two-process pipelined DNI cluster on 127.0.0.1, for the tests.

    TF_CONFIG=<cluster, task 0> python tests/pipelined_cluster_chief.py OUT.npz

Starts worker task 1 itself (`python -m dni_tf.pipelined_cluster`, TF_CONFIG
task 1, one thread, exits with this process), connects, and trains a 2-block
cDNI FCN pipelined over "/job:worker/task:0" and "/job:worker/task:1".
First 6 steps, then every variable goes to OUT.npz (to compare with two
devices in one process). Then: a checkpoint, 1 step, SIGKILL the worker, the
next step fails, block 1 is marked lost, 2 steps train block 0 alone, the
worker is restarted and rejoins from the checkpoint, 2 more steps; OUT.json
says what happened.
"""

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


def main(out):
    worker = start_worker()
    try:
        devices = pipelined_cluster.connect(2)
        model = make_model(devices)
        batches = data()
        for x, y in batches[:6]:
            model.train_on_batch(x, y)
        np.savez(out, *state(model))
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
        return 0
    finally:
        worker.kill()
        worker.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
