"""dni_tf.random_streams: the same draws with and without XLA, right distributions."""

import numpy as np
import pytest
import tensorflow as tf

from dni_tf import random_streams

SEED = tf.constant([12, 34], tf.int32)


def _draws():
    return (random_streams.uniform([4000], SEED), random_streams.randint([4000], 7, SEED),
            random_streams.normal([4000], SEED))


def test_xla_draws_the_same_numbers_as_graph_mode():
    graph = tf.function(_draws)()
    xla = tf.function(_draws, jit_compile=True)()
    np.testing.assert_array_equal(xla[0].numpy(), graph[0].numpy())
    np.testing.assert_array_equal(xla[1].numpy(), graph[1].numpy())
    # Same words; log / cos may differ in the last bit between the two.
    np.testing.assert_allclose(xla[2].numpy(), graph[2].numpy(), rtol=1e-5, atol=1e-6)


def test_distributions():
    u, k, z = (t.numpy() for t in _draws())
    assert u.dtype == np.float32 and 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
    assert set(np.unique(k)) == set(range(7))
    counts = np.bincount(k, minlength=7)
    assert np.all(np.abs(counts / k.size - 1 / 7) < 4 * np.sqrt((1 / 7) * (6 / 7) / k.size))
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1.0) < 0.05
    # Different seeds, different draws; the same seed, the same draws.
    other = random_streams.uniform([4000], SEED + 1).numpy()
    assert not np.array_equal(u, other)
    np.testing.assert_array_equal(u, random_streams.uniform([4000], SEED).numpy())


def test_next_seed_advances_the_generator():
    import keras

    generator = keras.random.SeedGenerator(3)
    first, second = random_streams.next_seed(generator), random_streams.next_seed(generator)
    assert first.dtype == tf.int32 and first.shape == (2,)
    assert not np.array_equal(first.numpy(), second.numpy())


def test_randint_range_is_checked():
    with pytest.raises(ValueError, match="maxval"):
        random_streams.randint([3], 0, SEED)
