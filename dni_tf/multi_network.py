"""Two networks on two clocks, joined by a DNI (Jaderberg et al. 2016, section 3.3).

The system (one episode = k ticks of B = k*k steps of A; both start from zero
states):

* Network A (an LSTM) ticks every step t. It reads one digit image, says
  whether the digit is odd (its own 2-way task, every step) and emits a
  message `m_t` (a linear read-out of its state).
* Network B (another LSTM) ticks every k = `tick_ratio` steps, at
  t = k-1, 2k-1, ...: its input at tick j is the k messages A sent since B's
  previous tick (concatenated, [Bt, k*M]). At every tick it outputs how many
  3s have been seen since the episode began (k*k + 1 classes). After its first
  tick this needs B's memory: its input covers only the last k digits.

Methods:

* `"backprop"` (synchronous baseline): the whole episode is unrolled, A's
  steps and B's ticks in one graph; B's loss is backpropagated through the
  messages into A and through A's recurrence. One update of both networks per
  episode (every k*k steps): A is update-locked to B.
* `"dni"`: B reads the messages as constants (`stop_gradient`). A synthetic
  gradient module M at the A-to-B interface (linear, zero-initialised) gives A
  a predicted gradient M(m_t) of B's loss at each message. The clocks of the
  updates:
  - A: an optimizer step after EVERY step t, on the gradient of its own step
    loss plus `sum(m_t * M(m_t)) / Bt` (i.e. M(m_t) backpropagated into A),
    through step t only (A's state is carried, its gradient cut each step).
  - B: an optimizer step at every tick j, on the gradient of its tick-j loss
    backpropagated through its ticks 1..j of the episode (the recorded forward
    computation, each tick with the weights it ran with).
  - M: once per episode, when its targets are complete: the target of
    message m_t is the true gradient of B's losses with respect to m_t,
    `Bt * sum_{j >= tick reading m_t} dL_B_j / dm_t` (per-example units; each
    term taken at tick j with B's weights of tick j), regressed by L2.
  With `sg_context="count"` (cDNI) M also reads the one-hot target of the tick
  that reads the message: M(m_t, c_j); with "none" it reads the message only.

Each method uses its own optimizer clones (A: the compiled optimizer; B and
M: `b_optimizer`, `sg_optimizer`, same class and settings, their own step
counts), so `optimizer.iterations` counts A's updates.

Data: `(digits, labels)`, digits float [Bt, k*k, H, W, C] or [Bt, k*k, F],
labels int [Bt, k*k] (digit classes 0..9). The episode length must be static
(k*k); the time loop is unrolled when the step is traced, so the graph grows
with k*k. Metrics: `loss` (= a_loss + b_loss), `a_loss`, `b_loss`,
`a_accuracy` (odd/even, every step), `b_accuracy` (count, every tick),
`b_final_accuracy` (count at the last tick), and for dni `sg_loss`, and
`sg_cosine` / `sg_norm_ratio`: cosine and norm ratio between the synthetic
gradients A was given in the episode and their targets (all messages of the
batch as one vector; training only).
"""

from __future__ import annotations

from typing import List

import keras
import numpy as np
import tensorflow as tf

from dni_tf.core import BuildsBeforeTracing, replica_mean
from dni_tf.synthetic_gradients import regression_loss, surrogate_objective

METHODS = ("backprop", "dni")
SG_CONTEXTS = ("none", "count")
COUNTED_DIGIT = 3  # B counts this digit (the paper's B counts 3s)


def parity_targets(labels):
    """[Bt, S] digit labels -> [Bt, S] int32, 1 for an odd digit (A's task)."""
    return tf.math.floormod(tf.cast(labels, tf.int32), 2)


def tick_counts(labels, tick_ratio: int):
    """[Bt, k*k] digit labels -> [Bt, k] int32: 3s seen from the episode start to each tick."""
    counted = tf.cast(tf.equal(tf.cast(labels, tf.int32), COUNTED_DIGIT), tf.int32)
    blocks = tf.reshape(counted, [tf.shape(counted)[0], tick_ratio, tick_ratio])
    return tf.cumsum(tf.reduce_sum(blocks, axis=-1), axis=1)


