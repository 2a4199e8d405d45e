"""Two networks on two clocks, joined by a DNI (Jaderberg et al. 2016, section 3.3).

Network A (an LSTM) ticks every step: it reads one MNIST digit per step and
classifies it (10-way softmax, its own loss). At every step it also emits a
message `m_t` (a linear read-out of its state). Network B (another LSTM) ticks
every `tick_ratio` = k steps: at steps k-1, 2k-1, ... it reads A's message and
predicts how many odd digits A has seen since B's previous tick (k+1 classes).

* `method="backprop"`: both clocks synchronised in one graph; B's loss is
  backpropagated through the messages into A (the baseline).
* `method="dni"`: B reads the messages through `stop_gradient`, so its loss never
  reaches A directly. A synthetic gradient module M(m) at the A-to-B interface
  (linear, zero-initialised) supplies A with a predicted gradient of B's loss
  at each message B reads; M is trained by L2 regression onto the true
  (per-example) gradient of B's loss with respect to the messages, which B
  computes when it ticks. A is trained on its own loss plus the synthetic
  gradient (backpropagated through A's whole episode); B on its loss only.
  With `sg_context="count"` (cDNI) M also reads the one-hot target count of
  the tick, M(m, c); with "none" it reads the message only.

Data: `(digits, labels)` with digits float [Bt, S, 28, 28, 1] (or [Bt, S, F])
and int labels [Bt, S]; S must be a multiple of k. `episode_dataset` builds
these from an image set. Metrics: `loss` (sum of the two losses),
`a_accuracy` (digit classification), `b_accuracy` (odd count), `a_loss`,
`b_loss`, and for dni `sg_loss`.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dni_tf.synthetic_gradients import regression_loss, surrogate_objective
from dni_tf.core import replica_mean

METHODS = ("backprop", "dni")
SG_CONTEXTS = ("none", "count")


def odd_counts(labels, tick_ratio: int):
    """[B, S] digit labels -> [B, S // k] odd digits in each block of k steps."""
    odd = tf.cast(tf.math.floormod(tf.cast(labels, tf.int32), 2), tf.int32)
    blocks = tf.reshape(odd, [tf.shape(odd)[0], -1, tick_ratio])
    return tf.reduce_sum(blocks, axis=-1)


def episode_dataset(images: np.ndarray, labels: np.ndarray, episode_length: int,
                    batch_size: int, shuffle: bool, seed: int = 0, repeat: bool = True):
    """Episodes of `episode_length` consecutive digits, batched.

    Images are flattened to [S, H*W*C] float32. With `shuffle`, the digit order
    is reshuffled every pass (seeded); incomplete episodes/batches are dropped.
    """
    flat = images.reshape(len(images), -1).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((flat, labels.astype(np.int32)))
    if shuffle:
        dataset = dataset.shuffle(len(flat), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(episode_length, drop_remainder=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(2)


class MultiNetwork(keras.Model):
    """Networks A (fast) and B (slow, every `tick_ratio` steps), backprop or DNI.

    Args:
      tick_ratio: k >= 1, B ticks once per k steps of A.
      method: "backprop" or "dni".
      hidden_a, hidden_b: LSTM sizes; message_size: width of A's message.
      b_weight: weight of B's loss in the backprop objective.
      sg_context: "none" (M(m)) or "count" (M(m, one-hot target count), cDNI).
      seed: initialiser seed.
    """

    def __init__(self, tick_ratio: int, method: str = "dni", hidden_a: int = 64,
                 hidden_b: int = 32, message_size: int = 16, num_classes: int = 10,
                 b_weight: float = 1.0, sg_context: str = "none", seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if int(tick_ratio) < 1:
            raise ValueError(f"tick_ratio must be >= 1, got {tick_ratio}")
        if sg_context not in SG_CONTEXTS:
            raise ValueError(f"sg_context must be one of {SG_CONTEXTS}, got {sg_context!r}")
        self.sg_context = sg_context
        self.tick_ratio = int(tick_ratio)
        self.method = method
        self.b_weight = float(b_weight)
        glorot = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
        self.encoder = keras.layers.Dense(128, activation="relu", kernel_initializer=glorot(0),
                                          name="a_encoder")
        orthogonal = lambda i: keras.initializers.Orthogonal(seed=seed + i)  # noqa: E731
        self.core_a = keras.layers.LSTM(hidden_a, return_sequences=True,
                                        kernel_initializer=glorot(1),
                                        recurrent_initializer=orthogonal(2), name="a_core")
        self.classifier = keras.layers.Dense(num_classes, kernel_initializer=glorot(3),
                                             name="a_classifier")
        self.message = keras.layers.Dense(message_size, kernel_initializer=glorot(4),
                                          name="a_message")
        self.core_b = keras.layers.LSTM(hidden_b, return_sequences=True,
                                        kernel_initializer=glorot(5),
                                        recurrent_initializer=orthogonal(6), name="b_core")
        self.counter = keras.layers.Dense(self.tick_ratio + 1, kernel_initializer=glorot(7),
                                          name="b_counter")
        self.synthetic_gradient = None
        if method == "dni":
            self.synthetic_gradient = keras.layers.Dense(
                message_size, kernel_initializer="zeros", bias_initializer="zeros",
                name="synthetic_gradient")
        names = ["loss", "a_loss", "b_loss", "a_accuracy", "b_accuracy"]
        if method == "dni":
            names.append("sg_loss")
        self._trackers = {n: keras.metrics.Mean(name=n) for n in names}

    @property
    def metrics(self):
        return list(self._trackers.values())

    def build(self, input_shape):
        features = int(np.prod(input_shape[2:]))
        self.encoder.build((None, None, features))
        self.core_a.build((None, None, 128))
        self.classifier.build((None, None, self.core_a.units))
        self.message.build((None, None, self.core_a.units))
        self.core_b.build((None, None, self.message.units))
        self.counter.build((None, None, self.core_b.units))
        if self.synthetic_gradient is not None:
            context = self.tick_ratio + 1 if self.sg_context == "count" else 0
            self.synthetic_gradient.build((None, self.message.units + context))
        super().build(input_shape)

    @property
    def a_variables(self):
        layers = [self.encoder, self.core_a, self.classifier, self.message]
        return [v for layer in layers for v in layer.trainable_variables]

    @property
    def b_variables(self):
        return self.core_b.trainable_variables + self.counter.trainable_variables

    def _run_a(self, digits):
        """digits [B, S, ...] -> (digit logits [B, S, 10], messages at B's ticks [B, S/k, M])."""
        shape = tf.shape(digits)
        flat = tf.reshape(tf.cast(digits, tf.float32), [shape[0], shape[1], -1])
        h = self.core_a(self.encoder(flat))
        messages = self.message(h)[:, self.tick_ratio - 1::self.tick_ratio]
        return self.classifier(h), messages

    def _run_b(self, messages):
        return self.counter(self.core_b(messages))

    def call(self, digits, training=False):
        digit_logits, messages = self._run_a(digits)
        return digit_logits, self._run_b(messages)

    def _task_losses(self, labels, digit_logits, count_logits):
        counts = odd_counts(labels, self.tick_ratio)
        a_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=digit_logits))
        b_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=counts, logits=count_logits))
        return a_loss, b_loss, counts

    def compute_gradients(self, digits, labels):
        """(grads, variables, stats) of one training step of the chosen method."""
        batch = tf.shape(digits)[0]
        if self.method == "backprop":
            with tf.GradientTape() as tape:
                digit_logits, messages = self._run_a(digits)
                count_logits = self._run_b(messages)
                a_loss, b_loss, counts = self._task_losses(labels, digit_logits, count_logits)
                total = a_loss + self.b_weight * b_loss
            variables = self.a_variables + self.b_variables
            grads = tape.gradient(total, variables)
            return grads, variables, (a_loss, b_loss, counts, digit_logits, count_logits, 0.0)
        with tf.GradientTape(persistent=True) as tape:
            digit_logits, messages = self._run_a(digits)
            # B only sees the messages: its loss cannot reach A through them.
            received = tf.stop_gradient(messages)
            tape.watch(received)
            count_logits = self._run_b(received)
            a_loss, b_loss, counts = self._task_losses(labels, digit_logits, count_logits)
            flat_messages = tf.reshape(messages, [-1, self.message.units])
            sg_input = tf.stop_gradient(flat_messages)
            if self.sg_context == "count":
                sg_input = tf.concat(
                    [sg_input, tf.one_hot(tf.reshape(counts, [-1]), self.tick_ratio + 1)], -1)
            predicted = self.synthetic_gradient(sg_input)
            # Each message row stands for one example: the SG is in per-example units.
            a_objective = a_loss + surrogate_objective(flat_messages, predicted, batch)
        b_grads = tape.gradient(b_loss, self.b_variables + [received])
        target = tf.reshape(b_grads[-1], [-1, self.message.units]) * tf.cast(batch, tf.float32)
        with tf.GradientTape() as sg_tape:
            sg_loss = regression_loss(self.synthetic_gradient(sg_input), target)
        a_grads = tape.gradient(a_objective, self.a_variables)
        sg_grads = sg_tape.gradient(sg_loss, self.synthetic_gradient.trainable_variables)
        del tape
        grads = list(a_grads) + list(b_grads[:-1]) + list(sg_grads)
        variables = (self.a_variables + self.b_variables
                     + self.synthetic_gradient.trainable_variables)
        return grads, variables, (a_loss, b_loss, counts, digit_logits, count_logits, sg_loss)

    def train_step(self, data):
        digits, labels = data
        grads, variables, stats = self.compute_gradients(digits, labels)
        self.optimizer.apply(replica_mean(grads), variables)
        return self._record(labels, *stats)

    def test_step(self, data):
        digits, labels = data
        digit_logits, count_logits = self(digits)
        a_loss, b_loss, counts = self._task_losses(labels, digit_logits, count_logits)
        logs = self._record(labels, a_loss, b_loss, counts, digit_logits, count_logits, None)
        return {k: v for k, v in logs.items() if k != "sg_loss"}

    def _record(self, labels, a_loss, b_loss, counts, digit_logits, count_logits, sg_loss):
        self._trackers["loss"].update_state(a_loss + b_loss)
        self._trackers["a_loss"].update_state(a_loss)
        self._trackers["b_loss"].update_state(b_loss)
        self._trackers["a_accuracy"].update_state(tf.reduce_mean(tf.cast(
            tf.equal(tf.argmax(digit_logits, -1, output_type=tf.int32),
                     tf.cast(labels, tf.int32)), tf.float32)))
        self._trackers["b_accuracy"].update_state(tf.reduce_mean(tf.cast(
            tf.equal(tf.argmax(count_logits, -1, output_type=tf.int32), counts), tf.float32)))
        if sg_loss is not None and "sg_loss" in self._trackers:
            self._trackers["sg_loss"].update_state(sg_loss)
        return {m.name: m.result() for m in self.metrics}
