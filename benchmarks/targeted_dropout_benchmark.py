"""Training-step time of each targeted-dropout regime against the plain MLP's fit step.

    python -m benchmarks.targeted_dropout_benchmark [--steps=60] [--repeats=3]

Builds the targeted-dropout study's 784-1000-1000-500-200-10 MLP per regime, runs `fit` on random
batches of 128 and prints the median seconds per step and the ratio to the plain
network ("none"), all in one process. Target: targeted regimes at most 1.5x.
The weight variant is shown at several `rank_every` values, since ranking |w|
(a sort of every kernel) is its dominant extra cost.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dni_tf import targeted_dropout as td  # noqa: E402

flags.DEFINE_integer("steps", 60, "Timed fit steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per configuration (median is shown).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_list("rank_every", ["1", "10", "50"], "rank_every values for targeted_weight.")
FLAGS = flags.FLAGS


def step_time(model: keras.Model, data: tf.data.Dataset, steps: int, repeats: int) -> float:
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(data, epochs=1, steps_per_epoch=max(steps // 4, 5), verbose=0)  # trace + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        times.append((time.perf_counter() - start) / steps)
    return float(np.median(times))


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    images = rng.random((1024, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 1024).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(
        FLAGS.batch_size, drop_remainder=True).prefetch(4)
    configs = [("none", {}), ("dropout", {})]
    configs += [(f"targeted_weight", {"rank_every": int(r)}) for r in FLAGS.rank_every]
    configs += [("targeted_unit", {})]
    baseline = None
    print(f"{'regime':<34}{'s/step':>10}{'ratio':>8}")
    for regime, kwargs in configs:
        keras.utils.clear_session()
        model = td.targeted_dropout_mlp(regime, seed=0, **kwargs)
        seconds = step_time(model, data, FLAGS.steps, FLAGS.repeats)
        baseline = baseline or seconds
        label = regime + "".join(f" {k}={v}" for k, v in kwargs.items())
        print(f"{label:<34}{seconds:>10.4f}{seconds / baseline:>8.2f}x", flush=True)
    print("target: targeted regimes <= 1.50x the plain MLP fit step")


if __name__ == "__main__":
    app.run(main)
