"""Shared by the mixed-precision tests: a model built under a Keras dtype policy,
and a training step compared with the float32 step from the same weights."""

import numpy as np

from dni_tf.harness import fast_path


def built_under(precision, make):
    """`make()` under `--mixed_precision=precision`; the float32 policy is restored after."""
    try:
        fast_path.set_mixed_precision(precision)
        return make()
    finally:
        fast_path.set_mixed_precision("none")


def assert_moves_follow(reference, model, train, limit, every_variable_moves=False):
    """Runs `train(m)` (returns the last logs) on `reference` and on `model`, which
    start from the same weights, and checks that every variable of `model` moves
    as in `reference` within `limit`, relative to the reference move's norm."""
    moves = []
    for m in (reference, model):
        before = [v.numpy().copy() for v in m.trainable_variables]
        logs = train(m)
        assert all(np.isfinite(float(value)) for value in logs.values())
        moves.append([v.numpy() - b for v, b in zip(m.trainable_variables, before)])
    for v, exact, rounded in zip(model.trainable_variables, *moves):
        if every_variable_moves:
            assert np.abs(exact).max() > 0, v.path
        error = np.linalg.norm(rounded - exact) / (np.linalg.norm(exact) + 1e-12)
        assert error < limit, (v.path, error)
