"""Shared test fixtures: quiet TensorFlow, real-data location, deterministic seeds, and
the harness's own cost kept down (threads per worker, graphs freed after each test)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGICAL_CPUS = 2


def _split_cpu():
    """Two logical CPU devices for the MirroredStrategy tests; the cores shared out.

    Must run before TensorFlow initialises its devices, hence at import.
    Under pytest-xdist each worker gets its share of the cores for each of
    TensorFlow's thread pools: the tests' ops are tiny, and the default (every
    core, in every process) only oversubscribes them (README's `-n 2` on two
    cores took about 8% longer with the defaults).
    """
    import tensorflow as tf

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    try:
        if workers:
            threads = max(1, (os.cpu_count() or 1) // workers)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * LOGICAL_CPUS)
    except RuntimeError:  # TensorFlow already initialised: mirrored tests skip
        pass


_split_cpu()


@pytest.fixture
def real_data_dir():
    """`$DNI_TF_DATA_DIR` (CI points it at shared/data); skips when absent."""
    path = os.environ.get("DNI_TF_DATA_DIR")
    if not path or not os.path.isdir(path):
        pytest.skip("real datasets not available: set DNI_TF_DATA_DIR to shared/data")
    return path


def pytest_collection_finish(session):
    """Moves what the imports made (TensorFlow, Keras: some 400,000 objects) out of
    the garbage collector's reach: they live as long as the process, and every
    full collection during the tests would walk them again."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _free_traced_graphs():
    """Lets each test's traced graphs be freed when the test ends.

    Every trace of a Keras optimizer step (its all-reduce, even on one device)
    registers a `CustomGradient-N` entry in TensorFlow's global gradient registry
    whose closure holds the traced graph, so no graph is ever freed
    (tensorflow/tensorflow#97697). In one long pytest process the graphs of
    hundreds of models pile up (about 26,000 Python objects per truncated-BPTT
    fit) and every full garbage collection walks them all: later tests ran up to
    5x slower than alone. An entry is used while its graph is traced and
    differentiated, which ends with the test that traced it; only a gradient
    taken later through an earlier test's `tf.function` would need it again,
    and no test does that.
    """
    from tensorflow.python.framework import ops

    registry = ops._gradient_registry._registry
    before = set(registry)
    yield
    for name in set(registry) - before:
        if name.startswith("CustomGradient-"):
            del registry[name]


@pytest.fixture(autouse=True)
def _fixed_seed():
    import keras

    keras.utils.set_random_seed(1234)


def count_traces(model, steps=("train_step",)):
    """Wraps `model`'s `steps` (e.g. "train_step", "test_step") so that each trace of
    one appends its name to the returned list (a compiled step runs its Python once
    per trace)."""
    traces = []
    for name in steps:
        step = getattr(model, name)

        def counted(data, step=step, name=name):
            traces.append(name)
            return step(data)

        setattr(model, name, counted)
    return traces


@pytest.fixture(scope="session")
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs, shared by every test.

    Strategies created one after another in a process reuse collective
    instance keys and then abort with shape mismatches.
    """
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < LOGICAL_CPUS:
        pytest.skip("two logical CPU devices could not be configured")
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(LOGICAL_CPUS)])


def _nan_gradient_layer():
    import keras
    import numpy as np
    import tensorflow as tf

    @tf.custom_gradient
    def identity_with_nan_gradient(inputs, w):
        return tf.identity(inputs), lambda upstream: (upstream, tf.fill(tf.shape(w), np.nan))

    class NaNGradient(keras.layers.Layer):
        """Identity in the forward pass; its one weight's gradient is NaN.

        No NaN ever flows forward, so the loss stays finite on every CPU (a NaN
        input to a fused MatMul+ReLU comes out as 0 under oneDNN on some CPUs).
        """

        def build(self, input_shape):
            self.w = self.add_weight(shape=(), initializer="ones", name="w")

        def call(self, inputs):
            return identity_with_nan_gradient(inputs, self.w)

    return NaNGradient


NaNGradient = _nan_gradient_layer()
