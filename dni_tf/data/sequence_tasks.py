"""Copy and Repeat Copy (Graves et al. 2014) as `tf.data` pipelines, with a curriculum.

Layouts for one sequence of `length` L random binary vectors of `num_bits` bits
(all tensors float32, time-major within each example; a batch adds axis 0):

Copy, N = 2L + 1 steps:
  input  [N, num_bits + 1]: rows 0..L-1 the bits, row L the delimiter channel
         (last channel = 1), rows L+1..2L blank (the answer phase).
  target [N, num_bits]: rows L+1..2L are the input bits, zero elsewhere.
  mask   [N]: 1 on rows L+1..2L only.

Repeat Copy with R repeats (1 <= R <= max_repeats), N = L + 1 + L*R + 1 steps:
  input  [N, num_bits + 2]: rows 0..L-1 the bits; row L carries the delimiter
         on its own channel (num_bits) and the repeat count R / max_repeats on
         another (num_bits + 1), as in Graves et al. (2014), where the count
         "appears on a separate input channel"; the remaining rows are blank.
  target [N, num_bits + 1]: the bits repeated R times on rows L+1..L+L*R, then
         an end marker (channel num_bits = 1) on the last row.
  mask   [N]: 1 on rows L+1..N-1 (the L*R answer rows and the end marker).

Batches are generated from stateless random ops seeded by `(seed, batch index)`,
so a dataset is deterministic and a resumed run (which skips consumed batches)
sees the same batches. R is drawn once per batch so every sequence in a batch
has the same length.

The `Curriculum` layer holds the current level (N, and R for Repeat Copy) as
Keras variables (saved with the model's weights); `task_dataset(...,
length=curriculum)` reads it each time it builds a batch (at the level, or
drawn uniformly below it with `sampling="uniform"`), so the training stream
follows as soon as the model advances it. The dataset has no prefetch, so
batch i is built after step i-1's update and the stream stays deterministic.
"""

from __future__ import annotations

from typing import Union

import keras
import tensorflow as tf

TASKS = ("copy", "repeat_copy")


def copy_batch(seed, batch_size: int, length, num_bits: int = 8):
    """One Copy batch: (inputs [B, 2L+1, bits+1], targets [B, 2L+1, bits], mask [B, 2L+1])."""
    length = tf.cast(length, tf.int32)
    bits = tf.cast(tf.random.stateless_uniform([batch_size, length, num_bits], seed,
                                               minval=0, maxval=2, dtype=tf.int32), tf.float32)
    blank_in = tf.zeros([batch_size, length, num_bits + 1])
    delimiter = tf.one_hot(tf.fill([batch_size, 1], num_bits), num_bits + 1)
    inputs = tf.concat([tf.pad(bits, [[0, 0], [0, 0], [0, 1]]), delimiter, blank_in], axis=1)
    targets = tf.concat([tf.zeros([batch_size, length + 1, num_bits]), bits], axis=1)
    mask = tf.concat([tf.zeros([batch_size, length + 1]), tf.ones([batch_size, length])], axis=1)
    return inputs, targets, mask


def repeat_copy_batch(seed, batch_size: int, length, repeats, num_bits: int = 8,
                      max_repeats: int = 4):
    """One Repeat Copy batch with `repeats` R for every sequence (see module docstring)."""
    length = tf.cast(length, tf.int32)
    repeats = tf.cast(repeats, tf.int32)
    bits = tf.cast(tf.random.stateless_uniform([batch_size, length, num_bits], seed,
                                               minval=0, maxval=2, dtype=tf.int32), tf.float32)
    answer = length * repeats
    marker = tf.concat([tf.zeros([batch_size, 1, num_bits + 1]),
                        tf.fill([batch_size, 1, 1],
                                tf.cast(repeats, tf.float32) / float(max_repeats))], axis=2)
    marker = marker + tf.one_hot(tf.fill([batch_size, 1], num_bits), num_bits + 2)
    inputs = tf.concat([tf.pad(bits, [[0, 0], [0, 0], [0, 2]]), marker,
                        tf.zeros([batch_size, answer + 1, num_bits + 2])], axis=1)
    repeated = tf.tile(bits, [1, repeats, 1])
    end = tf.one_hot(tf.fill([batch_size, 1], num_bits), num_bits + 1)
    targets = tf.concat([tf.zeros([batch_size, length + 1, num_bits + 1]),
                         tf.pad(repeated, [[0, 0], [0, 0], [0, 1]]), end], axis=1)
    mask = tf.concat([tf.zeros([batch_size, length + 1]), tf.ones([batch_size, answer + 1])],
                     axis=1)
    return inputs, targets, mask


