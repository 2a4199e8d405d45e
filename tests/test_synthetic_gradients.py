"""Tests for dni_tf.synthetic_gradients: the synthetic gradient module M(h, c)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from dni_tf.synthetic_gradients import SyntheticGradient, regression_loss, surrogate_objective


@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 5, 3)])
@pytest.mark.parametrize("hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("context_dim", [None, 3])
def test_fresh_module_predicts_zero_with_the_shape_of_h(shape, hidden_layers, context_dim):
    module = SyntheticGradient(hidden_layers=hidden_layers, units=8, context_dim=context_dim)
    h = tf.random.normal(shape, seed=1)
    context = tf.one_hot([0, 1, 2, 0], 3) if context_dim else None
    out = module(h, context=context, training=True)
    assert out.shape == h.shape
    np.testing.assert_array_equal(out.numpy(), 0.0)
    # The output layer starts at zero, the hidden layers do not.
    kernels = [v for v in module.trainable_variables if "kernel" in v.path]
    assert np.all(kernels[-1].numpy() == 0.0)
    if hidden_layers:
        assert np.any(kernels[0].numpy() != 0.0)


def _randomise(module):
    for i, v in enumerate(module.trainable_variables):
        v.assign(tf.random.normal(v.shape, seed=10 + i))


@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 5, 3)])
def test_cdni_prediction_depends_on_the_label_and_dni_does_not(shape):
    h = tf.repeat(tf.random.normal((1, *shape[1:]), seed=2), 4, axis=0)  # identical rows
    labels = tf.one_hot([0, 1, 2, 3], 4)
    cdni = SyntheticGradient(hidden_layers=1, units=8, context_dim=4)
    dni = SyntheticGradient(hidden_layers=1, units=8)
    cdni(h, context=labels)
    dni(h)
    _randomise(cdni)
    _randomise(dni)
    out_c = cdni(h, context=labels).numpy()
    out_d = dni(h, context=labels).numpy()  # a DNI module ignores any context
    for i in range(1, 4):
        assert np.abs(out_c[i] - out_c[0]).max() > 1e-3
        np.testing.assert_allclose(out_d[i], out_d[0], atol=1e-6)
    np.testing.assert_allclose(out_d, dni(h).numpy(), atol=1e-6)


def test_cdni_module_without_context_is_an_error():
    module = SyntheticGradient(context_dim=3)
    with pytest.raises(ValueError, match="context"):
        module(tf.zeros((2, 4)))


def test_module_learns_a_known_linear_gradient_field():
    # Loss quadratic in h: l(h) = 0.5 h'Ah + b'h, so dl/dh = A h + b (linear in h).
    rng = np.random.default_rng(0)
    dim = 8
    a = rng.normal(size=(dim, dim)).astype("float32")
    a = (a + a.T) / 4.0
    b = rng.normal(size=(dim,)).astype("float32")

    def true_gradient(h):
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = tf.reduce_sum(0.5 * tf.einsum("bi,ij,bj->b", h, a, h) + tf.reduce_sum(h * b, axis=1))
        return tape.gradient(loss, h)  # per-example gradient: the loss is a sum over examples

    module = SyntheticGradient(hidden_layers=0)
    module.build((None, dim))
    optimizer = keras.optimizers.Adam(0.05)
    optimizer.build(module.trainable_variables)

    @tf.function
    def step(h):
        target = true_gradient(h)
        with tf.GradientTape() as tape:
            loss = regression_loss(module(h, training=True), target)
        optimizer.apply(tape.gradient(loss, module.trainable_variables), module.trainable_variables)
        return loss

    for i in range(400):
        step(tf.random.normal((64, dim), seed=i))
    h = tf.random.normal((256, dim), seed=10_000)
    target = true_gradient(h).numpy()
    pred = module(h).numpy()
    relative = np.linalg.norm(pred - target) / np.linalg.norm(target)
    assert relative < 0.02, relative


def test_regression_loss_and_surrogate_objective():
    pred = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    target = tf.constant([[0.0, 0.0], [3.0, 4.0]])
    # mean over examples of the squared error summed over features: (5 + 25) / 2.
    assert float(regression_loss(pred, target)) == pytest.approx(15.0)
    # The target is a constant: no gradient reaches it.
    with tf.GradientTape() as tape:
        tape.watch(target)
        loss = regression_loss(pred, target)
    assert tape.gradient(loss, target) is None
    # The surrogate's gradient w.r.t. the producer of h is the SG backpropagated (/ batch).
    w = tf.Variable([[1.0, -1.0], [0.5, 2.0]])
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    sg = tf.constant([[0.1, 0.2], [0.3, -0.4]])
    with tf.GradientTape() as tape:
        h = x @ w
        objective = surrogate_objective(h, sg, batch_size=2)
    np.testing.assert_allclose(tape.gradient(objective, w).numpy(), (x.numpy().T @ sg.numpy()) / 2,
                               rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="hidden_layers"):
        SyntheticGradient(hidden_layers=3)
    with pytest.raises(ValueError, match="form"):
        SyntheticGradient(form="rnn")
    with pytest.raises(ValueError, match="rank"):
        SyntheticGradient(form="dense")(tf.zeros((2, 3, 3, 1)))
