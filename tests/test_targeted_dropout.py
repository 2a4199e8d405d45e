"""Targeted dropout layer: target sets, drop rates, unit dropping, evaluation, ramp, resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf import models
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


def test_weight_variant_never_drops_outside_bottom_gamma_of_each_column():
    layer = _layer("weight", alpha=0.9, gamma=0.25)
    kernel = layer.kernel.numpy()
    order = np.argsort(np.abs(kernel), axis=0)
    target = np.zeros_like(kernel, dtype=bool)
    np.put_along_axis(target, order[:16], True, axis=0)  # floor(0.25 * 64) per column
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


@pytest.mark.parametrize("variant,alpha,gamma", [("weight", 0.5, 0.5), ("weight", 0.3, 0.75),
                                                 ("unit", 0.5, 0.5)])
def test_dropped_fraction_matches_alpha_times_gamma(variant, alpha, gamma):
    layer = _layer(variant, n_in=100, n_out=200, alpha=alpha, gamma=gamma)
    fractions = [float(np.mean(layer.dropped_weights()[2].numpy())) for _ in range(40)]
    tolerance = 0.01 if variant == "weight" else 0.03
    assert np.mean(fractions) == pytest.approx(alpha * gamma, abs=tolerance)


def test_unit_variant_drops_whole_units_with_their_bias():
    layer = _layer("unit", alpha=0.7, gamma=0.5)
    norms = np.linalg.norm(layer.kernel.numpy(), axis=0)
    target = np.zeros(32, bool)
    target[np.argsort(norms)[:16]] = True
    x = tf.random.normal([8, 64], seed=1) * 3
    for _ in range(5):
        kernel, bias, drop = layer.dropped_weights()
        drop = drop.numpy()
        assert drop.shape == (32,) and drop.any()
        assert not np.any(drop & ~target)
        assert np.all(kernel.numpy()[:, drop] == 0) and np.all(bias.numpy()[drop] == 0)
        np.testing.assert_array_equal(kernel.numpy()[:, ~drop], layer.kernel.numpy()[:, ~drop])
        out = tf.nn.relu(x @ kernel + bias).numpy()
        assert np.all(out[:, drop] == 0)


@pytest.mark.parametrize("variant", td.VARIANTS)
def test_evaluation_is_plain_dense_and_deterministic(variant):
    layer = _layer(variant, alpha=1.0, gamma=1.0)
    x = tf.random.normal([4, 64], seed=2)
    expected = tf.nn.relu(x @ layer.kernel + layer.bias).numpy()
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6)
    assert int(layer.step.numpy()) == 0
    # Training with alpha = gamma = 1 drops everything: output is relu(0 or bias).
    trained = layer(x, training=True).numpy()
    assert int(layer.step.numpy()) == 1
    if variant == "unit":
        assert np.all(trained == 0)
    else:
        np.testing.assert_allclose(trained, np.broadcast_to(layer.bias.numpy(), trained.shape))


def test_ramp_grows_alpha_and_gamma_linearly():
    layer = _layer("weight", alpha=0.5, gamma=0.8, ramp_steps=10)
    assert not layer.dropped_weights()[2].numpy().any()  # step 0: nothing targeted
    layer.step.assign(5)
    alpha, gamma = layer.rates()
    assert float(alpha) == pytest.approx(0.25) and float(gamma) == pytest.approx(0.4)
    layer.step.assign(50)
    assert [float(v) for v in layer.rates()] == pytest.approx([0.5, 0.8])


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


def test_builder_regimes_share_architecture_and_initialisation():
    kwargs = dict(input_shape=(6, 6, 1), hidden=(12, 8), num_classes=3, seed=5)
    plain = models.mlp(kwargs["input_shape"], kwargs["hidden"], 3, seed=5)
    built = {r: td.targeted_dropout_mlp(r, **kwargs) for r in td.REGIMES}
    for regime, model in built.items():
        names = [layer.name for layer in model.layers if hasattr(layer, "kernel")]
        assert names == ["dense_0", "dense_1", "logits"], regime
        for got, want in zip(model.trainable_weights, plain.trainable_weights):
            np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert sum(isinstance(l, keras.layers.Dropout) for l in built["dropout"].layers) == 2
    unit = built["targeted_unit"]
    assert [getattr(l, "variant", None) for l in unit.layers] == [None, "unit", "unit", None]
    with pytest.raises(ValueError):
        td.targeted_dropout_mlp("bogus")


def test_fit_trains_targeted_network_deterministically():
    rng = np.random.default_rng(0)
    x = rng.random((64, 6, 6, 1), dtype=np.float32)
    y = rng.integers(0, 3, 64).astype(np.int32)

    def train():
        keras.utils.clear_session()
        model = study.compiled_model("targeted_weight", (6, 6, 1), 3, hidden=(16, 8), seed=1,
                                  rank_every=2)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return model

    first, second = train(), train()
    assert int(first.get_layer("dense_0").step.numpy()) == 4
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
