"""dni_tf.core and the layering it enables: algorithms import nothing above the core."""

import subprocess
import sys

from conftest import REPO_ROOT, count_traces

ALGORITHMS = ("gradient_dropping", "threshold_updates", "synthetic_gradients", "dni_feedforward",
              "pipelined_dni", "pipelined_cluster", "truncated_bptt", "multi_network",
              "targeted_dropout", "pruning")
# What an algorithm may import from the package: the core, the random streams,
# the exceptions and the plain Keras building blocks.
ALLOWED = {"dni_tf", "dni_tf.core", "dni_tf.random_streams", "dni_tf.errors", "dni_tf.models",
           "dni_tf.models.classifiers", *(f"dni_tf.{name}" for name in ALGORITHMS)}


def test_algorithms_import_nothing_from_the_experiment_harness():
    code = (
        "import sys, tensorflow, keras\n"
        "before = set(sys.modules)\n"
        f"for name in {ALGORITHMS!r}:\n"
        "    __import__('dni_tf.' + name)\n"
        "print(' '.join(sorted(m for m in set(sys.modules) - before\n"
        "                      if m.startswith(('dni_tf', 'absl', 'pandas', 'matplotlib')))))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    assert loaded - ALLOWED == set(), f"algorithms pulled in {sorted(loaded - ALLOWED)}"


def _gradient_dropping():
    """A fresh compiled GradientDropping MLP (a model with BuildsBeforeTracing)."""
    import keras

    from dni_tf.gradient_dropping import GradientDropping

    keras.utils.set_random_seed(0)
    network = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model = GradientDropping(network, keep_prob=0.5, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(with_none=False):
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    x, y = rng.rand(8, 5).astype("float32"), rng.randint(0, 3, 8).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y) if not with_none else (x, y, None)).batch(4)


def test_evaluate_and_fit_trace_their_steps_once_also_with_an_absent_part_in_the_data():
    """BuildsBeforeTracing: evaluate() on a fresh model builds the compiled metrics before
    tracing (Keras alone traces the test step twice), and a dataset with a None part
    (no sample weights) is built from zeros with that part left out."""
    model = _gradient_dropping()
    traces = count_traces(model, ("train_step", "test_step"))
    model.evaluate(_data(), verbose=0)
    model.fit(_data(), epochs=1, verbose=0)
    assert traces == ["test_step", "train_step"]
    model = _gradient_dropping()
    traces = count_traces(model)
    history = model.fit(_data(with_none=True), epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1 and traces == ["train_step"]


def test_zeros_of_spec_keeps_absent_parts_and_gives_up_on_unknown_rank():
    import tensorflow as tf

    from dni_tf.core import zeros_of_spec

    x, weights = zeros_of_spec((tf.TensorSpec([None, 0, 3], tf.int32),
                                tf.data.Dataset.from_tensors((1, None)).element_spec[1]))
    assert x.shape == (1, 0, 3) and x.dtype == tf.int32 and weights is None
    assert zeros_of_spec((tf.TensorSpec(None, tf.float32),)) is None
    assert zeros_of_spec(tf.RaggedTensorSpec([None, None], tf.float32)) is None
