"""Random draws that are the same with and without XLA.

TensorFlow's stateless Philox generator yields the same 32-bit words in graph
mode and under XLA, but the two turn words into floats differently, so
`keras.random.uniform` / `tf.random.stateless_uniform` give other numbers under
`jit_compile=True` (TensorFlow 2.16-2.20 on CPU). The algorithms draw words
here and convert them themselves, so a run, and a run resumed from a
checkpoint, makes the same random choices whether or not it is compiled with
XLA, and the conformance suite can compare the two exactly.

Seeds are stateless int32 [2] tensors; `next_seed` takes one from a
`keras.random.SeedGenerator` (advancing it, as `keras.random.*` does).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

_MANTISSA_BITS = 24  # float32 holds 24-bit integers exactly


def next_seed(generator: keras.random.SeedGenerator) -> tf.Tensor:
    """The generator's next stateless seed, as int32 [2] (what XLA accepts)."""
    seed = tf.cast(generator.next(), tf.int64)
    return tf.cast(tf.math.floormod(seed, 2**31 - 1), tf.int32)


def words(shape, seed: tf.Tensor) -> tf.Tensor:
    """uint32 tensor of `shape`: Philox words, identical in graph mode and XLA."""
    return tf.random.stateless_uniform(shape, seed=seed, minval=None, maxval=None,
                                       dtype=tf.uint32, alg="philox")


def _unit(bits: tf.Tensor) -> tf.Tensor:
    """Top 24 bits of uint32 words -> float32 multiples of 2**-24 in [0, 1)."""
    top = tf.bitwise.right_shift(bits, 32 - _MANTISSA_BITS)
    return tf.cast(top, tf.float32) * (2.0 ** -_MANTISSA_BITS)


def uniform(shape, seed: tf.Tensor) -> tf.Tensor:
    """float32 in [0, 1), a multiple of 2**-24."""
    return _unit(words(shape, seed))


def normal(shape, seed: tf.Tensor) -> tf.Tensor:
    """float32 standard normal draws (Box-Muller on two 24-bit uniforms).

    The words are identical with and without XLA; `log` and `cos` may differ in
    the last bit between the two.
    """
    both = words([2, *shape], seed)
    u1 = 1.0 - _unit(both[0])  # (0, 1]: log is finite
    u2 = _unit(both[1])
    return tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * math.pi) * u2)


def randint(shape, maxval: int, seed: tf.Tensor) -> tf.Tensor:
    """int32 in [0, maxval) (maxval <= 2**24; bias below 2**-24 * maxval)."""
    if not 1 <= maxval <= 2**_MANTISSA_BITS:
        raise ValueError(f"maxval must be in [1, 2**24], got {maxval}")
    return tf.cast(tf.floor(uniform(shape, seed) * maxval), tf.int32)
