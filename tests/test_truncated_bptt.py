"""Tests for dni_tf.truncated_bptt: windows, gradients, synthetic gradients, BPC."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf.truncated_bptt import METHODS, TruncatedBPTT, bits_per_character

B, N, D, O, H = 4, 7, 5, 3, 8


def _batch(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, n, D)).astype("float32")
    y = (rng.random(size=(B, n, O)) > 0.5).astype("float32")
    mask = (rng.random(size=(B, n)) > 0.3).astype("float32")
    return tf.constant(x), tf.constant(y), tf.constant(mask)


def _model(truncation, method="bptt", seed=0, **kwargs):
    model = TruncatedBPTT(O, truncation, method=method, hidden_size=H, seed=seed, **kwargs)
    model.build((None, None, D))
    return model


def _full_bptt(model, x, y, mask, state):
    """Reference: one tape over the whole sequence, per-step mean loss."""
    with tf.GradientTape() as tape:
        tape.watch(state)
        logits, _ = model.forward(x, state)
        nats = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits), -1)
        loss = tf.reduce_sum(nats * mask) / (B * x.shape[1])
    return tape.gradient(loss, model.core_variables + [state])


@pytest.mark.parametrize("truncation", [N, N + 3])
def test_long_window_equals_full_bptt(truncation):
    model = _model(truncation)
    x, y, mask = _batch()
    state = tf.random.normal([B, 2 * H], seed=1)
    result = model.compute_gradients(x, y, mask, state)
    expected = _full_bptt(model, x, y, mask, state)
    for got, want in zip(result["core_grads"], expected[:-1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The incoming state was watched: its gradient exists (per-example units).
    np.testing.assert_allclose(result["initial_state_grad"], expected[-1] * B, rtol=1e-4, atol=1e-6)


def test_short_window_cuts_gradients():
    model = _model(2)
    x, y, mask = _batch()
    result = model.compute_gradients(x, y, mask)
    expected = _full_bptt(model, x, y, mask, model.initial_state(B))
    recurrent = [i for i, v in enumerate(model.core_variables) if "recurrent" in v.path][0]
    assert not np.allclose(result["core_grads"][recurrent], expected[recurrent], atol=1e-6)
    # Head gradients do not depend on the truncation; the objective sums window
    # means (each divided by T), i.e. N / T times the per-step mean.
    head = len(model.core.trainable_variables)
    np.testing.assert_allclose(result["core_grads"][head], expected[head] * N / 2,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("truncation", [1, 3, 25])
def test_windows_give_same_outputs_as_whole(truncation):
    model = _model(truncation)
    x, _, _ = _batch(n=10)
    state = tf.random.normal([B, 2 * H], seed=2)
    whole, whole_state = model.forward(x, state)
    windowed, windowed_state = tf.function(model.forward_windows)(x, state)
    np.testing.assert_allclose(windowed, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(windowed_state, whole_state, rtol=1e-5, atol=1e-6)


def test_window_longer_than_the_sequence_is_not_padded():
    """T > N runs one window of N steps, not N steps padded to T (same result, T/N the cost)."""
    model = _model(10_000)
    x, y, mask = _batch()
    features, y_p, mask_p, n, num_windows, t = model._pad(x, y, mask)
    assert features.shape[1] == N and y_p.shape[1] == N and mask_p.shape[1] == N
    assert (int(n), int(num_windows), int(t)) == (N, 1, N)
    _, _, _, _, num_windows, t = model._pad(tf.concat([x, x, x], axis=1), None, None)
    assert (int(num_windows), int(t)) == (1, 3 * N)
    short = _model(3)
    features, _, _, _, num_windows, t = short._pad(x, None, None)  # 7 steps -> 3 windows of 3
    assert features.shape[1] == 9 and (int(num_windows), int(t)) == (3, 3)


def test_first_dni_step_equals_first_bptt_step():
    x, y, mask = _batch()
    weights = {}
    for m in METHODS:
        model = _model(3, m, seed=5)
        # Eager keeps the test fast; fit() under tf.function is covered by the CLI tests.
        model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
        model.train_on_batch(x, y, sample_weight=mask)
        trained = model.core.trainable_variables + model.head.trainable_variables
        weights[m] = [v.numpy() for v in trained]
        if m != "bptt":
            # The synthetic gradient module did learn from the first step.
            assert any(np.abs(v.numpy()).max() > 0 for v in model.sg_variables)
    for method in ("dni", "dni_aux"):
        for a, b in zip(weights["bptt"], weights[method]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_synthetic_gradient_target_is_next_windows_gradient():
    """Two windows: M(s_1) is regressed onto B * dL_2/ds_1 (M = 0 before training)."""
    t = 3
    model = _model(t, "dni")
    x, y, mask = _batch(n=2 * t)
    result = model.compute_gradients(x, y, mask)
    _, s1 = model.forward(x[:, :t])
    with tf.GradientTape() as tape:
        tape.watch(s1)
        logits, _ = model.forward(x[:, t:], s1)
        nats = tf.reduce_sum(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=y[:, t:], logits=logits), -1)
        loss2 = tf.reduce_sum(nats * mask[:, t:]) / (B * t)
    target = tape.gradient(loss2, s1) * B
    expected_regression = float(tf.reduce_mean(tf.reduce_sum(tf.square(target), -1)))
    # sg_loss is averaged over the 2 windows; the end-of-sequence term is 0 (M = 0).
    assert float(result["sg_loss"]) * 2 == pytest.approx(expected_regression, rel=1e-4)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in result["sg_grads"])


def test_dni_injects_scaled_synthetic_gradient():
    """With M fixed to a constant c, the core sees 0.1 * c / B at s_1 on top of dL_1."""
    t = 3
    x, y, mask = _batch(n=2 * t)
    grads = {}
    for method in ("bptt", "dni"):
        model = _model(t, method)
        if method == "dni":
            out = model.synthetic_gradient
            out.bias.assign(tf.ones_like(out.bias))
        grads[method] = model.compute_gradients(x, y, mask)["core_grads"]
    model = _model(t, "bptt")
    with tf.GradientTape() as tape:
        _, s1 = model.forward(x[:, :t])
        extra = 0.1 * tf.reduce_sum(s1) / B
    extra_grads = tape.gradient(extra, model.core_variables)
    for g_dni, g_bptt, g_extra in zip(grads["dni"], grads["bptt"], extra_grads):
        if g_extra is None:
            g_extra = tf.zeros_like(g_bptt)
        np.testing.assert_allclose(g_dni, g_bptt + g_extra, rtol=1e-4, atol=1e-6)


def test_bpc_is_nats_over_ln2():
    vocab = 6
    model = TruncatedBPTT(vocab, 4, hidden_size=H, loss_type="categorical", vocab_size=vocab)
    model.build()
    for v in model.head.trainable_variables:
        v.assign(tf.zeros_like(v))  # uniform predictions: exactly ln(V) nats = log2(V) bits
    model.compile(optimizer="adam")
    x = tf.constant(np.random.default_rng(0).integers(0, vocab, size=(B, 9)), tf.int32)
    logs = model.evaluate(x, x, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert logs["bpc"] == pytest.approx(math.log2(vocab), rel=1e-5)
    assert bits_per_character(math.log(2.0)) == pytest.approx(1.0)


def test_stateful_training_carries_state_and_restores(tmp_path):
    vocab = 5
    ids = np.random.default_rng(1).integers(0, vocab, size=(B, 13)).astype("int32")
    x, y = tf.constant(ids[:, :-1]), tf.constant(ids[:, 1:])

    def make():
        m = TruncatedBPTT(vocab, 4, method="dni", hidden_size=H, loss_type="categorical",
                          vocab_size=vocab, stateful=True, batch_size=B, update="per_batch")
        m.build()
        m.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
        return m

    model = make()
    _, expected_state = model.forward(x)
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(model.train_state.numpy(), expected_state, rtol=1e-5, atol=1e-6)
    # cell_norm: the mean norm of the carried cell state c (the state's second half).
    np.testing.assert_allclose(logs["cell_norm"],
                               np.linalg.norm(expected_state[:, H:], axis=-1).mean(), rtol=1e-5)
    model.train_on_batch(x, y)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = make()
    other.train_on_batch(x, y)  # builds optimizer slots
    other.load_weights(path)
    np.testing.assert_allclose(other.train_state.numpy(), model.train_state.numpy())
    for a, b in zip(other.sg_variables, model.sg_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy())


def test_bad_arguments():
    with pytest.raises(ValueError, match="truncation"):
        TruncatedBPTT(3, 0)
    with pytest.raises(ValueError, match="method"):
        TruncatedBPTT(3, 2, method="rtrl")
    assert METHODS == ("bptt", "dni", "dni_aux")


def test_curriculum_in_fit_trains_on_the_current_length_only():
    """Inside fit(), every batch has the curriculum's current length (no stale,
    prefetched batches of the old length), and each check averages only the
    batches seen since the previous check."""
    from dni_tf.data import sequence_tasks

    curriculum = sequence_tasks.Curriculum(1, 5, threshold=1e9, check_every=2)

    class Recorder(TruncatedBPTT):
        def build(self, input_shape=None):
            super().build(input_shape)
            self.stale = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                         name="stale")

        def train_step(self, data):
            expected = 2 * tf.convert_to_tensor(self.curriculum.length.value) + 1
            self.stale.assign_add(tf.cast(tf.not_equal(tf.shape(data[0])[1], expected),
                                          tf.float32))
            return super().train_step(data)

    model = Recorder(8, 3, hidden_size=4, curriculum=curriculum)
    model.build((None, None, 9))
    model.compile(optimizer="adam")
    data = sequence_tasks.task_dataset("copy", 2, curriculum, seed=0)
    model.fit(data, steps_per_epoch=5, epochs=2, verbose=0)
    assert float(model.stale.numpy()) == 0.0
    # 10 batches, a check every 2 (always solved): 1 -> 5 (capped), sums reset.
    assert int(curriculum.length.value) == 5 and int(curriculum.max_solved.value) == 5
    assert int(curriculum.count.value) == 0 and float(curriculum.error_sum.value) == 0.0


def _fit_two_steps(jit_compile, dataset=None):
    # dni (dni_aux under XLA: tests/test_conformance.py). N=7, T=4: two windows, one padded.
    model = _model(4, "dni", seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=jit_compile)
    if dataset is None:
        x, y, mask = _batch()
        dataset = tf.data.Dataset.from_tensors((x, y, mask)).repeat(2)
    model.fit(dataset, epochs=1, verbose=0)
    return model


def test_xla_with_a_static_length_trains_like_graph_mode():
    graph = _fit_two_steps(jit_compile=False)
    xla = _fit_two_steps(jit_compile=True)
    assert xla.jit_compile and not graph.jit_compile
    for a, b in zip(graph.trainable_variables, xla.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)


def test_xla_with_a_dynamic_length_says_so_and_auto_means_off():
    def batches():  # the Copy curriculum's kind of stream: the length changes
        for n in (5, 7):
            yield tuple(t.numpy() for t in _batch(n=n))
    spec = (tf.TensorSpec([B, None, D]), tf.TensorSpec([B, None, O]), tf.TensorSpec([B, None]))
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec)
    with pytest.raises(ValueError, match="needs a static sequence length"):
        _fit_two_steps(jit_compile=True, dataset=dataset)
    # Keras' "auto" would pick XLA on a GPU machine; for TruncatedBPTT it means off.
    assert not _fit_two_steps(jit_compile="auto", dataset=dataset).jit_compile


# ----------------------------------------------------- one batch by hand, M != 0
SG_SCALE, BOOTSTRAP = 0.1, 0.5  # distinct, so a target using either wrong scale differs


def _reference_dni_batch(model, x, y, mask, state, episodic, per_window):
    """Recurrent DNI for one batch, written out with a separate tape per window,
    applying plain SGD (lr 1) to `model`'s weights itself.

    Window k runs from s_k to s_{k+1}. The core minimises the window's loss plus
    0.1 * sum(s_{k+1} * M(s_{k+1})) / B (no injection after the last window of an
    episode). M(s_k) regresses onto B * d/ds_k of [the window's loss + BOOTSTRAP *
    sum(s_{k+1} * M(s_{k+1})) / B]: the true gradient plus the scaled bootstrap.
    An episode's first state trains nothing and M(s_K) at its end regresses onto 0.
    Aux (dni_aux): inside window k's tape, window k-1 is rerun from s_{k-1}; A(its
    end state) regresses onto the synthetic gradient injected at s_{k+1}.
    per_window: the weights move after every window; else once, by the sum.
    Returns (number of updates, s_K).
    """
    t, b, h = model.truncation, x.shape[0], model.hidden_size
    num_windows = x.shape[1] // t
    module = model.synthetic_gradient
    core_vars, sg_vars = model.core_variables, model.sg_variables
    total = {id(v): tf.zeros_like(v) for v in core_vars + sg_vars}
    updates = 0

    def run(s, k):
        xs = x[:, k * t:(k + 1) * t]
        out, new_h, new_c = model.core(xs, initial_state=[s[:, :h], s[:, h:]])
        return out, tf.concat([new_h, new_c], axis=-1)

    s = prev = tf.constant(state)
    for k in range(num_windows):
        ys, ms = y[:, k * t:(k + 1) * t], mask[:, k * t:(k + 1) * t]
        last = k == num_windows - 1
        grads = {}
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(s)
            out, new_s = run(s, k)
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=ys, logits=model.head(out))
            task = tf.reduce_sum(tf.reduce_sum(ce, -1) * ms) / (b * t)
            received = tf.zeros_like(new_s)
            if module is not None:                             # M at the window's LAST state
                received = tf.constant(module(new_s).numpy())
            if episodic and last:
                received = tf.zeros_like(received)
            surrogate = tf.reduce_sum(new_s * received) / b
            core_objective = task + SG_SCALE * surrogate
            target_objective = task + BOOTSTRAP * surrogate
            if model.aux_head is not None and k > 0:
                _, rerun_end = run(prev, k - 1)
                core_objective += model.aux_weight * tf.reduce_mean(
                    tf.square(model.aux_head(rerun_end) - received))
        for v, g in zip(core_vars, tape.gradient(core_objective, core_vars)):
            grads[id(v)] = tf.zeros_like(v) if g is None else g
        target = tape.gradient(target_objective, s) * b          # true + bootstrap
        with tf.GradientTape() as sg_tape:
            sg_loss = tf.constant(0.0)
            if module is not None and (k > 0 or not episodic):
                sg_loss += tf.reduce_mean(tf.reduce_sum(tf.square(module(s) - target), -1))
            if module is not None and episodic and last:
                sg_loss += tf.reduce_mean(tf.reduce_sum(tf.square(module(new_s)), -1))
        for v, g in zip(sg_vars, sg_tape.gradient(sg_loss, sg_vars) if sg_vars else []):
            grads[id(v)] = tf.zeros_like(v) if g is None else g
        if per_window:
            for v in core_vars + sg_vars:
                v.assign_sub(grads[id(v)])
            updates += 1
        else:
            for v in core_vars + sg_vars:
                total[id(v)] += grads[id(v)]
        prev, s = s, new_s
    if not per_window:
        for v in core_vars + sg_vars:
            v.assign_sub(total[id(v)])
        updates = 1
    return updates, s


def _random_module_model(method, stateful, update, seed=4, episodic=None, truncation=2,
                         **kwargs):
    model = _model(truncation, method, seed=seed, stateful=stateful, batch_size=B,
                   update=update, sg_scale=SG_SCALE, bootstrap_scale=BOOTSTRAP,
                   episodic=episodic, **kwargs)
    rng = np.random.default_rng(11)
    for layer in (model.synthetic_gradient, model.aux_head):
        if layer is not None:
            for v in layer.trainable_variables:
                v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    return model


@pytest.mark.parametrize("method,stateful,update", [
    ("dni", False, "per_window"), ("dni", True, "per_window"), ("dni_aux", False, "per_window"),
    ("dni", False, "per_batch"), ("bptt", False, "per_window"), ("dni_aux", "episodes",
                                                                  "per_window")])
def test_one_batch_matches_hand_written_recurrent_dni(method, stateful, update):
    """Three windows, random non-zero M (a zero M hides where it is read, the
    bootstrap and its scale), plain SGD lr 1: the trained model's weights equal
    those of the tape-per-window reference, which updates after every window.
    stateful=True: a stream (bootstrap across batches); "episodes": the Copy
    stream, state carried but every batch an episode."""
    x, y, mask = _batch(seed=3, n=3 * 2)
    episodic = None
    if stateful == "episodes":
        stateful, episodic = True, True
    model = _random_module_model(method, stateful, update, episodic=episodic)
    reference = _random_module_model(method, stateful, update, episodic=episodic)
    state = np.zeros((B, 2 * H), "float32")
    if stateful:  # a carried state: M(s_0) is trained and s_K gets a synthetic gradient
        state = np.random.default_rng(5).normal(0.0, 0.5, (B, 2 * H)).astype("float32")
        model.train_state.assign(state)
    # Graph mode for the carried state (the while_loop path), eager otherwise (fast).
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), run_eagerly=not stateful)
    updates, final_state = _reference_dni_batch(reference, x, y, mask, state,
                                                episodic=model.episodic,
                                                per_window=update == "per_window")
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.train_on_batch(x, y, sample_weight=mask)
    assert int(model.optimizer.iterations.numpy()) == updates == (3 if update == "per_window"
                                                                  else 1)
    for v, r, b in zip(model.trainable_variables, reference.trainable_variables, before):
        assert v.path.split("/", 1)[1] == r.path.split("/", 1)[1]
        assert np.abs(v.numpy() - b).max() > 0 or "aux" in v.path, v.path
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-4, atol=1e-5, err_msg=v.path)
    if stateful:
        np.testing.assert_allclose(model.train_state.numpy(), final_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dni", "dni_aux", "bptt"])
def test_continuous_stream_cuts_windows_across_batches(method, tmp_path):
    """Batches of 3, 5, 1 and 7 steps at T = 4 are one 16-step stream: the
    continuous model must train exactly as a stream model fed the same steps in
    two batches of 8 (windows 0-1, then 2-3; the hand-written reference above
    checks that path). Batch 3 completes no window: it only adds to the pending
    steps, which a save/load in the middle must carry."""
    x, y, mask = _batch(seed=6, n=16)
    cuts = [0, 3, 8, 9, 16]

    def make(continuous):
        model = _random_module_model(method, True, "per_window", episodic=False, truncation=4,
                                     continuous=continuous)
        model.train_state.assign(np.random.default_rng(5).normal(0.0, 0.5, (B, 2 * H))
                                 .astype("float32"))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
        return model

    reference = make(continuous=False)
    for lo, hi in ((0, 8), (8, 16)):
        reference.train_on_batch(x[:, lo:hi], y[:, lo:hi], sample_weight=mask[:, lo:hi])
    model = make(continuous=True)
    for i in range(3):
        lo, hi = cuts[i], cuts[i + 1]
        model.train_on_batch(x[:, lo:hi], y[:, lo:hi], sample_weight=mask[:, lo:hi])
    assert int(model.pending_steps.numpy()) == 1 and int(model.optimizer.iterations) == 2
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    model = make(continuous=True)
    model.load_weights(path)
    model.optimizer.iterations.assign(2)
    model.train_on_batch(x[:, 9:], y[:, 9:], sample_weight=mask[:, 9:])
    assert int(model.optimizer.iterations) == int(reference.optimizer.iterations) == 4
    assert int(model.pending_steps.numpy()) == 0
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-4, atol=1e-5, err_msg=v.path)
    np.testing.assert_allclose(model.train_state.numpy(), reference.train_state.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_continuous_stream_refuses_what_it_cannot_carry():
    for kwargs in (dict(), dict(stateful=True, batch_size=B, episodic=True),
                   dict(stateful=True, batch_size=B, episodic=False, loss_type="categorical",
                        vocab_size=5)):
        with pytest.raises(ValueError, match="continuous=True needs"):
            TruncatedBPTT(O, 2, continuous=True, **kwargs)


def test_default_bootstrap_is_the_papers_unscaled_target():
    model = TruncatedBPTT(O, 2, method="dni")
    assert model.bootstrap_scale == 1.0 and model.sg_scale == 0.1
    assert model.update == "per_window"


def test_episode_end_regresses_a_nonzero_module_towards_zero():
    """One window = the whole episode: M's only loss is ||M(s_1)||^2 at the end."""
    model = _random_module_model("dni", False, "per_batch")
    x, y, mask = _batch(seed=2, n=2)
    r = model.compute_gradients(x, y, mask)
    _, s1 = model.forward(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.reduce_sum(tf.square(model.synthetic_gradient(s1)), -1))
    expected = tape.gradient(loss, model.sg_variables)
    assert float(r["sg_loss"]) == pytest.approx(float(loss), rel=1e-5) and float(loss) > 0
    for got, want in zip(r["sg_grads"], expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sg_scale_zero_trains_m_but_leaves_the_core_on_bptt():
    """The ablation `sg_scale=0`: the core's gradients are bptt's exactly, while M still
    regresses onto its (bootstrapped) target."""
    x, y, mask = _batch(seed=9)
    dni = _model(2, "dni", seed=3, sg_scale=0.0, bootstrap_scale=BOOTSTRAP)
    rng = np.random.default_rng(5)
    for v in dni.synthetic_gradient.trainable_variables:
        v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    bptt = _model(2, "bptt", seed=3)
    for v, w in zip(bptt.core_variables, dni.core_variables):
        v.assign(w)
    got = dni.compute_gradients(x, y, mask)
    want = bptt.compute_gradients(x, y, mask)
    for g, w in zip(got["core_grads"], want["core_grads"]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert float(got["sg_loss"]) > 0 and any(float(tf.norm(g)) > 0 for g in got["sg_grads"])
    # ... and the same module at sg_scale 0.1 does move the core.
    injected = _model(2, "dni", seed=3, sg_scale=SG_SCALE, bootstrap_scale=BOOTSTRAP)
    injected.set_weights(dni.get_weights())
    moved = injected.compute_gradients(x, y, mask)["core_grads"]
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in
               zip(moved, want["core_grads"])) > 1e-4


def test_aux_loss_and_its_target():
    """Two windows, per batch: the Aux head reads s_1 and regresses onto M(s_2)...
    which, at the end of an episode, is the zero synthetic gradient received there;
    in a stream, M(s_2) itself."""
    x, y, mask = _batch(seed=6, n=4)
    for stateful in (False, True):
        model = _random_module_model("dni_aux", stateful, "per_batch")
        r = model.compute_gradients(x, y, mask, episodic=not stateful)
        _, s1 = model.forward(x[:, :2])
        _, s2 = model.forward(x[:, 2:], s1)
        target = tf.zeros_like(s2) if not stateful else model.synthetic_gradient(s2)
        expected = float(tf.reduce_mean(tf.square(model.aux_head(s1) - target)))
        # aux_loss is the mean over the windows that have one (here only the second).
        assert float(r["aux_loss"]) == pytest.approx(expected, rel=1e-5) and expected > 0


def test_per_window_updates_are_counted_and_stay_in_one_traced_step():
    x, y, mask = _batch(n=7)  # T=2: 4 windows, the last one padded
    model = _model(2, "bptt")  # the bptt baseline is updated every window too
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(tf.data.Dataset.from_tensors((x, y, mask)).repeat(3), epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3 * 4
    per_batch = _model(2, "bptt", update="per_batch")
    per_batch.compile(optimizer=keras.optimizers.Adam(1e-2))
    per_batch.fit(tf.data.Dataset.from_tensors((x, y, mask)).repeat(3), epochs=1, verbose=0)
    assert int(per_batch.optimizer.iterations.numpy()) == 3


def test_synthetic_gradient_quality_against_full_bptt():
    """M replaced by the exact future gradient would score cosine 1, ratio 1;
    here: the probe gradient equals a hand-computed future gradient."""
    model = _random_module_model("dni", False, "per_batch")
    x, y, mask = _batch(seed=8, n=6)
    q = model.synthetic_gradient_quality(x, y, mask)
    assert q["cosine"].shape == (2,) and q["norm_ratio"].shape == (2,)
    # One window (a short curriculum level): no later loss, empty results, no error.
    one = model.synthetic_gradient_quality(x[:, :2], y[:, :2], mask[:, :2])
    assert one["cosine"].shape == (0,) and one["norm_ratio"].shape == (0,)
    _, s1 = model.forward(x[:, :2])
    with tf.GradientTape() as tape:
        tape.watch(s1)
        logits, _ = model.forward(x[:, 2:], s1)
        nats = tf.reduce_sum(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=y[:, 2:], logits=logits), -1)
        future = tf.reduce_sum(nats * mask[:, 2:]) / (B * 2)
    true = tf.reshape(tape.gradient(future, s1) * B, [-1])
    pred = tf.reshape(model.synthetic_gradient(s1), [-1])
    cosine = float(tf.reduce_sum(true * pred) / (tf.norm(true) * tf.norm(pred)))
    assert float(q["cosine"][0]) == pytest.approx(cosine, rel=1e-4, abs=1e-6)
    assert float(q["norm_ratio"][0]) == pytest.approx(float(tf.norm(pred) / tf.norm(true)),
                                                      rel=1e-4)
    # The arrays behind the scores (for fitting other predictors to the same targets).
    np.testing.assert_allclose(q["states"][0], s1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf.reshape(q["true"][0], [-1]), true, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tf.reshape(q["predicted"][0], [-1]), pred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q["final_state"], model.forward(x)[1], rtol=1e-5, atol=1e-6)
    # next_window_only: at s1 the gradient of window 1's loss (steps 2-3) alone.
    near = model.synthetic_gradient_quality(x, y, mask, next_window_only=True)
    with tf.GradientTape() as tape:
        tape.watch(s1)
        logits, _ = model.forward(x[:, 2:4], s1)
        nats = tf.reduce_sum(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=y[:, 2:4], logits=logits), -1)
        next_loss = tf.reduce_sum(nats * mask[:, 2:4]) / (B * 2)
    next_grad = tape.gradient(next_loss, s1) * B
    np.testing.assert_allclose(near["true"][0], next_grad, rtol=1e-4, atol=1e-6)
    assert not np.allclose(near["true"][0], q["true"][0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(near["true"][1], q["true"][1], rtol=1e-4, atol=1e-6)  # the last
    np.testing.assert_allclose(near["predicted"], q["predicted"], rtol=1e-5, atol=1e-6)


def test_quality_without_a_mask_ignores_the_padding_to_whole_windows():
    """5 steps at T=2: the third window holds one real step and one of padding, whose
    zero target must not count (training's `_unpack` masks it the same way)."""
    model = _random_module_model("dni", False, "per_batch")
    x, y, mask = _batch(seed=8, n=5)
    unmasked = model.synthetic_gradient_quality(x, y)
    ones = model.synthetic_gradient_quality(x, y, tf.ones_like(mask))
    np.testing.assert_allclose(unmasked["true"], ones["true"], rtol=1e-5, atol=1e-7)
    assert np.abs(ones["true"][1]).max() > 1e-4  # window 2's real step reaches s_2


def test_weight_space_quality_backpropagates_both_through_their_window():
    """update_cosine[k]: J_k^T M(s_{k+1}) vs J_k^T true[k] in the core's weights, J_k
    the Jacobian of window k's end state; a hand tape over windows 0 and 1, from a
    carried non-zero state."""
    model = _random_module_model("dni", False, "per_batch")
    x, y, mask = _batch(seed=8, n=6)
    carried = tf.random.stateless_normal([B, 2 * H], [3, 4])
    q = model.synthetic_gradient_quality(x, y, mask, state=carried, weight_space=True)
    assert q["update_cosine"].shape == (2,) and q["update_norm"].shape == (2,)
    core = model.core.trainable_variables
    start = carried
    for k in range(2):
        with tf.GradientTape(persistent=True) as tape:
            _, end = model.forward(x[:, 2 * k:2 * k + 2], start)

        def update(direction):
            return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(
                end, core, output_gradients=direction)], 0)

        by_m, by_true = update(q["predicted"][k]), update(q["true"][k])
        cosine = float(tf.reduce_sum(by_m * by_true) / (tf.norm(by_m) * tf.norm(by_true)))
        assert abs(cosine) > 1e-3  # a test that can tell the two apart
        assert float(q["update_cosine"][k]) == pytest.approx(cosine, rel=1e-4, abs=1e-6)
        assert float(q["update_norm"][k]) == pytest.approx(float(tf.norm(by_m)), rel=1e-4)
        assert float(q["update_true_norm"][k]) == pytest.approx(float(tf.norm(by_true)),
                                                                rel=1e-4)
        start = end
    one = model.synthetic_gradient_quality(x[:, :2], y[:, :2], mask[:, :2], weight_space=True)
    assert one["update_cosine"].shape == (0,)


