"""Tests of dni_tf.threshold_updates: the accumulate-and-fire rule through fit()."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from conftest import NaNGradient
from dni_tf import models
from dni_tf.threshold_updates import (NotifyingConv2D, NotifyingDense, ThresholdUpdates,
                                      validate, with_sparse_backward)

XENT = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 4, n).astype("int32")
    return x, y


def _net(seed=0):
    return models.mlp(input_shape=(6, 6, 1), hidden=(12, 8), num_classes=4, seed=seed)


def _fit(model, x, y, steps, batch=16, **kw):
    return model.fit(x, y, batch_size=batch, epochs=steps, steps_per_epoch=1,
                     shuffle=False, verbose=0, **kw)


@pytest.mark.parametrize("make_optimizer", [lambda: keras.optimizers.SGD(0.3),
                                            lambda: keras.optimizers.Adam(0.01)],
                         ids=["sgd", "adam"])
def test_zero_threshold_sum_is_the_base_optimizer_exactly(make_optimizer):
    x, y = _data()
    base = _net()
    base.compile(optimizer=make_optimizer(), loss=XENT)
    _fit(base, x, y, steps=6)
    model = ThresholdUpdates(_net(), threshold=0.0, accumulation="sum")
    model.compile(optimizer=make_optimizer(), loss=XENT)
    _fit(model, x, y, steps=6)
    for want, got in zip(base.trainable_variables, model.network.trainable_variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_sparse_backward_first_step_is_exact_backprop():
    # Masks start at one, so step 1 is plain backprop even though the masked
    # layers compute their forward pass in two parts; from step 2 on, units
    # whose incoming gradients were all zero (dead ReLUs on the previous
    # batch) stay silent for one step.
    x, y = _data(16)
    base = _net()
    base.compile(optimizer=keras.optimizers.SGD(0.3), loss=XENT)
    _fit(base, x, y, steps=1)
    model = ThresholdUpdates(_net(), threshold=0.0, sparse_backward=True)
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss=XENT)
    _fit(model, x, y, steps=1)
    for want, got in zip(base.trainable_variables, model.network.trainable_variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def _grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = XENT(y, model.network(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, model.network.trainable_variables)]


@pytest.mark.parametrize("max_delay", [0, 2])
def test_gradient_mass_is_conserved_with_sgd(max_delay):
    x, y = _data(16)
    lr = 0.5
    model = ThresholdUpdates(_net(), threshold=2e-3, max_delay=max_delay, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=XENT)
    start = [v.numpy().copy() for v in model.network.trainable_variables]
    received = [np.zeros_like(w, dtype=np.float64) for w in start]
    step = tf.function(model.train_step)
    for _ in range(12):
        for total, g in zip(received, _grads(model, x, y)):
            total += g
        step((x, y))
    applied = [(w0 - v.numpy()) / lr for w0, v in zip(start, model.network.trainable_variables)]
    pending = model.pending_updates() if max_delay else [0.0] * len(applied)
    fired_any = False
    for a, acc, p, want in zip(applied, model.accumulators, pending, received):
        np.testing.assert_allclose(a + acc.numpy() + np.asarray(p), want, rtol=1e-4, atol=1e-6)
        fired_any |= bool(np.any(a != 0))
    assert fired_any
    assert 0.0 < float(model.weight_update_count.numpy())


def _constant_gradient_model(threshold, use_bias=False, sparse_backward=False, **options):
    """A linear layer whose loss sum(y_pred * y) has the constant gradient x^T y."""
    net = keras.Sequential([keras.Input((2,)),
                            keras.layers.Dense(3, use_bias=use_bias, kernel_initializer="zeros")])
    model = ThresholdUpdates(net, threshold=threshold, sparse_backward=sparse_backward, **options)
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=lambda t, p: ops.sum(p * t, axis=-1))
    x = np.array([[1.0, 2.0]], "float32")
    y = np.array([[0.25, 0.5, 1.0]], "float32")  # dL/dW = x^T y, exact in float32
    return model, x, y


class _Snapshots(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.kernels = []

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append(self.model.network.layers[-1].kernel.numpy().copy())


def test_large_threshold_fires_nothing_then_exactly_the_passing_elements():
    model, x, y = _constant_gradient_model(threshold=2.5)
    g = x.T @ y  # [[.25, .5, 1], [.5, 1, 2]]
    snaps = _Snapshots()
    history = model.fit(x, y, batch_size=1, epochs=4, verbose=0, callbacks=[snaps]).history
    # Step 1: acc = g, nothing passes 2.5.
    np.testing.assert_array_equal(snaps.kernels[0], np.zeros((2, 3)))
    # Step 2: acc = 2g; only 2 * 2 = 4 fires, with the whole accumulated value.
    want = np.zeros((2, 3), "float32")
    want[1, 2] = -4.0
    np.testing.assert_array_equal(snaps.kernels[1], want)
    # Step 3: acc = 3g except the reset element (2): 3 and 3 fire.
    want[0, 2] = want[1, 1] = -3.0
    np.testing.assert_array_equal(snaps.kernels[2], want)
    # Step 4: acc = [[1, 2, 1], [2, 1, 4]]: the 4 fires again.
    want[1, 2] = -8.0
    np.testing.assert_array_equal(snaps.kernels[3], want)
    np.testing.assert_array_equal(history["weight_updates"], [0, 1, 3, 4])
    np.testing.assert_allclose(history["update_fraction"], [0, 1 / 6, 2 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_array_equal(model.accumulators[0].numpy(), [[1, 2, 1], [2, 1, 0]])
    assert np.all(g > 0)


def test_update_and_notify_fractions_on_a_hand_computed_example():
    model, x, y = _constant_gradient_model(threshold=0.6, use_bias=True, sparse_backward=True)
    history = model.fit(x, y, batch_size=1, epochs=2, verbose=0).history
    # Step 1: kernel acc [[.25,.5,1],[.5,1,2]], bias acc [.25,.5,1]: 3 + 1 of 9 fire;
    # units 1 and 2 have a fired incoming weight.
    # Step 2: kernel [[.5,1,1],[1,1,2]], bias [.5,1,1]: 5 + 2 of 9 fire; all units.
    np.testing.assert_allclose(history["update_fraction"], [4 / 9, 7 / 9], rtol=1e-6)
    np.testing.assert_allclose(history["notify_fraction"], [2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(history["weight_updates"], [4, 11])
    # After step 2 only the kernel's (0, 0) and the bias's 0 remain: .5 and .5.
    np.testing.assert_allclose(history["acc_norm"][-1], np.sqrt(0.5), rtol=1e-6)
    layer = model.network.layers[-1]
    np.testing.assert_array_equal(layer.notify_mask.numpy(), [1.0, 1.0, 1.0])


def test_notifying_dense_masks_only_the_error_passed_down():
    net = with_sparse_backward(_net())
    layers = [l for l in net.layers if isinstance(l, NotifyingDense)]
    assert len(layers) == 3
    x, y = _data(8)
    plain = _net()
    np.testing.assert_array_equal(net(x).numpy(), plain(x).numpy())
    layers[1].notify_mask.assign(np.zeros(8, "float32"))  # dense_1 passes nothing down
    with tf.GradientTape() as tape:
        loss = XENT(y, net(x))
    grads = tape.gradient(loss, net.trainable_variables)
    with tf.GradientTape() as tape:
        loss = XENT(y, plain(x))
    plain_grads = tape.gradient(loss, plain.trainable_variables)
    # dense_0 gets no error; dense_1's own and the logits' gradients are unchanged.
    assert not np.any(grads[0].numpy()) and not np.any(grads[1].numpy())
    for got, want in zip(grads[2:], plain_grads[2:]):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_notifying_conv_masks_the_input_error_per_filter():
    net = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="conv"),
                            keras.layers.Flatten(), keras.layers.Dense(4)])
    clone = with_sparse_backward(net)
    conv = clone.get_layer("conv")
    assert isinstance(conv, NotifyingConv2D)
    x = tf.constant(_data(4)[0])

    def input_grad(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = ops.sum(model(x))
        return tape.gradient(out, x).numpy()

    np.testing.assert_array_equal(clone(x).numpy(), net(x).numpy())
    np.testing.assert_allclose(input_grad(clone), input_grad(net), rtol=1e-5, atol=1e-6)
    conv.notify_mask.assign([0.0, 0.0, 0.0])
    assert not np.any(input_grad(clone))
    with tf.GradientTape() as tape:
        out = ops.sum(clone(x))
    assert np.any(tape.gradient(out, conv.kernel).numpy())  # its own weights still learn


def test_checkpoint_restores_accumulators_buffers_and_rng_exactly(tmp_path):
    x, y = _data(32)

    def make():
        model = ThresholdUpdates(_net(), threshold=1e-3, accumulation="normalized",
                                 noise_stddev=1e-3, sparse_backward=True, max_delay=3, seed=5)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=XENT)
        return model

    first = make()
    _fit(first, x, y, steps=4)
    path = os.path.join(tmp_path, "state.weights.h5")
    first.save_weights(path)
    _fit(first, x, y, steps=4)
    second = make()
    second.load_weights(path)
    _fit(second, x, y, steps=4)
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert any(np.any(b.numpy()) for b in first.delay_buffers)


def test_same_seed_is_deterministic():
    x, y = _data(32)
    runs = []
    for _ in range(2):
        model = ThresholdUpdates(_net(), threshold=1e-3, accumulation="decay", decay=0.5,
                                 clip=0.05, noise_stddev=1e-3, sparse_backward=True,
                                 max_delay=2, seed=1)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT)
        history = _fit(model, x, y, steps=3).history
        runs.append([v.numpy() for v in model.network.trainable_variables])
        assert np.all(np.isfinite(history["loss"]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_evaluate_reports_only_the_compiled_metrics():
    x, y = _data(32)
    model = ThresholdUpdates(_net(), threshold=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT, metrics=["accuracy"])
    logs = _fit(model, x, y, steps=1, validation_data=(x, y)).history
    assert {"loss", "accuracy", "update_fraction", "notify_fraction", "acc_norm",
            "weight_updates", "cancelled_fraction"} <= set(logs)
    assert not any(k.startswith("val_") and k[4:] in ("update_fraction", "weight_updates")
                   for k in logs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(threshold=-1.0), "threshold"), (dict(accumulation="adam"), "accumulation"),
    (dict(max_delay=-1), "max_delay"), (dict(clip=0.0), "clip"),
    (dict(decay=1.5), "decay"), (dict(noise_stddev=-0.1), "noise_stddev")])
def test_invalid_arguments_are_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        validate(**kwargs)


def test_sampled_statistics_leave_training_and_update_counts_exact():
    x, y = _data()
    runs = {}
    for every in (1, 3):
        model = ThresholdUpdates(_net(), threshold=1e-3, statistics_every=every)
        model.compile(optimizer=keras.optimizers.SGD(0.3), loss=XENT)
        history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=4,
                            shuffle=False, verbose=0).history
        runs[every] = (model, history)
    (every_step, h1), (sampled, h3) = runs[1], runs[3]
    for a, b in zip(every_step.network.trainable_variables, sampled.network.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert h1["weight_updates"] == h3["weight_updates"]
    assert h1["update_fraction"] == h3["update_fraction"]
    # Steps 1..4 with k=3: only step 3 is sampled, so the L1 sums cover one step.
    assert 0 < sampled.received_l1.numpy() < every_step.received_l1.numpy()
    assert h3["acc_norm"][0] > 0 and h3["acc_norm"][0] != h1["acc_norm"][0]


def test_sparse_backward_stops_the_layers_below_when_nothing_upstream_fires():
    # T is out of reach: step 1 (masks start at one) is plain backprop into the
    # accumulators and fires nothing, so every unit stops notifying. From step 2
    # on only the logits layer (whose own weight gradient is never gated) still
    # accumulates; the layers below receive no error at all.
    x, y = _data(16)
    model = ThresholdUpdates(_net(), threshold=1e9, sparse_backward=True)
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss=XENT)
    _fit(model, x, y, steps=1)
    for layer in model.network.layers:
        if hasattr(layer, "notify_mask"):
            np.testing.assert_array_equal(layer.notify_mask.numpy(), 0.0, err_msg=layer.name)
    after_one = [a.numpy().copy() for a in model.accumulators]
    weights = [v.numpy().copy() for v in model.network.trainable_variables]
    assert all(np.any(a) for a in after_one)  # every layer received error in step 1
    _fit(model, x, y, steps=2)
    paths = [v.path for v in model.network.trainable_variables]
    for path, before, acc in zip(paths, after_one, model.accumulators):
        if path.startswith(model.network.get_layer("logits").path):
            assert not np.array_equal(acc.numpy(), before), path  # still accumulating
        else:
            np.testing.assert_array_equal(acc.numpy(), before, err_msg=path)  # gated
    for path, w, v in zip(paths, weights, model.network.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), w, err_msg=path)  # nothing fired
    # Control: without sparse backward the same layers keep accumulating.
    dense = ThresholdUpdates(_net(), threshold=1e9)
    dense.compile(optimizer=keras.optimizers.SGD(0.3), loss=XENT)
    _fit(dense, x, y, steps=1)
    first = dense.accumulators[0].numpy().copy()
    _fit(dense, x, y, steps=1)
    assert not np.array_equal(dense.accumulators[0].numpy(), first)


def _net_with_nan_gradient():
    return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(4), NaNGradient()])


def test_non_finite_gradient_is_counted_as_divergence():
    x, y = _data(16)
    model = ThresholdUpdates(_net_with_nan_gradient(), threshold=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT)
    history = _fit(model, x, y, steps=3).history
    assert np.all(np.isfinite(history["loss"]))  # invisible in the loss
    np.testing.assert_array_equal(history["nonfinite_steps"], [1, 2, 3])
    healthy = ThresholdUpdates(_net(), threshold=1e-3)
    healthy.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT)
    np.testing.assert_array_equal(_fit(healthy, x, y, steps=2).history["nonfinite_steps"], [0, 0])


def test_training_stops_on_a_non_finite_gradient_and_keeps_the_last_good_checkpoint(tmp_path):
    from dni_tf.errors import TrainingDiverged
    from dni_tf.harness.training import train_and_evaluate

    x, y = _data(16)
    # Statistics (acc_norm would turn NaN too) only every 100th step: the
    # per-step count alone must stop the run.
    model = ThresholdUpdates(_net_with_nan_gradient(), threshold=1e-3, statistics_every=100)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=XENT)
    data = tf.data.Dataset.from_tensors((x, y))
    with pytest.raises(TrainingDiverged, match=r"^nonfinite_steps=2 by step 2: "):
        train_and_evaluate(model, data.repeat(), data, steps=4, eval_every=2,
                           workdir=str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")  # the diverged state was never saved


def test_an_accumulator_exactly_at_the_threshold_does_not_fire():
    # g = [[.25, .5, 1], [.5, 1, 2]] (exact in float32); T = .5: the rule is |acc| > T.
    model, x, y = _constant_gradient_model(threshold=0.5)
    history = model.fit(x, y, batch_size=1, epochs=1, verbose=0).history
    np.testing.assert_array_equal(history["weight_updates"], [3])
    np.testing.assert_array_equal(model.accumulators[0].numpy(), [[0.25, 0.5, 0], [0.5, 0, 0]])


def test_decay_accumulation_on_a_hand_computed_example():
    model, x, y = _constant_gradient_model(threshold=2.5, accumulation="decay", decay=0.5)
    g = x.T @ y  # [[.25, .5, 1], [.5, 1, 2]]
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.accumulators[0].numpy(), g)
    # acc = .5 g + g = 1.5 g: only 1.5 * 2 = 3 passes 2.5; it fires and resets.
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    want = 1.5 * g
    want[1, 2] = 0.0
    np.testing.assert_array_equal(model.accumulators[0].numpy(), want)
    kernel = np.zeros((2, 3), "float32")
    kernel[1, 2] = -3.0
    np.testing.assert_array_equal(model.network.layers[-1].kernel.numpy(), kernel)


def test_normalized_accumulation_on_a_hand_computed_example():
    beta_2, eps = 0.5, 1e-8
    model, x, y = _constant_gradient_model(threshold=10.0, accumulation="normalized",
                                           beta_2=beta_2, epsilon=eps)
    g = (x.T @ y).astype(np.float64)
    acc, v = np.zeros_like(g), np.zeros_like(g)
    for t in (1, 2, 3):
        model.fit(x, y, batch_size=1, epochs=1, verbose=0)
        v = beta_2 * v + (1 - beta_2) * g**2
        acc += g / (np.sqrt(v / (1 - beta_2**t)) + eps)
        np.testing.assert_allclose(model.accumulators[0].numpy(), acc, rtol=1e-6)
        np.testing.assert_allclose(model.second_moments[0].numpy(), v, rtol=1e-6)


def test_loss_scaling_is_refused_with_a_clear_error():
    model = ThresholdUpdates(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]),
                             threshold=1e-3)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="mixed_float16"):
        model.train_on_batch(np.zeros((4, 3), "float32"), np.zeros((4,), "int32"))
