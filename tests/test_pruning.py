"""Magnitude pruning: exact counts per column / of units, biases, copies, sparsity."""

import keras
import numpy as np
import pytest

from dni_tf import models, pruning


def _kernel(n_in=40, n_out=12, seed=0):
    # Distinct magnitudes, so the k smallest are unambiguous.
    rng = np.random.default_rng(seed)
    values = rng.permutation(n_in * n_out).astype(np.float32) + 1.0
    signs = rng.choice([-1.0, 1.0], size=n_in * n_out)
    return (values * signs).reshape(n_in, n_out) / (n_in * n_out)


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 10), (0.5, 20), (0.7, 28),
                                               (0.99, 39)])
def test_weight_pruning_zeroes_k_smallest_per_column(fraction, expected):
    kernel = _kernel()
    bias = np.ones(12, np.float32)
    pruned, pruned_bias = pruning.prune_kernel(kernel, bias, fraction, "weight")
    zeros_per_column = (pruned == 0).sum(axis=0)
    np.testing.assert_array_equal(zeros_per_column, np.full(12, expected))
    for j in range(12):
        smallest = np.argsort(np.abs(kernel[:, j]))[:expected]
        assert np.all(pruned[smallest, j] == 0)
        kept = np.setdiff1d(np.arange(40), smallest)
        np.testing.assert_array_equal(pruned[kept, j], kernel[kept, j])
    np.testing.assert_array_equal(pruned_bias, bias)  # weight pruning keeps biases


def test_weight_pruning_exact_count_with_ties():
    kernel = np.full((10, 3), 0.5, np.float32)
    pruned, _ = pruning.prune_kernel(kernel, None, 0.3, "weight")
    np.testing.assert_array_equal((pruned == 0).sum(axis=0), [3, 3, 3])


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.25, 3), (0.5, 6), (0.9, 10)])
def test_unit_pruning_removes_smallest_norm_columns_and_their_bias(fraction, expected):
    kernel = _kernel()
    bias = np.arange(1, 13, dtype=np.float32)
    pruned, pruned_bias = pruning.prune_kernel(kernel, bias, fraction, "unit")
    removed = np.argsort(np.linalg.norm(kernel, axis=0))[:expected]
    dead = np.all(pruned == 0, axis=0)
    assert dead.sum() == expected
    assert set(np.flatnonzero(dead)) == set(removed)
    np.testing.assert_array_equal(pruned_bias == 0, dead)
    np.testing.assert_array_equal(pruned[:, ~dead], kernel[:, ~dead])


def test_prune_count_tolerates_float_error():
    assert pruning.prune_count(0.29, 100) == 29
    assert pruning.prune_count(0.7, 1000) == 700
    with pytest.raises(ValueError):
        pruning.prune_count(1.5, 10)


def _model(use_bias=True):
    model = models.mlp((6,), hidden=(20, 10), num_classes=4, use_bias=use_bias, seed=3)
    if use_bias:  # non-zero biases so bias handling is visible
        for layer in pruning.dense_layers(model):
            layer.bias.assign(np.linspace(0.1, 0.5, layer.bias.shape[0]).astype(np.float32))
    return model


def test_zero_fraction_changes_no_output_and_original_is_untouched():
    model = _model()
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    for kind in pruning.KINDS:
        pruned, report = pruning.prune_model(model, 0.0, kind)
        np.testing.assert_array_equal(pruned(x), model(x))
        assert report.sparsity == 0.0
    pruned, _ = pruning.prune_model(model, 0.5, "unit")
    assert not np.allclose(pruned(x), model(x))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("use_bias", [True, False])
def test_unit_pruning_silences_units_and_reports_exact_sparsity(use_bias):
    model = _model(use_bias)
    pruned, report = pruning.prune_model(model, 0.5, "unit")
    hidden = pruning.prunable_layers(pruned)
    assert [layer.name for layer in hidden] == ["dense_0", "dense_1"]
    # Pruned units output exactly 0 on any input: kernel column and bias are gone.
    x = np.random.default_rng(1).normal(size=(32, 6)).astype(np.float32) * 5
    activations = keras.Sequential(pruned.layers[:2])(x).numpy()  # flatten, dense_0
    assert (np.all(activations == 0, axis=0)).sum() >= 10
    assert [r.removed for r in report.layers] == [10, 5]
    assert report.sparsity == pytest.approx((6 * 10 + 20 * 5) / (6 * 20 + 20 * 10))
    # The logits layer is not pruned by default.
    np.testing.assert_array_equal(pruned.get_layer("logits").kernel.numpy(),
                                  model.get_layer("logits").kernel.numpy())
    _, with_logits = pruning.prune_model(model, 0.5, "unit", include_logits=True)
    assert len(with_logits.layers) == 3


def test_weight_pruning_report_counts_zeros():
    model = _model(use_bias=False)
    _, report = pruning.prune_model(model, 0.9, "weight")
    assert [r.removed for r in report.layers] == [5 * 20, 18 * 10]
    assert report.sparsity == pytest.approx((100 + 180) / 320)
    assert 0 < report.model_sparsity < report.sparsity