def test_bfloat16_step_follows_the_float32_step(method="dni_aux", stateful=True):
    """Under mixed_bfloat16 the LSTM computes in bfloat16 while the carried state,
    the head's logits, M and the Aux head stay float32; one SGD batch (three
    windows, random non-zero M, per-window updates) moves every variable as the
    float32 batch does, up to bfloat16 rounding."""
    from mixed_precision_helpers import assert_moves_follow, built_under

    x, y, mask = _batch(seed=3, n=3 * 2)
    reference = _random_module_model(method, stateful, "per_window")
    model = built_under("bfloat16", lambda: _random_module_model(method, stateful, "per_window"))
    model.set_weights(reference.get_weights())
    assert model.core.compute_dtype == "bfloat16"
    assert {v.dtype for v in model.weights} == {"float32"}
    for layer in (model.head, model.synthetic_gradient, model.aux_head):
        assert layer is None or layer.compute_dtype == "float32"
    for m in (reference, model):
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    assert_moves_follow(
        reference, model,
        lambda m: m.train_on_batch(x, y, sample_weight=mask, return_dict=True), limit=0.05)
    if stateful:
        assert model.train_state.dtype == "float32"
        np.testing.assert_allclose(model.train_state.numpy(), reference.train_state.numpy(),
                                   rtol=0.05, atol=0.02)


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize("built_before_tracing", [True, False])
def test_fit_builds_a_model_that_was_never_built(stateful, built_before_tracing, monkeypatch):
    """Keras' own build on `fit` calls the model, which builds the core and head only:
    the train step builds M and the Aux head (and the carried state) before the
    optimizer, so they train like the rest. `BuildsBeforeTracing` builds everything
    before the first trace; without it (data it cannot make zeros of, another Keras)
    the train step's own build is what keeps M in the optimizer."""
    if not built_before_tracing:
        monkeypatch.setattr(TruncatedBPTT, "_maybe_symbolic_build",
                            keras.Model._maybe_symbolic_build)
    x, y, mask = _batch(seed=1)
    model = TruncatedBPTT(O, 3, method="dni_aux", hidden_size=H, stateful=stateful,
                          batch_size=B if stateful else None)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, sample_weight=mask, batch_size=B, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert len(model.optimizer.variables) > 2 * len(model.trainable_variables)
    assert np.abs(model.synthetic_gradient.kernel.numpy()).max() > 0  # M was trained


