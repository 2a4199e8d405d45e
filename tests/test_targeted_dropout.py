"""Targeted dropout layer: target sets, drop rates, fresh masks, bias, evaluation, ramp, resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf import models, pruning
from dni_tf import targeted_dropout as td
from dni_tf.studies import targeted_dropout as study


def _layer(variant, n_in=64, n_out=32, seed=7, **kwargs):
    layer = td.TargetedDense(n_out, activation="relu", variant=variant, seed=seed, **kwargs)
    layer.build((None, n_in))
    rng = np.random.default_rng(seed)
    # Distinct magnitudes and non-zero biases.
    values = (rng.permutation(n_in * n_out) + 1.0) / (n_in * n_out)
    layer.kernel.assign((values * rng.choice([-1, 1], n_in * n_out)).reshape(n_in, n_out))
    layer.bias.assign(np.linspace(0.5, 1.0, n_out))
    return layer


def _weight_targets(kernel, gamma):
    """Hand-computed target set: the floor(gamma * n_in) smallest |w| of each column."""
    order = np.argsort(np.abs(kernel), axis=0)
    target = np.zeros_like(kernel, dtype=bool)
    np.put_along_axis(target, order[:int(np.floor(gamma * kernel.shape[0]))], True, axis=0)
    return target


def _unit_targets(kernel, gamma):
    target = np.zeros(kernel.shape[1], bool)
    target[np.argsort(np.linalg.norm(kernel, axis=0))[:int(np.floor(gamma * kernel.shape[1]))]] = True
    return target


def test_weight_variant_never_drops_outside_bottom_gamma_of_each_column():
    layer = _layer("weight", alpha=0.9, gamma=0.25)
    kernel = layer.kernel.numpy()
    target = _weight_targets(kernel, 0.25)  # 16 per column
    dropped_any = np.zeros_like(target)
    for _ in range(5):
        eff_kernel, eff_bias, drop = layer.dropped_weights()
        drop = drop.numpy()
        assert not np.any(drop & ~target)
        np.testing.assert_array_equal(eff_kernel.numpy(), np.where(drop, 0.0, kernel))
        np.testing.assert_array_equal(eff_bias.numpy(), layer.bias.numpy())
        dropped_any |= drop
    assert dropped_any.sum() > 0.9 * target.sum()
    np.testing.assert_array_equal(layer.target_mask().numpy(), target)


@pytest.mark.parametrize("variant", td.VARIANTS)
def test_unit_and_weight_masks_are_fresh_every_step(variant):
    # Two independent Bernoulli(alpha) masks disagree on a targeted element with
    # probability 2 alpha (1 - alpha); a mask reused across steps never does.
    alpha = 0.5
    layer = _layer(variant, n_in=80, n_out=400, alpha=alpha, gamma=0.5, seed=11)
    target = (_weight_targets(layer.kernel.numpy(), 0.5) if variant == "weight"
              else _unit_targets(layer.kernel.numpy(), 0.5))
    masks = [layer.dropped_weights()[2].numpy() for _ in range(4)]
    n = int(target.sum())
    expected = 2 * alpha * (1 - alpha)
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
    for first, second in zip(masks, masks[1:]):
        differ = float(np.mean(first[target] != second[target]))
        assert differ == pytest.approx(expected, abs=tolerance), differ


@pytest.mark.parametrize("variant,alpha", [("weight", 0.3), ("weight", 0.9), ("unit", 0.3),
                                           ("unit", 0.75)])
def test_drop_rate_inside_the_target_set_is_alpha(variant, alpha):
    layer = _layer(variant, n_in=100, n_out=200, alpha=alpha, gamma=0.5)
    kernel = layer.kernel.numpy()
    target = (_weight_targets(kernel, 0.5) if variant == "weight"
              else _unit_targets(kernel, 0.5))
    drops = [layer.dropped_weights()[2].numpy() for _ in range(30)]
    assert not any(np.any(d & ~target) for d in drops)  # non-targets never dropped
    n = int(target.sum()) * len(drops)
    rate = sum(int(d[target].sum()) for d in drops) / n
    # Binomial: 5 standard deviations (alpha is quantised to 1/65536, far below that).
    assert rate == pytest.approx(alpha, abs=5 * np.sqrt(alpha * (1 - alpha) / n)), rate


@pytest.mark.parametrize("variant,alpha,gamma", [("weight", 0.5, 0.5), ("weight", 0.3, 0.75),
                                                 ("unit", 0.5, 0.5)])
def test_dropped_fraction_matches_alpha_times_gamma(variant, alpha, gamma):
    layer = _layer(variant, n_in=100, n_out=200, alpha=alpha, gamma=gamma)
    fractions = [float(np.mean(layer.dropped_weights()[2].numpy())) for _ in range(40)]
    tolerance = 0.01 if variant == "weight" else 0.03
    assert np.mean(fractions) == pytest.approx(alpha * gamma, abs=tolerance)


def test_unit_variant_drops_kernel_columns_and_never_touches_the_bias():
    layer = _layer("unit", alpha=0.7, gamma=0.5)
    bias = layer.bias.numpy().copy()
    target = _unit_targets(layer.kernel.numpy(), 0.5)
    x = tf.random.normal([8, 64], seed=1) * 3
    for _ in range(5):
        kernel, eff_bias, drop = layer.dropped_weights()
        drop = drop.numpy()
        assert drop.shape == (32,) and drop.any()
        assert not np.any(drop & ~target)
        assert np.all(kernel.numpy()[:, drop] == 0)
        np.testing.assert_array_equal(kernel.numpy()[:, ~drop], layer.kernel.numpy()[:, ~drop])
        np.testing.assert_array_equal(eff_bias.numpy(), bias)  # the official code's choice
        out = tf.nn.relu(x @ kernel + eff_bias).numpy()
        np.testing.assert_allclose(out[:, drop], np.broadcast_to(np.maximum(bias[drop], 0),
                                                                 out[:, drop].shape))
    np.testing.assert_array_equal(layer.bias.numpy(), bias)


def test_unit_variant_drop_bias_option_silences_dropped_units():
    layer = _layer("unit", alpha=0.7, gamma=0.5, drop_bias=True)
    kernel, bias, drop = layer.dropped_weights()
    drop = drop.numpy()
    assert drop.any()
    assert np.all(bias.numpy()[drop] == 0)
    np.testing.assert_array_equal(bias.numpy()[~drop], layer.bias.numpy()[~drop])


@pytest.mark.parametrize("variant", td.VARIANTS)
def test_dense_evaluation_is_the_plain_layer_and_deterministic(variant):
    layer = _layer(variant, alpha=1.0, gamma=1.0)
    x = tf.random.normal([4, 64], seed=2)
    expected = tf.nn.relu(x @ layer.kernel + layer.bias).numpy()
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6)
    assert int(layer.step.numpy()) == 0
    # Training with alpha = gamma = 1 drops every weight: the output is relu(bias).
    trained = layer(x, training=True).numpy()
    assert int(layer.step.numpy()) == 1
    np.testing.assert_allclose(trained, np.broadcast_to(layer.bias.numpy(), trained.shape))


@pytest.mark.parametrize("variant,gamma", [("weight", 0.3), ("unit", 0.4)])
def test_remove_targets_evaluation_equals_a_hand_pruned_copy(variant, gamma):
    layer = _layer(variant, gamma=gamma, alpha=0.5, evaluation="remove_targets")
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    x = tf.random.normal([16, 64], seed=3).numpy()
    if variant == "weight":
        pruned = np.where(_weight_targets(kernel, gamma), 0.0, kernel)  # 19 per column
        np.testing.assert_array_equal(pruned, pruning.prune_kernel(kernel, None, gamma, "weight")[0])
    else:
        pruned = np.where(_unit_targets(kernel, gamma)[None, :], 0.0, kernel)  # 12 units
    expected = np.maximum(x @ pruned + bias, 0.0)  # the bias is kept (official code)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(layer.step.numpy()) == 0
    td.set_evaluation(keras.Sequential([keras.Input((64,)), layer]), "dense")
    np.testing.assert_allclose(layer(x, training=False).numpy(),
                               np.maximum(x @ kernel + bias, 0.0), rtol=1e-5, atol=1e-6)


def test_remove_targets_sweep_at_zero_equals_weight_pruning_at_gamma():
    model = study.compiled_model("targeted_weight", (6,), 3, hidden=(40, 20), gamma=0.5, seed=2)
    model(np.zeros((1, 6), np.float32))
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    y = np.argmax(model(x, training=False).numpy(), axis=1)  # the dense network: 100%
    removed = study.pruning_sweep(model, x, y, [0], evaluation="remove_targets")
    dense = study.pruning_sweep(model, x, y, [0, 50], evaluation="dense")
    at = lambda t, f: t[(t["kind"] == "weight") & (t["fraction"] == f)]["accuracy"].item()
    assert at(dense, 0) == 1.0
    assert at(removed, 0) == at(dense, 50) < 1.0


def test_gamma_schedule_hand_computed():
    # T = 100: gamma -> 0.95 gamma over steps 0..50, then -> gamma at step 100.
    steps = [0, 10, 50, 75, 100, 1000]
    gamma = [0.0, 0.095, 0.475, 0.4875, 0.5, 0.5]   # 0.5 * 0.95 * 10/50 = 0.095, ...
    paper = [td.ramp_rates(s, 0.4, 0.5, 100, "paper") for s in steps]
    official = [td.ramp_rates(s, 0.4, 0.5, 100, "official") for s in steps]
    np.testing.assert_allclose([float(g) for _, g in paper], gamma, atol=1e-7)
    np.testing.assert_allclose([float(a) for a, _ in paper], [0.4] * 6)
    np.testing.assert_allclose([float(g) for _, g in official], gamma, atol=1e-7)
    np.testing.assert_allclose([float(a) for a, _ in official], [0.0, 0.04, 0.2, 0.3, 0.4, 0.4],
                               atol=1e-7)
    assert [float(v) for v in td.ramp_rates(7, 0.4, 0.5, 0)] == pytest.approx([0.4, 0.5])
    # The layer follows its own step: at step 10, floor(0.095 * 64) = 6 targets per column.
    layer = _layer("weight", alpha=0.4, gamma=0.5, ramp_steps=100)
    assert not layer.dropped_weights()[2].numpy().any()  # step 0: nothing targeted
    layer.step.assign(10)
    layer.dropped_weights()
    np.testing.assert_array_equal(layer.target_mask().numpy().sum(axis=0), np.full(32, 6))
    layer.step.assign(75)  # floor(0.4875 * 64) = 31
    layer.dropped_weights()
    np.testing.assert_array_equal(layer.target_mask().numpy().sum(axis=0), np.full(32, 31))
    unit = _layer("unit", alpha=0.4, gamma=0.5, ramp_steps=100)
    unit.step.assign(50)  # floor(0.475 * 32) = 15 units
    assert int(unit.target_mask().numpy().sum()) == 15


def test_rank_every_reuses_thresholds_between_rankings():
    layer = _layer("weight", alpha=0.5, gamma=0.5, rank_every=3)
    layer.dropped_weights()
    first = layer.threshold.numpy().copy()
    layer.kernel.assign(layer.kernel * 2.0)
    layer.dropped_weights()
    layer.dropped_weights()
    np.testing.assert_array_equal(layer.threshold.numpy(), first)  # steps 1, 2: cached
    layer.dropped_weights()
    np.testing.assert_allclose(layer.threshold.numpy(), 2 * first)  # step 3: re-ranked


def test_masks_are_seeded_and_resume_from_saved_weights(tmp_path):
    a, b = _layer("weight", seed=3), _layer("weight", seed=3)
    for _ in range(3):
        np.testing.assert_array_equal(a.dropped_weights()[2], b.dropped_weights()[2])
    assert not np.array_equal(_layer("weight", seed=4).dropped_weights()[2],
                              _layer("weight", seed=3).dropped_weights()[2])
    model = keras.Sequential([keras.Input((64,)), a])
    model.save_weights(str(tmp_path / "w.weights.h5"))
    expected = a.dropped_weights()[2].numpy()
    c = td.TargetedDense(32, activation="relu", variant="weight", seed=3)
    restored = keras.Sequential([keras.Input((64,)), c])
    restored.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_array_equal(c.dropped_weights()[2].numpy(), expected)


def test_masks_are_the_same_under_xla():
    def masks(jit):
        layer = _layer("weight", n_in=30, n_out=20, seed=5, alpha=0.5, gamma=0.5)
        step = tf.function(lambda: layer.dropped_weights()[2], jit_compile=jit)
        return [step().numpy() for _ in range(2)]
    for plain, xla in zip(masks(False), masks(True)):
        np.testing.assert_array_equal(plain, xla)


def test_builder_regimes_share_architecture_and_initialisation():
    kwargs = dict(input_shape=(6, 6, 1), hidden=(12, 8), num_classes=3, seed=5, ramp_steps=10)
    plain = models.mlp(kwargs["input_shape"], kwargs["hidden"], 3, seed=5)
    built = {r: td.targeted_dropout_mlp(r, **kwargs) for r in td.REGIMES}
    for regime, model in built.items():
        names = [layer.name for layer in model.layers if hasattr(layer, "kernel")]
        assert names == ["dense_0", "dense_1", "logits"], regime
        for got, want in zip(model.trainable_weights, plain.trainable_weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert sum(isinstance(l, keras.layers.Dropout) for l in built["dropout"].layers) == 2
    unit = built["targeted_unit_ramp"]
    assert [getattr(l, "variant", None) for l in unit.layers] == [None, "unit", "unit", None]
    assert unit.get_layer("dense_0").ramp_steps == 10
    with pytest.raises(ValueError):
        td.targeted_dropout_mlp("bogus")
    with pytest.raises(ValueError, match="ramp_steps"):
        td.targeted_dropout_mlp("targeted_weight_ramp", ramp_steps=0)


def test_fit_trains_targeted_network_deterministically():
    rng = np.random.default_rng(0)
    x = rng.random((64, 6, 6, 1), dtype=np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)

    def train(**compile_kwargs):
        keras.utils.clear_session()
        model = study.compiled_model("targeted_weight", (6, 6, 1), 3, hidden=(16, 8), seed=1,
                                     rank_every=2, **compile_kwargs)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model

    first, second = train(), train()
    assert int(first.get_layer("dense_0").step.numpy()) == 4
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Several steps per compiled call train the same steps.
    for a, b in zip(first.get_weights(), train(steps_per_execution=2).get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(64, 32), (7, 5)])
def test_radix_select_threshold_equals_sorting(shape):
    rng = np.random.default_rng(shape[0])
    values = np.abs(rng.normal(size=shape)).astype(np.float32)
    values[:3] = values[3]                      # ties
    values[-1] = 0.0                            # zeros
    values[-2, :2] = np.float32(1e-30)          # tiny and denormal-free magnitudes
    for k in range(shape[0] + 1):
        got = td.kth_smallest_magnitude(tf.constant(values), tf.constant(k)).numpy()
        want = td._kth_smallest_threshold(tf.constant(values), tf.constant(k)).numpy()
        np.testing.assert_array_equal(got, want)