def episode_dataset(images: np.ndarray, labels: np.ndarray, tick_ratio: int,
                    batch_size: int, shuffle: bool, seed: int = 0, repeat: bool = True):
    """Episodes of k*k consecutive digits, batched: ([Bt, k*k, H*W*C], [Bt, k*k]).

    Images are flattened to float32. With `shuffle`, the digit order is
    reshuffled every pass (seeded); incomplete episodes and batches are dropped,
    so every batch has static shapes.
    """
    flat = images.reshape(len(images), -1).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((flat, labels.astype(np.int32)))
    if shuffle:
        dataset = dataset.shuffle(len(flat), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(tick_ratio * tick_ratio, drop_remainder=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(2)


def _cross_entropy(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits))


class MultiNetwork(BuildsBeforeTracing, keras.Model):
    """Network A (every step) and network B (every `tick_ratio` steps): backprop or DNI.

    Args:
      tick_ratio: k >= 1; B ticks once per k steps of A; an episode is k*k steps.
      method: "backprop" (synchronous, one update per episode) or "dni".
      hidden_a, hidden_b: LSTM sizes; message_size: width M of one message;
      encoder_units: A's ReLU layer between the image and its LSTM.
      sg_context: "none" (M(m)) or "count" (M(m, one-hot target of B's tick), cDNI).
      sg_learning_rate: learning rate of M's optimizer; None: the compiled one's.
      seed: initialiser seed.
    """

    def __init__(self, tick_ratio: int, method: str = "dni", hidden_a: int = 64,
                 hidden_b: int = 64, message_size: int = 16, encoder_units: int = 128,
                 sg_context: str = "none", sg_learning_rate=None, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if int(tick_ratio) < 1:
            raise ValueError(f"tick_ratio must be >= 1, got {tick_ratio}")
        if sg_context not in SG_CONTEXTS:
            raise ValueError(f"sg_context must be one of {SG_CONTEXTS}, got {sg_context!r}")
        self.tick_ratio = int(tick_ratio)
        self.episode_length = self.tick_ratio * self.tick_ratio
        self.num_counts = self.episode_length + 1
        self.method = method
        self.sg_context = sg_context
        self.sg_learning_rate = sg_learning_rate
        glorot = lambda i: keras.initializers.GlorotUniform(seed=seed + i)  # noqa: E731
        orthogonal = lambda i: keras.initializers.Orthogonal(seed=seed + i)  # noqa: E731
        self.encoder = keras.layers.Dense(encoder_units, activation="relu",
                                          kernel_initializer=glorot(0), name="a_encoder")
        self.cell_a = keras.layers.LSTMCell(hidden_a, kernel_initializer=glorot(1),
                                            recurrent_initializer=orthogonal(2), name="a_core")
        # Under mixed precision the heads give float32 logits (Keras' advice for output
        # layers) and M stays float32: its inputs and targets are cast at its boundary.
        self.parity_head = keras.layers.Dense(2, kernel_initializer=glorot(3), dtype="float32",
                                              name="a_parity")
        self.message = keras.layers.Dense(message_size, kernel_initializer=glorot(4),
                                          name="a_message")
        self.cell_b = keras.layers.LSTMCell(hidden_b, kernel_initializer=glorot(5),
                                            recurrent_initializer=orthogonal(6), name="b_core")
        self.counter = keras.layers.Dense(self.num_counts, kernel_initializer=glorot(7),
                                          dtype="float32", name="b_counter")
        self.synthetic_gradient = None
        if method == "dni":
            self.synthetic_gradient = keras.layers.Dense(
                message_size, kernel_initializer="zeros", bias_initializer="zeros",
                dtype="float32", name="synthetic_gradient")
        self.b_optimizer = None
        self.sg_optimizer = None
        names = ["loss", "a_loss", "b_loss", "a_accuracy", "b_accuracy", "b_final_accuracy"]
        if method == "dni":
            names += ["sg_loss", "sg_cosine", "sg_norm_ratio"]
        self._trackers = {n: keras.metrics.Mean(name=n) for n in names}

    @property
    def metrics(self):
        return list(self._trackers.values())

    # ----------------------------------------------------------------- building
    def build(self, input_shape):
        features = int(np.prod(input_shape[2:]))
        self.encoder.build((None, features))
        self.cell_a.build((None, self.encoder.units))
        self.parity_head.build((None, self.cell_a.units))
        self.message.build((None, self.cell_a.units))
        self.cell_b.build((None, self.tick_ratio * self.message.units))
        self.counter.build((None, self.cell_b.units))
        if self.synthetic_gradient is not None:
            context = self.num_counts if self.sg_context == "count" else 0
            self.synthetic_gradient.build((None, self.message.units + context))
        self.built = True
        self._build_optimizers()

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if self.built:
            self._build_optimizers()

    def _build_optimizers(self):
        """Builds the compiled optimizer (A's, or everything's for backprop) and B's and M's clones."""
        if getattr(self, "optimizer", None) is None:
            return
        if self.method == "dni" and self.b_optimizer is None:
            config = dict(self.optimizer.get_config())
            config["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
            self.b_optimizer = self.optimizer.__class__.from_config(dict(config))
            if self.sg_learning_rate is not None:
                config["learning_rate"] = float(self.sg_learning_rate)
            self.sg_optimizer = self.optimizer.__class__.from_config(dict(config))
            self.b_optimizer.build(self.b_variables)
            self.sg_optimizer.build(self.synthetic_gradient.trainable_variables)
        if not self.optimizer.built:
            self.optimizer.build(self.a_variables if self.method == "dni"
                                 else self.a_variables + self.b_variables)

    @property
    def a_variables(self) -> List[keras.Variable]:
        layers = [self.encoder, self.cell_a, self.parity_head, self.message]
        return [v for layer in layers for v in layer.trainable_variables]

    @property
    def b_variables(self) -> List[keras.Variable]:
        return self.cell_b.trainable_variables + self.counter.trainable_variables

    # ----------------------------------------------------------------- forward
    def _flatten(self, digits):
        shape = tf.shape(digits)
        steps = digits.shape[1]
        if steps != self.episode_length:
            raise ValueError(f"episodes must have k*k = {self.episode_length} static steps "
                             f"(tick_ratio {self.tick_ratio}), got {steps}")
        return tf.reshape(tf.cast(digits, tf.float32), [shape[0], steps, -1])

    def _zero_state(self, cell, batch):
        return [tf.zeros([batch, cell.units]), tf.zeros([batch, cell.units])]

    def a_step(self, image, state):
        """[Bt, F] image, A's state -> (parity logits [Bt, 2], message [Bt, M], new state)."""
        h, new_state = self.cell_a(self.encoder(image), state)
        return self.parity_head(h), self.message(h), new_state

    def b_tick(self, messages, state):
        """k messages [Bt, M] (oldest first), B's state -> (count logits [Bt, k*k+1], new state)."""
        h, new_state = self.cell_b(tf.concat(messages, axis=-1), state)
        return self.counter(h), new_state

    def sg_input(self, message, count):
        """M's input for one message: the message (constant) [+ one-hot count, cDNI]."""
        m = tf.cast(tf.stop_gradient(message), tf.float32)
        if self.sg_context == "count":
            m = tf.concat([m, tf.one_hot(count, self.num_counts)], axis=-1)
        return m

    def _unroll(self, x):
        """Synchronous forward pass over an episode (messages flow into B with gradient).

        x [Bt, k*k, F] -> (parity logits [Bt, k*k, 2], count logits [Bt, k, k*k+1]).
        """
        batch = tf.shape(x)[0]
        state_a = self._zero_state(self.cell_a, batch)
        state_b = self._zero_state(self.cell_b, batch)
        parity_logits, count_logits, messages = [], [], []
        for t in range(self.episode_length):
            logits, m, state_a = self.a_step(x[:, t], state_a)
            parity_logits.append(logits)
            messages.append(m)
            if (t + 1) % self.tick_ratio == 0:
                logits_b, state_b = self.b_tick(messages[t + 1 - self.tick_ratio:], state_b)
                count_logits.append(logits_b)
        return tf.stack(parity_logits, axis=1), tf.stack(count_logits, axis=1)

    def call(self, digits, training=False):
        return self._unroll(self._flatten(digits))

    # ----------------------------------------------------------------- training
    def train_step(self, data):
        digits, labels = data
        x = self._flatten(digits)
        parity = parity_targets(labels)
        counts = tick_counts(labels, self.tick_ratio)
        if self.method == "backprop":
            return self._backprop_step(x, parity, counts)
        return self._dni_step(x, parity, counts)

    def _backprop_step(self, x, parity, counts):
        variables = self.a_variables + self.b_variables
        with tf.GradientTape() as tape:
            parity_logits, count_logits = self._unroll(x)
            a_loss = _cross_entropy(parity, parity_logits)
            b_loss = _cross_entropy(counts, count_logits)
            total = a_loss + b_loss
        self.optimizer.apply(replica_mean(tape.gradient(total, variables)), variables)
        return self._record(parity, counts, a_loss, b_loss, parity_logits, count_logits)

    def _dni_step(self, x, parity, counts):
        k = self.tick_ratio
        batch = tf.shape(x)[0]
        a_vars, b_vars = self.a_variables, self.b_variables
        state_a = self._zero_state(self.cell_a, batch)
        state_b = self._zero_state(self.cell_b, batch)
        received, sg_inputs, predictions = [], [], []
        parity_logits, count_logits, a_losses, b_losses = [], [], [], []
        # Sum over B's ticks of dL_B_j / dm_t, one entry per message.
        true_grads = [None] * self.episode_length
        # B's ticks are recorded over the whole episode: its BPTT runs through them.
        with tf.GradientTape(persistent=True) as b_tape:
            for t in range(self.episode_length):
                with b_tape.stop_recording():
                    # A's step: its own loss plus M's prediction at its message.
                    with tf.GradientTape() as a_tape:
                        logits, m, new_state = self.a_step(x[:, t], state_a)
                        a_loss = _cross_entropy(parity[:, t], logits)
                        sg_in = self.sg_input(m, counts[:, t // k])
                        sg = self.synthetic_gradient(sg_in)
                        objective = a_loss + surrogate_objective(tf.cast(m, tf.float32), sg,
                                                                 batch)
                    a_grads = a_tape.gradient(objective, a_vars)
                    self.optimizer.apply(replica_mean(a_grads), a_vars)
                    # Carried, not differentiated: A's gradient stops at each step.
                    state_a = [tf.stop_gradient(s) for s in new_state]
                parity_logits.append(logits)
                a_losses.append(a_loss)
                sg_inputs.append(sg_in)
                predictions.append(sg)
                message = tf.stop_gradient(m)  # B's loss never reaches A directly
                b_tape.watch(message)
                received.append(message)
                if (t + 1) % k == 0:
                    logits_b, state_b = self.b_tick(received[t + 1 - k:], state_b)
                    b_loss = _cross_entropy(counts[:, t // k], logits_b)
                    with b_tape.stop_recording():
                        grads = b_tape.gradient(b_loss, b_vars + received)
                        self.b_optimizer.apply(replica_mean(grads[:len(b_vars)]), b_vars)
                        for i, g in enumerate(grads[len(b_vars):]):
                            true_grads[i] = g if true_grads[i] is None else true_grads[i] + g
                    count_logits.append(logits_b)
                    b_losses.append(b_loss)
        del b_tape
        # Per-example units: B's loss is a batch mean.
        target = tf.cast(tf.concat(true_grads, axis=0), tf.float32) * tf.cast(batch, tf.float32)
        sg_vars = self.synthetic_gradient.trainable_variables
        with tf.GradientTape() as sg_tape:
            sg_loss = regression_loss(self.synthetic_gradient(tf.concat(sg_inputs, axis=0)), target)
        self.sg_optimizer.apply(replica_mean(sg_tape.gradient(sg_loss, sg_vars)), sg_vars)
        # How well the synthetic gradients A used match the true ones (this replica's batch).
        used = tf.concat(predictions, axis=0)
        used_norm, target_norm = tf.norm(used), tf.norm(target)
        self._trackers["sg_cosine"].update_state(
            tf.reduce_sum(used * target) / (used_norm * target_norm + 1e-30))
        self._trackers["sg_norm_ratio"].update_state(used_norm / (target_norm + 1e-30))
        return self._record(parity, counts, tf.add_n(a_losses) / len(a_losses),
                            tf.add_n(b_losses) / len(b_losses), tf.stack(parity_logits, axis=1),
                            tf.stack(count_logits, axis=1), sg_loss)

    def test_step(self, data):
        digits, labels = data
        parity = parity_targets(labels)
        counts = tick_counts(labels, self.tick_ratio)
        parity_logits, count_logits = self(digits)
        logs = self._record(parity, counts, _cross_entropy(parity, parity_logits),
                            _cross_entropy(counts, count_logits), parity_logits, count_logits)
        return {k: v for k, v in logs.items() if not k.startswith("sg_")}

    def _record(self, parity, counts, a_loss, b_loss, parity_logits, count_logits, sg_loss=None):
        def accuracy(labels, logits):
            return tf.reduce_mean(tf.cast(tf.equal(
                tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))

        self._trackers["loss"].update_state(a_loss + b_loss)
        self._trackers["a_loss"].update_state(a_loss)
        self._trackers["b_loss"].update_state(b_loss)
        self._trackers["a_accuracy"].update_state(accuracy(parity, parity_logits))
        self._trackers["b_accuracy"].update_state(accuracy(counts, count_logits))
        self._trackers["b_final_accuracy"].update_state(
            accuracy(counts[:, -1], count_logits[:, -1]))
        if sg_loss is not None:
            self._trackers["sg_loss"].update_state(sg_loss)
        return {m.name: m.result() for m in self.metrics}