def _copy_curriculum_run(steps=3):
    """(curriculum, model) after `steps` Copy batches of 8, per-batch updates, episodes reset."""
    from dni_tf.data import sequence_tasks

    curriculum = sequence_tasks.Curriculum(1, 50, threshold=1e9, check_every=100,
                                           name="curriculum")
    model = TruncatedBPTT(8, 3, method="dni", hidden_size=8, update="per_batch", episodic=True,
                          curriculum=curriculum, seed=0)
    model.build((None, None, 9))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    data = sequence_tasks.task_dataset("copy", 8, curriculum, seed=0, sampling="current")
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return curriculum


def test_under_replicas_the_curriculum_decides_on_the_whole_batch(mirrored_strategy):
    """Each replica's copy of the curriculum sees the error of the global batch (the
    same sum as on one device), not its own half of it."""
    single = _copy_curriculum_run()
    with mirrored_strategy.scope():
        mirrored = _copy_curriculum_run()
    copies = [v.numpy() for v in mirrored.error_sum.value.values]
    assert len(copies) == 2
    np.testing.assert_allclose(copies, [single.error_sum.numpy()] * 2, rtol=1e-5)


def test_a_stateful_model_refuses_several_replicas(mirrored_strategy):
    with mirrored_strategy.scope():
        model = TruncatedBPTT(O, 3, method="dni", hidden_size=H, stateful=True, batch_size=B)
        with pytest.raises(ValueError, match="cannot be split over 2 replicas"):
            model.build((None, None, D))


def test_the_studies_refuse_carried_state_under_replicas(mirrored_strategy, tmp_path):
    """Copy's episode stream (continuous by default) and PTB carry state per batch row: one
    line, before training."""
    from dni_tf.harness.cli import UsageError
    from dni_tf.studies import recurrent_dni

    with mirrored_strategy.scope():
        with pytest.raises(UsageError, match="--episodes=continuous carries the state"):
            recurrent_dni.run_copy_task(recurrent_dni.CopyTaskConfig(steps=1, eval_every=1),
                                        str(tmp_path / "copy"))
        with pytest.raises(UsageError, match="PTB trains one stateful stream per batch row"):
            recurrent_dni.run_language_model(
                recurrent_dni.LanguageModelConfig(steps=1, eval_every=1), str(tmp_path / "ptb"))
    assert not list(tmp_path.iterdir())  # nothing written
