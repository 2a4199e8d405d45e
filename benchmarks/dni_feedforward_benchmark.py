r"""Step time of DNI and cDNI against backprop on the same model and batch.

    python -m benchmarks.dni_feedforward_benchmark [--model=fcn --layers=4 --batch_size=256]

Builds each method's `DNIClassifier` on the paper's FCN (or CNN), runs its
compiled `train_step` (the same `tf.function` fit() uses) on one fixed random
batch, and prints per method: median step time, the ratio to backprop, the
floating-point operations of one step (counted by the TensorFlow profiler on
the traced graph: MatMul/Conv2D and their gradients) and the achieved GFLOP/s.
Methods are timed in interleaved rounds so that load from other processes on
a shared machine affects all of them alike.
The extra cost of (c)DNI should be the synthetic-gradient modules' own
arithmetic (their forward, regression and backward), with no per-layer Python
work or host round trips inside the step.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from dni_tf.dni_feedforward import build_classifier  # noqa: E402

flags.DEFINE_enum("model", "fcn", ["fcn", "cnn"], "Paper model.")
flags.DEFINE_integer("layers", 4, "Number of layers (every layer decoupled).")
flags.DEFINE_integer("width", None, "Units per FCN layer (256) / filters per CNN layer (128).")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("sg_hidden_layers", 0, "Hidden layers of the modules.")
flags.DEFINE_integer("steps", 50, "Timed steps per method (after warm-up), in 5 rounds.")
flags.DEFINE_list("methods", ["backprop", "dni", "cdni"], "Methods to time; the first is "
                  "the baseline of the ratio column.")
FLAGS = flags.FLAGS


def step_flops(model, x, y):
    """FLOPs of one train_step counted on its graph (None if the profiler fails)."""
    try:
        fn = tf.function(model.train_step).get_concrete_function(
            (tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype)))
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        profile = tf.compat.v1.profiler.profile(fn.graph, options=options)
        return float(profile.total_float_ops) or None
    except Exception:  # the profiler is an optional extra here
        return None


def prepare(method, x, y):
    """Compiled model, its traced train function, the data iterator and step FLOPs."""
    model = build_classifier(FLAGS.model, FLAGS.layers, x.shape[1:], 10, method=method,
                             width=FLAGS.width, sg_hidden_layers=FLAGS.sg_hidden_layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    flops = step_flops(model, x, y)
    model.make_train_function()
    step = model.train_function
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    for _ in range(3):  # trace + warm up
        logs = step(iterator)
    float(logs["loss"])
    return step, iterator, flops


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((FLAGS.batch_size, 28, 28, 1), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, FLAGS.batch_size).astype(np.int32))
    prepared = {m: prepare(m, x, y) for m in FLAGS.methods}
    # Interleave the methods in rounds so a busy (shared) machine slows all alike.
    times = {m: [] for m in FLAGS.methods}
    rounds = 5
    for _ in range(rounds):
        for method, (step, iterator, _) in prepared.items():
            start = time.perf_counter()
            for _ in range(max(1, FLAGS.steps // rounds)):
                logs = step(iterator)
            float(logs["loss"])  # one host read per round, after the last step
            times[method].append((time.perf_counter() - start) / max(1, FLAGS.steps // rounds))
    print(f"{FLAGS.model.upper()} {FLAGS.layers} layers (width {FLAGS.width or 'paper'}), "
          f"batch {FLAGS.batch_size}, "
          f"sg_hidden_layers={FLAGS.sg_hidden_layers}, every layer decoupled; median over "
          f"{rounds} interleaved rounds of {max(1, FLAGS.steps // rounds)} steps; "
          f"{os.cpu_count()} CPUs visible")
    print(f"{'method':>9} {'ms/step':>9} {'x backprop':>10} {'GFLOP/step':>11} {'GFLOP/s':>8}")
    base = statistics.median(times[FLAGS.methods[0]])
    for method in FLAGS.methods:
        seconds = statistics.median(times[method])
        flops = prepared[method][2]
        gflop = flops / 1e9 if flops else float("nan")
        print(f"{method:>9} {1e3 * seconds:9.2f} {seconds / base:10.2f} {gflop:11.3f} "
              f"{gflop / seconds:8.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