def task_channels(task: str, num_bits: int = 8):
    """(input channels, output channels) of a task."""
    if task == "copy":
        return num_bits + 1, num_bits
    if task == "repeat_copy":
        return num_bits + 2, num_bits + 1
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class Curriculum(keras.layers.Layer):
    """Curriculum over the copy length L (and, for Repeat Copy, the repeats R).

    (L is the number of vectors to copy, as in the module docstring; the
    sequence has more steps, 2L + 1 for Copy. Below, "N" is the level of L.)
    Under several replicas the caller all-reduces `error` first, so every
    replica's copy of the variables takes the same decision.

    Every `check_every` training batches the mean error (wrong answer bits per
    sequence) over those batches is compared with `threshold` (the paper's
    0.15 bits per sequence); below it, the current level counts as solved and
    the curriculum advances by one step. With `max_repeats` > 1 (Repeat Copy)
    a step lengthens N or adds a repeat, alternately (N when N <= R, else R;
    whichever has reached its cap stops growing), so both grow together from
    (min_length, 1). Variables (saved with the model): `length`, `repeats`,
    `max_solved` and `max_repeats_solved` (the last solved level, 0 = none),
    and the running sum/count.

    `update(error)` is graph-safe: call it inside `train_step`.
    """

    def __init__(self, min_length: int = 1, max_length: int = 1000, threshold: float = 0.15,
                 check_every: int = 50, max_repeats: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= min_length <= max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        if max_repeats < 1:
            raise ValueError(f"max_repeats must be >= 1, got {max_repeats}")
        self.min_length = int(min_length)
        self.max_length = int(max_length)
        self.max_repeats = int(max_repeats)
        self.threshold = float(threshold)
        self.check_every = int(check_every)
        self.length = self.add_weight(shape=(), dtype="int32", trainable=False, name="length",
                                      initializer=keras.initializers.Constant(self.min_length))
        self.repeats = self.add_weight(shape=(), dtype="int32", trainable=False, name="repeats",
                                       initializer=keras.initializers.Constant(1))
        self.max_solved = self.add_weight(shape=(), dtype="int32", trainable=False,
                                          name="max_solved", initializer="zeros")
        self.max_repeats_solved = self.add_weight(shape=(), dtype="int32", trainable=False,
                                                  name="max_repeats_solved", initializer="zeros")
        self.error_sum = self.add_weight(shape=(), dtype="float32", trainable=False,
                                         name="error_sum", initializer="zeros")
        self.count = self.add_weight(shape=(), dtype="int32", trainable=False, name="count",
                                     initializer="zeros")
        self.built = True

    def update(self, error):
        """Adds one batch's error; every `check_every` calls, maybe advances."""
        error_sum = self.error_sum.value + tf.cast(error, tf.float32)
        count = self.count.value + 1
        check = count >= self.check_every
        solved = tf.logical_and(check, error_sum / tf.cast(count, tf.float32) < self.threshold)
        length, repeats = self.length.value, self.repeats.value
        self.max_solved.assign(tf.where(solved, tf.maximum(self.max_solved.value, length),
                                        self.max_solved.value))
        self.max_repeats_solved.assign(tf.where(
            solved, tf.maximum(self.max_repeats_solved.value, repeats),
            self.max_repeats_solved.value))
        grow_repeats = tf.logical_and(
            repeats < self.max_repeats,
            tf.logical_or(length > repeats, length >= self.max_length))
        grow_length = tf.logical_and(solved, tf.logical_not(grow_repeats))
        self.length.assign(tf.where(grow_length, tf.minimum(length + 1, self.max_length), length))
        self.repeats.assign(tf.where(tf.logical_and(solved, grow_repeats), repeats + 1, repeats))
        self.error_sum.assign(tf.where(check, 0.0, error_sum))
        self.count.assign(tf.where(check, 0, count))

    def call(self, inputs):
        return inputs


SAMPLINGS = ("current", "uniform")


def _level(length, seed, sampling):
    """(N, R or None) of one batch: the curriculum's level, or drawn below it."""
    if not isinstance(length, Curriculum):
        return tf.constant(int(length), tf.int32), None
    n = tf.convert_to_tensor(length.length.value)
    r = tf.convert_to_tensor(length.repeats.value)
    if sampling == "uniform":
        n = tf.random.stateless_uniform([], seed + [0, 1 << 41], minval=1, maxval=n + 1,
                                        dtype=tf.int32)
        r = tf.random.stateless_uniform([], seed + [0, 1 << 42], minval=1, maxval=r + 1,
                                        dtype=tf.int32)
    return n, (r if length.max_repeats > 1 else None)


def task_dataset(task: str, batch_size: int, length: Union[int, Curriculum], seed: int = 0,
                 num_bits: int = 8, max_repeats: int = 4, num_batches: int = -1,
                 sampling: str = "current"):
    """A `tf.data.Dataset` of `(inputs, targets, mask)` batches of a task.

    Args:
      task: "copy" or "repeat_copy".
      length: a fixed L, or a `Curriculum` whose current level is read when
        each batch is built.
      seed: stream seed; batch i uses the stateless seed (seed, i).
      max_repeats: Repeat Copy: the repeat-count channel holds R / max_repeats;
        without a repeats curriculum R is drawn uniformly from 1..max_repeats
        per batch.
      num_batches: -1 for an infinite stream, else that many batches.
      sampling: with a Curriculum at level (N, R): "current" uses N (and R)
        for every batch; "uniform" draws each batch's L from 1..N (and R from
        1..R), so earlier levels keep being rehearsed.

    All sequences of a batch share L (and R), so a batch is one episode per
    row; a stateful model fed this stream sees a continuous stream of episodes.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")

    def make(index):
        stream_seed = tf.stack([tf.constant(seed, tf.int64), index])
        current, repeats = _level(length, stream_seed, sampling)
        if task == "copy":
            return copy_batch(stream_seed, batch_size, current, num_bits)
        if repeats is None:
            repeats = tf.random.stateless_uniform([], stream_seed + [0, 1 << 40], minval=1,
                                                  maxval=max_repeats + 1, dtype=tf.int32)
        return repeat_copy_batch(stream_seed, batch_size, current, repeats, num_bits,
                                 max_repeats)

    dataset = tf.data.Dataset.counter().map(make)
    if num_batches >= 0:
        dataset = dataset.take(num_batches)
    options = tf.data.Options()
    options.deterministic = True
    # No prefetch anywhere: a batch must be built after the previous step's
    # curriculum update, or the stream would depend on thread timing.
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    return dataset.with_options(options)
