"""Shared test fixtures: quiet TensorFlow, real-data location, deterministic seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGICAL_CPUS = 2


def _split_cpu():
    """Two logical CPU devices for the MirroredStrategy tests, one thread per pool.

    Must run before TensorFlow initialises its devices, hence at import.
    The suite runs one pytest process per core, and the tests' ops are tiny:
    TensorFlow's default pools (a thread per core for parallel ops, another
    per core for independent ops, in every process) only oversubscribe the
    cores (the suite takes about 8% longer with them).
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
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


@pytest.fixture(autouse=True)
def _fixed_seed():
    import keras

    keras.utils.set_random_seed(1234)


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
