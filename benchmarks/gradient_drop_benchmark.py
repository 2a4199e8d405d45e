r"""Step time of the gradient-dropping train_step against a plain Keras fit step.

    python benchmarks/gradient_drop_benchmark.py [--batch_size=50 --steps=50]

Both use the write-up's tutorial CNN, Adam and the same in-memory batch, measured in
one process with interleaved repeats (best of N). Prints the ratio per
configuration (target: <= 1.05 for the default: variable granularity, zero_gradient) and the
achieved GFLOP/s of the plain step.
"""

import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from dni_tf import models
from dni_tf.gradient_dropping import GradientDropping

flags.DEFINE_integer("batch_size", 50, "Batch size.")
flags.DEFINE_integer("steps", 50, "Steps per timed repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per configuration (best is kept).")
FLAGS = flags.FLAGS


def _compiled(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _seconds_per_step(model, dataset, steps):
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def _train_flops_per_example(network):
    """Multiply-adds x 2 of the forward pass, x 3 for forward + backward."""
    flops = 0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w, c_in, _ = layer.kernel.shape
            flops += 2 * h * w * c_out * k_h * k_w * c_in
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * np.prod(layer.kernel.shape)
    return 3 * flops


def main(argv):
    del argv
    rng = np.random.RandomState(0)
    x = rng.rand(FLAGS.batch_size, 28, 28, 1).astype("float32")
    y = rng.randint(0, 10, FLAGS.batch_size).astype("int32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(2)
    configs = {
        "plain fit": lambda: _compiled(models.tutorial_cnn()),
        "variable, zero_gradient": lambda: _compiled(GradientDropping(models.tutorial_cnn(), 0.5, seed=0)),
        "variable, freeze": lambda: _compiled(GradientDropping(
            models.tutorial_cnn(), 0.5, dropped_state="freeze", seed=0)),
        "layer, freeze": lambda: _compiled(GradientDropping(
            models.tutorial_cnn(), 0.5, "layer", dropped_state="freeze", seed=0)),
        "worker(4), freeze": lambda: _compiled(GradientDropping(
            models.tutorial_cnn(), 0.5, "worker", dropped_state="freeze", seed=0)),
        "element, freeze": lambda: _compiled(GradientDropping(
            models.tutorial_cnn(), 0.5, "element", dropped_state="freeze", seed=0)),
    }
    built = {name: make() for name, make in configs.items()}
    for model in built.values():  # trace and warm up
        _seconds_per_step(model, dataset, 5)
    best = {name: float("inf") for name in built}
    for _ in range(FLAGS.repeats):
        for name, model in built.items():
            best[name] = min(best[name], _seconds_per_step(model, dataset, FLAGS.steps))
    flops = _train_flops_per_example(built["plain fit"]) * FLAGS.batch_size
    print(f"tutorial CNN, batch {FLAGS.batch_size}, best of {FLAGS.repeats} x {FLAGS.steps} steps")
    print(f"plain fit step: {1e3 * best['plain fit']:.1f} ms, "
          f"{flops / best['plain fit'] / 1e9:.1f} GFLOP/s achieved")
    for name, seconds in best.items():
        if name != "plain fit":
            print(f"{name:26s} {1e3 * seconds:7.1f} ms  ratio {seconds / best['plain fit']:.3f}")


if __name__ == "__main__":
    app.run(main)
