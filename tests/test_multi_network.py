"""Tests for dni_tf.multi_network: two clocks, the DNI interface, the baseline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf.multi_network import MultiNetwork, episode_dataset, odd_counts

K, TICKS, BT = 3, 2, 4


def _episode(seed=0):
    rng = np.random.default_rng(seed)
    digits = rng.random((BT, K * TICKS, 6, 6, 1)).astype("float32")
    labels = rng.integers(0, 10, size=(BT, K * TICKS)).astype("int32")
    return tf.constant(digits), tf.constant(labels)


def _model(method, seed=0, **kwargs):
    model = MultiNetwork(K, method, hidden_a=8, hidden_b=6, message_size=4, seed=seed, **kwargs)
    model.build((None, K * TICKS, 6, 6, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def test_odd_counts_per_tick():
    labels = tf.constant([[1, 2, 3, 4, 6, 8], [9, 9, 9, 0, 0, 7]])
    np.testing.assert_array_equal(odd_counts(labels, 3), [[2, 0], [3, 1]])


def test_b_reaches_a_only_through_the_synthetic_gradient():
    digits, labels = _episode()
    model = _model("dni")
    grads, variables, _ = model.compute_gradients(digits, labels)
    by_name = {v.path: g for g, v in zip(grads, variables)}
    # A's gradient equals the gradient of A's own loss while M is zero ...
    with tf.GradientTape() as tape:
        digit_logits, _ = model._run_a(digits)
        a_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=digit_logits))
    own = tape.gradient(a_loss, model.a_variables)
    for v, g in zip(model.a_variables, own):
        g = tf.zeros_like(v) if g is None else g  # the message layer gets nothing from A's loss
        np.testing.assert_allclose(by_name[v.path], g, rtol=1e-5, atol=1e-7)
    # ... and backprop's differs there (B's loss flows into A's message layer).
    bp = _model("backprop")
    grads_bp, variables_bp, _ = bp.compute_gradients(digits, labels)
    message_kernel = [g for g, v in zip(grads_bp, variables_bp) if "a_message" in v.path][0]
    assert float(tf.reduce_max(tf.abs(message_kernel))) > 0
    # M learned from B's true gradient, so next time A gets a nonzero signal.
    model.train_step((digits, labels))
    assert float(tf.reduce_max(tf.abs(model.synthetic_gradient.kernel))) > 0
    grads2, variables2, _ = model.compute_gradients(digits, labels)
    kernel2 = [g for g, v in zip(grads2, variables2) if "a_message" in v.path][0]
    with tf.GradientTape() as tape:
        digit_logits, _ = model._run_a(digits)
        a_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=digit_logits))
    assert tape.gradient(a_loss, model.message.kernel) is None
    assert float(tf.reduce_max(tf.abs(kernel2))) > 0  # the synthetic gradient's contribution


def test_fit_trains():
    rng = np.random.default_rng(1)
    # Learnable toy digits: the label is written into the image.
    labels = rng.integers(0, 10, size=600).astype("int32")
    images = np.zeros((600, 6, 6, 1), "float32")
    images[np.arange(600), labels % 6, labels // 6, 0] = 1.0
    train = episode_dataset(images, labels, K * TICKS, 16, shuffle=True, seed=0)
    model = _model("dni", sg_context="count")  # cDNI: M reads the target count too
    history = model.fit(train, steps_per_epoch=40, epochs=1, verbose=0)
    assert history.history["a_accuracy"][-1] > 0.5
    assert np.isfinite(history.history["loss"][-1])
    logs = model.evaluate(episode_dataset(images[:96], labels[:96], K * TICKS, 16, False,
                                          repeat=False), verbose=0, return_dict=True)
    assert set(logs) >= {"a_accuracy", "b_accuracy", "loss"}



@pytest.mark.parametrize("sg_context", ["none", "count"])
def test_dni_gradients_match_a_hand_written_reference_with_nonzero_m(sg_context):
    """A random, non-zero M: A gets sum(m * M(m[, c])) / Bt on top of its own loss;
    M regresses onto Bt * dL_B/dm at every message B reads; B gets its own loss only."""
    digits, labels = _episode(seed=2)
    model = _model("dni", sg_context=sg_context)
    rng = np.random.default_rng(5)
    for v in model.synthetic_gradient.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
    grads, variables, _ = model.compute_gradients(digits, labels)
    got = {id(v): g for v, g in zip(variables, grads)}
    counts = odd_counts(labels, K)                                   # [Bt, TICKS]
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits
    with tf.GradientTape() as tape:
        flat = tf.reshape(digits, [BT, K * TICKS, -1])
        h = model.core_a(model.encoder(flat))
        messages = model.message(h)[:, K - 1::K]                     # B's ticks
        a_loss = tf.reduce_mean(ce(labels=labels, logits=model.classifier(h)))
        sg_in = messages if sg_context == "none" else tf.concat(
            [messages, tf.one_hot(counts, K + 1)], -1)
        sg = tf.stop_gradient(model.synthetic_gradient(sg_in))
        a_objective = a_loss + tf.reduce_sum(messages * sg) / BT
    expected = dict(zip(map(id, model.a_variables),
                        tape.gradient(a_objective, model.a_variables)))
    received = tf.constant(messages.numpy())
    with tf.GradientTape() as tape:
        tape.watch(received)
        b_loss = tf.reduce_mean(ce(labels=counts, logits=model.counter(model.core_b(received))))
    *b_grads, d_received = tape.gradient(b_loss, model.b_variables + [received])
    expected.update(zip(map(id, model.b_variables), b_grads))
    target = d_received * BT                                         # per-example units
    sg_vars = model.synthetic_gradient.trainable_variables
    with tf.GradientTape() as tape:
        sg_loss = tf.reduce_mean(tf.reduce_sum(
            tf.square(model.synthetic_gradient(tf.stop_gradient(sg_in)) - target), -1))
    expected.update(zip(map(id, sg_vars), tape.gradient(sg_loss, sg_vars)))
    assert set(got) == set(expected)
    for v in variables:
        np.testing.assert_allclose(got[id(v)], expected[id(v)], rtol=1e-4, atol=1e-6,
                                   err_msg=v.path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tick_ratio"):
        MultiNetwork(0)
    with pytest.raises(ValueError, match="method"):
        MultiNetwork(2, "rtrl")
    with pytest.raises(ValueError, match="sg_context"):
        MultiNetwork(2, "dni", sg_context="label")
