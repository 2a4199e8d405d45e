"""Tests for dni_tf.multi_network: two clocks, the DNI interface, the synchronous baseline.

The references below re-implement one training step by hand: their own LSTM
equations on plain tensors, SGD, and B's backpropagation through its earlier
ticks written as a sum over per-tick copies of B's weights (each tick ran with
the weights it had then).
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf.errors import UsageError
from dni_tf.multi_network import MultiNetwork, episode_dataset, parity_targets, tick_counts

K, BT, LR = 3, 4, 0.5
S = K * K


def _episode(seed=0):
    rng = np.random.default_rng(seed)
    digits = rng.random((BT, S, 3, 3, 1)).astype("float32")
    labels = rng.integers(0, 10, size=(BT, S)).astype("int32")
    labels[:, [0, 4, 5]] = 3  # 3s in every block's reach: counts change from tick to tick
    labels[1, 4] = 8
    return tf.constant(digits), tf.constant(labels)


def _model(method, sg_context="none", seed=0, optimizer=None, k=K, **kwargs):
    model = MultiNetwork(k, method, hidden_a=5, hidden_b=4, message_size=3, encoder_units=6,
                         sg_context=sg_context, seed=seed, **kwargs)
    model.build((None, k * k, 3, 3, 1))
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR))
    return model


def _randomise_m(model, seed=5):
    rng = np.random.default_rng(seed)
    for v in model.synthetic_gradient.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))


# --------------------------------------------------------------- the hand-written system
def _lstm(x, h, c, kernel, recurrent, bias):
    z = x @ kernel + h @ recurrent + bias
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def _ce(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                         logits=logits))


def _weights(model):
    """Copies of the weights as plain tensors, by role."""
    t = lambda v: tf.constant(v.numpy())  # noqa: E731
    a = [t(v) for v in model.a_variables]   # enc k, enc b, core k, core r, core b, parity k, b, msg k, b
    b = [t(v) for v in model.b_variables]   # core k, core r, core b, counter k, b
    m = [t(v) for v in model.synthetic_gradient.trainable_variables] if model.synthetic_gradient else []
    return a, b, m


def _a_step(a, image, h, c):
    e = tf.nn.relu(image @ a[0] + a[1])
    h, c = _lstm(e, h, c, a[2], a[3], a[4])
    return h @ a[5] + a[6], h @ a[7] + a[8], h, c


def _b_ticks(b_per_tick, blocks):
    """B from a zero state over the given message blocks, tick i with weights b_per_tick[i]."""
    batch = blocks[0][0].shape[0]
    h = c = tf.zeros([batch, b_per_tick[0][1].shape[0]])
    for w, block in zip(b_per_tick, blocks):
        h, c = _lstm(tf.concat(block, -1), h, c, w[0], w[1], w[2])
    return h @ b_per_tick[-1][3] + b_per_tick[-1][4]


def _reference_dni_step(model, digits, labels, context):
    """One DNI train step by hand; returns (A, B, M weights after it, M's targets [S*Bt, M])."""
    a, b, m = _weights(model)
    x = tf.reshape(digits, [BT, S, -1])
    parity = parity_targets(labels)
    counts = tick_counts(labels, K)
    h = c = tf.zeros([BT, a[3].shape[0]])
    messages, sg_inputs, b_history, true_grad = [], [], [], [0.0] * S
    for t in range(S):
        with tf.GradientTape() as tape:
            tape.watch(a)
            logits, msg, h_new, c_new = _a_step(a, x[:, t], h, c)
            loss = _ce(parity[:, t], logits)
        sg_in = msg if context == "none" else tf.concat(
            [msg, tf.one_hot(counts[:, t // K], S + 1)], -1)
        sg = sg_in @ m[0] + m[1]                       # M's prediction, per example
        own = tape.gradient(loss, a, unconnected_gradients="zero")
        with tf.GradientTape() as tape:
            tape.watch(a)
            _, msg_again, _, _ = _a_step(a, x[:, t], h, c)
        via_sg = tape.gradient(msg_again, a, output_gradients=sg / BT,
                               unconnected_gradients="zero")
        a = [w - LR * (g1 + g2) for w, g1, g2 in zip(a, own, via_sg)]
        h, c = h_new, c_new                            # carried; no gradient into the past
        messages.append(msg)
        sg_inputs.append(sg_in)
        if (t + 1) % K == 0:
            j = t // K
            b_history.append(list(b))                  # the weights tick j runs with
            blocks = [messages[i * K:(i + 1) * K] for i in range(j + 1)]
            with tf.GradientTape() as tape:
                tape.watch([b_history, messages])
                loss = _ce(counts[:, j], _b_ticks(b_history, blocks))
            per_tick, d_messages = tape.gradient(loss, [b_history, messages[:(j + 1) * K]],
                                                 unconnected_gradients="zero")
            b = [w - LR * sum(g[n] for g in per_tick) for n, w in enumerate(b)]
            for i, g in enumerate(d_messages):
                true_grad[i] = true_grad[i] + g
    target = tf.concat(true_grad, 0) * BT
    inputs = tf.concat(sg_inputs, 0)
    with tf.GradientTape() as tape:
        tape.watch(m)
        sg_loss = tf.reduce_mean(tf.reduce_sum(tf.square(inputs @ m[0] + m[1] - target), -1))
    m = [w - LR * g for w, g in zip(m, tape.gradient(sg_loss, m))]
    return a, b, m, target, messages


def _assert_weights(model, a, b, m=()):
    variables = model.a_variables + model.b_variables + (
        model.synthetic_gradient.trainable_variables if m else [])
    for v, want in zip(variables, list(a) + list(b) + list(m)):
        np.testing.assert_allclose(v.numpy(), want.numpy(), rtol=2e-4, atol=2e-6, err_msg=v.path)


# --------------------------------------------------------------------------- tests
def test_targets_of_the_two_tasks():
    labels = tf.constant([[3, 1, 3, 3], [0, 7, 3, 3], [8, 8, 8, 8]])
    np.testing.assert_array_equal(tick_counts(labels, 2), [[1, 3], [0, 2], [0, 0]])
    np.testing.assert_array_equal(parity_targets(labels), [[1, 1, 1, 1], [0, 1, 1, 1],
                                                           [0, 0, 0, 0]])


@pytest.mark.parametrize("sg_context", ["none", "count"])
def test_dni_step_matches_a_hand_written_reference_with_nonzero_m(sg_context):
    """A: a step after every digit on its own loss + M(m_t); B: a step every K digits,
    backpropagated through its earlier ticks; M: once, onto the multi-network target."""
    digits, labels = _episode(seed=2)
    model = _model("dni", sg_context)
    _randomise_m(model)
    a, b, m, target, messages = _reference_dni_step(model, digits, labels, sg_context)
    model.train_step((digits, labels))
    _assert_weights(model, a, b, m)
    # The target is not just the gradient of the tick that reads the message:
    # later ticks reach it through B's memory (and do so with sizeable weight).
    first_block = target[:K * BT]
    immediate = _reference_immediate_target(model, messages, labels)
    assert float(tf.norm(first_block - immediate)) > 0.1 * float(tf.norm(first_block))


@pytest.mark.parametrize("sg_context", ["none", "count"])
def test_bfloat16_dni_step_follows_the_float32_step(sg_context):
    """Under mixed_bfloat16 A and B compute in bfloat16 while M, its inputs and
    targets and both heads' logits stay float32; one dni step (random non-zero M)
    moves every variable as the float32 step does, up to bfloat16 rounding."""
    from mixed_precision_helpers import assert_moves_follow, built_under

    digits, labels = _episode(seed=2)
    # A small step: A's nine updates per episode compound bfloat16's rounding at LR.
    make = lambda: _model("dni", sg_context, optimizer=keras.optimizers.SGD(0.02))  # noqa: E731
    reference = make()
    _randomise_m(reference)
    model = built_under("bfloat16", make)
    model.set_weights(reference.get_weights())
    assert model.cell_a.compute_dtype == model.cell_b.compute_dtype == "bfloat16"
    for layer in (model.synthetic_gradient, model.parity_head, model.counter):
        assert layer.compute_dtype == "float32"
    assert_moves_follow(reference, model, lambda m: m.train_step((digits, labels)), limit=0.05)


def _reference_immediate_target(model, messages, labels):
    """Bt * dL_B_1 / dm for the first block only, with B's initial weights (no later ticks)."""
    _, b, _ = _weights(_model("dni", seed=0))
    counts = tick_counts(labels, K)
    block = messages[:K]
    with tf.GradientTape() as tape:
        tape.watch(block)
        loss = _ce(counts[:, 0], _b_ticks([b], [block]))
    return tf.concat(tape.gradient(loss, block), 0) * BT


def test_a_follows_the_synthetic_gradient_not_the_true_one():
    """A's weights after a step are those of M's (random, non-zero) predictions; with M
    at zero, B's loss does not move A's message layer at all, however large it is."""
    digits, labels = _episode(seed=3)
    model = _model("dni")
    _randomise_m(model, seed=9)
    a, b, _, _, _ = _reference_dni_step(model, digits, labels, "none")
    model.train_step((digits, labels))
    _assert_weights(model, a, b)
    silent = _model("dni")
    before = silent.message.kernel.numpy()
    silent.train_step((digits, labels))
    np.testing.assert_array_equal(silent.message.kernel.numpy(), before)


def test_backprop_step_is_one_update_through_the_whole_episode():
    """The baseline: gradient of mean A loss + mean B loss through every step and tick,
    B's loss flowing into A through the messages and A's recurrence."""
    digits, labels = _episode(seed=4)
    model = _model("backprop")
    a, b, _ = _weights(model)
    x = tf.reshape(digits, [BT, S, -1])
    parity, counts = parity_targets(labels), tick_counts(labels, K)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        h = c = tf.zeros([BT, a[3].shape[0]])
        hb = cb = tf.zeros([BT, b[1].shape[0]])
        a_losses, b_losses, messages = [], [], []
        for t in range(S):
            logits, msg, h, c = _a_step(a, x[:, t], h, c)
            a_losses.append(_ce(parity[:, t], logits))
            messages.append(msg)
            if (t + 1) % K == 0:
                hb, cb = _lstm(tf.concat(messages[-K:], -1), hb, cb, b[0], b[1], b[2])
                b_losses.append(_ce(counts[:, t // K], hb @ b[3] + b[4]))
        total = tf.add_n(a_losses) / S + tf.add_n(b_losses) / K
    ga, gb = tape.gradient(total, [a, b])
    model.train_step((digits, labels))
    _assert_weights(model, [w - LR * g for w, g in zip(a, ga)],
                    [w - LR * g for w, g in zip(b, gb)])
    assert int(model.optimizer.iterations) == 1


@pytest.mark.parametrize("method", ["dni", "backprop"])
def test_update_counts_per_batch(method):
    """dni: A every step (k*k per episode batch), B every k steps (k), M once; backprop: once.
    k = 2 (4 steps): the step is unrolled in the graph, and its trace is this test's cost."""
    k = 2
    model = _model(method, optimizer=keras.optimizers.Adam(1e-3), k=k,
                   sg_learning_rate=1e-4 if method == "dni" else None)
    digits, labels = _episode()
    step = tf.function(model.train_step)
    for _ in range(2):
        step((digits[:, :k * k], labels[:, :k * k]))
    if method == "backprop":
        assert int(model.optimizer.iterations) == 2
        assert model.b_optimizer is None
        return
    assert int(model.optimizer.iterations) == 2 * k * k
    assert int(model.b_optimizer.iterations) == 2 * k
    assert int(model.sg_optimizer.iterations) == 2
    assert float(model.sg_optimizer.learning_rate) == pytest.approx(1e-4)
    assert float(model.b_optimizer.learning_rate) == pytest.approx(1e-3)


def test_fit_and_evaluate_on_episodes():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=360).astype("int32")
    images = rng.random((360, 3, 3, 1)).astype("float32")
    model = _model("dni", "count", optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(episode_dataset(images, labels, K, 8, shuffle=True, seed=0),
                        steps_per_epoch=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    logs = model.evaluate(episode_dataset(images, labels, K, 8, False, repeat=False),
                          verbose=0, return_dict=True)
    assert set(logs) == {"loss", "a_loss", "b_loss", "a_accuracy", "b_accuracy",
                         "b_final_accuracy"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="tick_ratio"):
        MultiNetwork(0)
    with pytest.raises(ValueError, match="method"):
        MultiNetwork(2, "rtrl")
    with pytest.raises(ValueError, match="sg_context"):
        MultiNetwork(2, "dni", sg_context="label")
    model = _model("dni")
    with pytest.raises(ValueError, match="k\\*k = 9"):
        model(tf.zeros([2, 4, 3, 3, 1]))


def test_comparison_writes_the_table_counts_updates_and_reads_finished_cells_back(tmp_path):
    from dni_tf.harness import results
    from dni_tf.studies.multi_network import MultiNetworkConfig, run_comparison

    # Graph mode: XLA's compile of both models was most of this test's time; XLA is
    # covered by the conformance suite and the CLI's default run.
    cfg = MultiNetworkConfig(hidden_a=4, hidden_b=4, message_size=2, batch_size=4, digits=32,
                             eval_digits=16, dataset="digits", jit_compile=False)
    table = run_comparison(cfg, str(tmp_path), ["dni", "backprop"], [2])
    assert table["method"].tolist() == ["dni", "backprop"]
    dni = results.load_results(str(tmp_path / "dni_k2"))["metrics"]
    backprop = results.load_results(str(tmp_path / "backprop_k2"))["metrics"]
    # 32 digits = 2 batches of 4 episodes of 4 digits: A steps 8 times under dni, twice under backprop.
    assert (dni["steps"], dni["a_updates"], dni["b_updates"]) == (2, 8, 4)
    assert (backprop["steps"], backprop["a_updates"], backprop["b_updates"]) == (2, 2, 2)
    assert results.load_history(str(tmp_path / "dni_k2"))["step"].tolist() == [1, 2]
    assert (tmp_path / "table.md").exists()
    again = run_comparison(cfg, str(tmp_path), ["dni", "backprop"], [2])  # nothing left to train
    assert again.equals(table)
    # A cell trained with other settings is never read back as this comparison's cell.
    with pytest.raises(UsageError, match=r"backprop_k2 holds a finished run made with other settings: "
                                         r"--learning_rate=0\.001 \(now 0\.01\)"):
        run_comparison(dataclasses.replace(cfg, learning_rate=0.01), str(tmp_path),
                       ["backprop"], [2])
