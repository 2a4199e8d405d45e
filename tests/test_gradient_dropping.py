"""GradientDropping: exact backprop at keep_prob=1, nothing at 0, mask semantics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import NaNGradient
from dni_tf.gradient_dropping import GradientDropping, layer_groups, worker_groups


def _network(seed=0, activation="relu"):
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, activation=activation, name="hidden",
                           kernel_initializer=keras.initializers.GlorotUniform(seed)),
        keras.layers.Dense(3, name="out", kernel_initializer=keras.initializers.GlorotUniform(seed + 1)),
    ])


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    return rng.rand(n, 6).astype("float32"), rng.randint(0, 3, n).astype("int32")


def _compile(model, lr=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _weights(model):
    return [v.numpy().copy() for v in model.weights]


@pytest.mark.parametrize("granularity", ["variable", "layer", "element", "worker"])
def test_keep_prob_one_is_exactly_plain_backprop(granularity):
    x, y = _data()
    plain = _compile(_network())
    dropping = _compile(GradientDropping(_network(), keep_prob=1.0, granularity=granularity, seed=3))
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    logs = dropping.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for a, b in zip(_weights(plain), _weights(dropping.network)):
        np.testing.assert_array_equal(a, b)
    assert logs["kept_fraction"][-1] == 1.0


def _one_step_updates(model, x, y):
    before = _weights(model.network)
    model.train_on_batch(x, y)
    return [not np.array_equal(a, b) for a, b in zip(before, _weights(model.network))], \
        [np.mean(a != b) for a, b in zip(before, _weights(model.network))]


def test_variable_granularity_keeps_or_drops_whole_variables():
    x, y = _data(16)
    model = _compile(GradientDropping(_network(), keep_prob=0.5, dropped_state="freeze", seed=1),
                     lr=0.1)
    model.build((None, 6))
    seen_partial = False
    for _ in range(10):
        _, changed_fraction = _one_step_updates(model, x, y)
        # Each variable moves as a whole (all elements, up to dead-ReLU rows) or not at all.
        for fraction in changed_fraction:
            seen_partial |= 0.0 < fraction < 0.5
    assert not seen_partial


def test_freeze_leaves_adam_moments_of_dropped_variables_untouched():
    x, y = _data(16)
    model = _compile(GradientDropping(_network(), keep_prob=0.5, dropped_state="freeze", seed=2))
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)  # non-zero moments everywhere
    optimizer = model.optimizer
    slots = {v.path: [optimizer._momentums[optimizer._get_variable_index(v)],
                      optimizer._velocities[optimizer._get_variable_index(v)]]
             for v in model.trainable_variables}
    frozen_seen = moved_seen = 0
    for _ in range(8):
        before = {p: [s.numpy().copy() for s in ss] for p, ss in slots.items()}
        weights_before = {v.path: v.numpy().copy() for v in model.trainable_variables}
        model.train_on_batch(x, y)
        for v in model.trainable_variables:
            var_changed = not np.array_equal(weights_before[v.path], v.numpy())
            slot_changed = [not np.array_equal(b, s.numpy()) for b, s in zip(before[v.path], slots[v.path])]
            if var_changed:
                moved_seen += 1
                assert all(slot_changed)
            else:
                frozen_seen += 1
                assert not any(slot_changed)  # moments not advanced by the lost gradient
    assert frozen_seen and moved_seen


def test_zero_gradient_decays_moments_like_the_seed():
    x, y = _data(16)
    model = _compile(GradientDropping(_network(), keep_prob=1.0, dropped_state="zero_gradient", seed=2))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    model.keep_prob = 0.0  # retrace with everything dropped
    model.make_train_function(force=True)
    kernel = model.network.get_layer("hidden").kernel
    m = model.optimizer._momentums[model.optimizer._get_variable_index(kernel)]
    m_before, w_before = m.numpy().copy(), kernel.numpy().copy()
    model.train_on_batch(x, y)
    np.testing.assert_allclose(m.numpy(), 0.9 * m_before, rtol=1e-5)  # beta_1 decay
    assert not np.array_equal(w_before, kernel.numpy())  # still moves along its momentum


@pytest.mark.parametrize("granularity,parts", [("variable", 4), ("layer", 2), ("worker", 3)])
def test_kept_fraction_matches_keep_prob_within_binomial_tolerance(granularity, parts):
    x, y = _data(32)
    keep_prob, steps = 0.3, 400
    model = _compile(GradientDropping(_network(), keep_prob=keep_prob, granularity=granularity,
                                      num_workers=3, seed=5))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    logs = model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0).history
    draws = steps * parts
    tolerance = 4 * np.sqrt(keep_prob * (1 - keep_prob) / draws)
    assert abs(logs["kept_fraction"][0] - keep_prob) < tolerance


def test_element_granularity_fraction_and_rescale():
    x, y = _data(32)
    model = _compile(GradientDropping(_network(), keep_prob=0.25, granularity="element", seed=0))
    logs = model.fit(x, y, batch_size=8, epochs=5, verbose=0).history
    assert abs(logs["kept_fraction"][-1] - 0.25) < 0.05
    with pytest.raises(ValueError, match="keep_prob > 0"):
        GradientDropping(_network(), keep_prob=0.0, rescale=True)


def _linear_network(seed=0):
    """No ReLU: every gradient element is non-zero, so "moved" means "kept"."""
    return _network(seed, activation=None)


def _sgd_update(model, x, y):
    """One SGD(1) step: minus the applied gradient, per network variable."""
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.build((None, 6))
    before = _weights(model.network)
    model.train_on_batch(x, y)
    return [b - a for a, b in zip(before, _weights(model.network))]


@pytest.mark.parametrize("granularity", ["variable", "element"])
def test_rescale_multiplies_kept_gradients_and_zeroes_the_rest(granularity):
    x, y = _data(16)
    plain = _sgd_update(GradientDropping(_linear_network(), keep_prob=1.0), x, y)
    kept = dropped = 0
    # 4 coins per seed under `variable` (one per variable), 53 under `element`.
    for seed in range(8 if granularity == "variable" else 4):
        rescaled = _sgd_update(GradientDropping(_linear_network(), keep_prob=0.5, rescale=True,
                                                granularity=granularity, seed=seed), x, y)
        for p, r in zip(plain, rescaled):
            assert np.all(p != 0)
            is_kept = r != 0
            np.testing.assert_allclose(r[is_kept], 2 * p[is_kept], rtol=1e-4)
            if granularity == "variable":  # the variable is one part
                assert np.all(is_kept) or not np.any(is_kept)
                is_kept = is_kept.ravel()[:1]
            kept += int(np.sum(is_kept))
            dropped += int(np.sum(~is_kept))
    # Both outcomes occur, at the keep probability (binomial, 4 sigma).
    draws = kept + dropped
    assert kept and dropped
    assert abs(kept / draws - 0.5) < 4 * np.sqrt(0.25 / draws)


@pytest.mark.parametrize("dropped_state", ["freeze", "zero_gradient"])
def test_variable_granularity_drops_kernel_and_bias_independently(dropped_state):
    """Each variable is its own coin: a kernel and its bias agree only half the time."""
    x, y = _data(16)
    model = _compile(GradientDropping(_linear_network(), keep_prob=0.5, seed=4,
                                      dropped_state=dropped_state), lr=0.0)
    model.compile(optimizer=keras.optimizers.SGD(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class RecordMoves(keras.callbacks.Callback):
        moves = []

        def on_train_batch_begin(self, batch, logs=None):
            self.before = _weights(model.network)

        def on_train_batch_end(self, batch, logs=None):
            RecordMoves.moves.append([not np.array_equal(a, b) for a, b in
                                      zip(self.before, _weights(model.network))])

    steps = 160
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(steps)
    model.fit(ds, epochs=1, verbose=0, callbacks=[RecordMoves()])
    moves = np.array(RecordMoves.moves)  # [steps, 4]: hidden kernel, bias, out kernel, bias
    assert moves.shape == (steps, 4)
    sigma = np.sqrt(0.25 / steps)
    np.testing.assert_array_less(np.abs(moves.mean(axis=0) - 0.5), 4 * sigma)
    for kernel, bias in [(0, 1), (2, 3)]:
        # Independent coins disagree with probability 2 * 0.5 * 0.5 = 0.5.
        disagree = np.mean(moves[:, kernel] != moves[:, bias])
        assert abs(disagree - 0.5) < 4 * sigma, (kernel, bias, disagree)


# fuse_update=False too: XLA (the fused update) may fold NaN * 0 to 0, so only
# the graph-mode update shows whether the masks select or multiply.
@pytest.mark.parametrize("fuse_update", [None, False])
@pytest.mark.parametrize("dropped_state", ["freeze", "zero_gradient"])
@pytest.mark.parametrize("granularity", ["variable", "element", "worker"])
def test_a_dropped_non_finite_gradient_never_reaches_the_weights(granularity, dropped_state,
                                                                 fuse_update):
    """keep_prob 0 changes no variable, even where the gradient is NaN."""
    x, y = _data(16)
    network = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), NaNGradient()])
    model = _compile(GradientDropping(network, keep_prob=0.0, granularity=granularity,
                                      dropped_state=dropped_state, seed=0,
                                      fuse_update=fuse_update))
    model.build((None, 6))
    before = _weights(model.network)
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    for a, b in zip(before, _weights(model.network)):
        np.testing.assert_array_equal(a, b)
    assert logs["kept_fraction"][-1] == 0.0


def test_masks_are_reproducible_for_a_seed():
    x, y = _data()
    runs = []
    for _ in range(2):
        model = _compile(GradientDropping(_network(), keep_prob=0.5, seed=11))
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        runs.append(_weights(model.network))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_groupings():
    net = _network()
    variables = net.trainable_variables  # hidden/kernel, hidden/bias, out/kernel, out/bias
    assert layer_groups(variables) == [0, 0, 1, 1]
    # Largest first onto the least-loaded worker: 30 -> w0, 15 -> w1, 5 -> w2, 3 -> w2.
    assert worker_groups(variables, 3) == [0, 2, 1, 2]


def test_invalid_arguments_name_themselves():
    with pytest.raises(ValueError, match="keep_prob must be in"):
        GradientDropping(_network(), keep_prob=1.5)
    with pytest.raises(ValueError, match="granularity must be one of"):
        GradientDropping(_network(), granularity="neuron")


def test_replica_granularity_applies_the_mean_of_surviving_replicas(mirrored_strategy):
    """Each step's update is the mean over the replicas that survived, or nothing."""
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], "float32")
    y = np.array([[1.0], [1.0], [2.0], [2.0]], "float32")
    with mirrored_strategy.scope():
        network = keras.Sequential([keras.Input((2,)),
                                    keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
        model = GradientDropping(network, keep_prob=0.5, granularity="replica", seed=7)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    data = tf.data.Dataset.from_tensors((x, y)).repeat()  # replica r gets rows 2r, 2r+1
    outcomes = set()
    for _ in range(12):
        w = model.network.get_weights()[0]
        halves = [(x[:2], y[:2]), (x[2:], y[2:])]
        # d/dw mean((xw - y)^2) over each replica's half; the optimizer subtracts 0.1 x it.
        g = [2 * xs.T @ (xs @ w - ys) / len(xs) for xs, ys in halves]
        candidates = {"none": 0 * w, "first": -0.1 * g[0], "second": -0.1 * g[1],
                      "both": -0.1 * (g[0] + g[1]) / 2}
        model.fit(data, steps_per_epoch=1, epochs=1, verbose=0)
        delta = model.network.get_weights()[0] - w
        matches = [name for name, c in candidates.items() if np.allclose(delta, c, atol=1e-6)]
        assert matches, f"update {delta.ravel()} is no survivor mean"
        outcomes.add(matches[0])
    assert {"first", "second"} & outcomes and "both" in outcomes and "none" in outcomes


def test_replica_granularity_drops_a_lost_replicas_non_finite_gradient(mirrored_strategy):
    x, y = _data(16)
    with mirrored_strategy.scope():
        network = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), NaNGradient()])
        model = GradientDropping(network, keep_prob=0.0, granularity="replica", seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.build((None, 6))
    before = _weights(model.network)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for a, b in zip(before, _weights(model.network)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("granularity", ["variable", "element"])
def test_fused_update_keeps_the_same_parts_as_graph_mode(granularity):
    """The XLA-fused mask-and-apply (default) and the unfused step drop the same parts."""
    x, y = _data(16)
    changed = []
    for fuse in (None, False):
        model = GradientDropping(_network(), keep_prob=0.5, granularity=granularity, seed=5,
                                 dropped_state="freeze", fuse_update=fuse)
        # Adam: its moments must be frozen with the weights (the fused element
        # step hands its masks from one XLA cluster to another).
        model.compile(optimizer=keras.optimizers.Adam(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.build((None, 6))
        model.optimizer.build(model.trainable_variables)
        state = lambda: _weights(model.network) + [  # noqa: E731
            s.numpy().copy() for s in model.optimizer.variables if len(s.shape)]
        steps = []
        for _ in range(3):  # per step: a dropped element keeps its moments too
            before = state()
            model.train_on_batch(x, y)
            steps += [a != b for a, b in zip(before, state())]
        changed.append(steps)
        assert model._fused() == (fuse is None)
    for fused, unfused in zip(*changed):
        np.testing.assert_array_equal(fused, unfused)
    assert 0 < np.mean(np.concatenate([c.ravel() for c in changed[0]])) < 1
