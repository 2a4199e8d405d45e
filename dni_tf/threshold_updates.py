"""Threshold-triggered, unsynchronised weight updates.

Source: the blog post *Backprop without synchronization* (2016; README,
Sources [2]).

Every weight element keeps an accumulator of the gradient it receives. Only
where the accumulated value passes a threshold, `|acc| > T`, is the update
applied (through the base optimizer) and that accumulator reset; every other
element keeps accumulating. A unit whose incoming weights fired "notifies its
inputs": with `sparse_backward=True` only such units pass their error signal
to the layer below. With `max_delay > 0` every layer applies its fired updates
after its own random delay, so layers are never updated in lockstep.

    model = ThresholdUpdates(dni_tf.models.mlp(hidden=(256, 256)), threshold=1e-3)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(train_dataset, ...)     # logs update_fraction, notify_fraction, ...

What the caller must know:
* The wrapper trains `model.network`. With `sparse_backward=True` that is a
  clone of the given network whose Dense/Conv2D layers are replaced by
  `NotifyingDense`/`NotifyingConv2D` (weights copied); the model passed in is
  then left untouched.
* The fired value is handed to the base optimizer as the gradient and unfired
  elements get a zero gradient. With plain SGD (recommended) unfired weights
  do not move at all; a stateful base optimizer (momentum, Adam) still moves
  them through its slots. Momentum/Adam-like behaviour with strict firing comes
  from `accumulation="decay"` / `"normalized"` over SGD.
* All algorithm state (accumulators, second moments, delay ring buffers,
  notification masks, counters, RNG) is Keras variables, so `save_weights` /
  `load_weights` (and `dni_tf.harness.training`'s checkpoints) restore it exactly.

Accumulation strategies (g: the gradient of one element, after optional noise):
  sum         acc <- acc + g
  decay       acc <- decay * acc + g           (leaky, momentum-like)
  normalized  v <- b2 v + (1 - b2) g^2;  acc <- acc + g / (sqrt(v / (1 - b2^t)) + eps)
              (Adam-like; T is then in units of normalised gradient steps)
When an element fires it emits `acc` (or `clip(acc, -clip, clip)` with `clip`:
ordinary clipping, the clipped-off excess is discarded) and its accumulator is
reset to zero. (Keeping the excess instead would turn clipping into a rate
limit whose backlog grows without bound once the clip is below the typical
per-step accumulation, e.g. with "normalized".)

Sparse backward, the choice made: the notification mask of a layer is a
per-unit variable `notify_mask` (1 = passes error down) set at the end of step
t from the fire decisions of step t and used by the backward pass of step t+1.
Deciding within the same backward pass would need the fire decision of layer l
before the error of layer l is propagated, i.e. the accumulator update inside a
custom gradient; a one-step-late notification keeps the step a plain
tape + optimizer step and is itself an unsynchronised message. The masked
layer computes its linear map twice in the forward pass (once for the weight
gradient, once, masked per output unit, for the input gradient), so the
forward value is unchanged and only the error passed down is masked.

Metrics (in `fit()` logs, `history.csv`, TensorBoard):
  update_fraction  fraction of weight elements that fired in a step (mean over
                   the logging period)
  notify_fraction  fraction of units (output units of kernel layers) with at
                   least one fired incoming weight, i.e. units passing error
                   down (in sparse mode: in the next step)
  acc_norm         global L2 norm of the accumulators after the step
  weight_updates   cumulative number of element updates fired so far
  cancelled_fraction  1 - sum|emitted| / sum|accumulated increments| since the
                   start (cumulative L1 over all elements and steps; increments
                   are normalised for "normalized"): the share of
                   gradient mass that never reached the weights because
                   opposite-signed gradients cancelled in the accumulators (or
                   decayed, or were clipped, or are still accumulating). 0 at T=0.
  nonfinite_steps  number of steps so far in which a gradient or accumulator
                   element was NaN or inf. Such an element never fires again
                   (|NaN| > T is false), so any value above 0 means the run has
                   diverged; `dni_tf.harness.training` stops the run on it and keeps
                   the last good checkpoint.
"""

from __future__ import annotations

import math
from typing import List, Optional

import keras
import tensorflow as tf
from keras import ops

from dni_tf import random_streams
from dni_tf.core import BuildsBeforeTracing, track_loss

ACCUMULATIONS = ("sum", "decay", "normalized")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
_OWN_METRICS = ("update_fraction", "notify_fraction", "acc_norm", "weight_updates",
                "cancelled_fraction", "nonfinite_steps")


def _notifying_linear(fn, inputs, kernel, mask):
    """`fn(inputs, kernel)` whose input gradient only carries masked units' error.

    `mask` broadcasts against the output (1 = unit passes its error down). The
    forward value is exactly `fn(inputs, kernel)`; the kernel gradient is the
    usual one; the input gradient is that of `fn` with the upstream error
    multiplied by `mask`.
    """
    for_kernel = fn(ops.stop_gradient(inputs), kernel)
    for_inputs = ops.multiply(fn(inputs, ops.stop_gradient(kernel)), mask)
    # (a - stop(a)) is exactly 0 in the forward pass and carries a's gradient.
    return ops.add(for_kernel, ops.subtract(for_inputs, ops.stop_gradient(for_inputs)))


class _SavesNotifyMask:
    """Dense/Conv serialise a fixed variable list; add `notify_mask` to it."""

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built:
            store["notify_mask"] = self.notify_mask

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built and "notify_mask" in store.keys():
            self.notify_mask.assign(store["notify_mask"])


class NotifyingDense(_SavesNotifyMask, keras.layers.Dense):
    """`keras.layers.Dense` with a per-unit `notify_mask` gating the error passed down.

    `notify_mask` [units] is a non-trainable variable (initially ones) that
    `ThresholdUpdates` sets from the fired incoming weights of each unit.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.notify_mask = self.add_weight(
            shape=(self.units,), initializer="ones", trainable=False,
            name="notify_mask", aggregation="only_first_replica")

    def call(self, inputs, training=None):
        x = _notifying_linear(ops.matmul, inputs, self.kernel,
                              ops.cast(self.notify_mask, inputs.dtype))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


class NotifyingConv2D(_SavesNotifyMask, keras.layers.Conv2D):
    """`keras.layers.Conv2D` with a per-filter `notify_mask` gating the error passed down."""

    def build(self, input_shape):
        super().build(input_shape)
        self.notify_mask = self.add_weight(
            shape=(self.filters,), initializer="ones", trainable=False,
            name="notify_mask", aggregation="only_first_replica")

    def convolution_op(self, inputs, kernel):
        mask = ops.cast(self.notify_mask, inputs.dtype)
        if self.data_format == "channels_first":
            mask = ops.reshape(mask, (-1, 1, 1))
        parent = super().convolution_op
        return _notifying_linear(parent, inputs, kernel, mask)


_NOTIFYING = {keras.layers.Dense: NotifyingDense, keras.layers.Conv2D: NotifyingConv2D}


def with_sparse_backward(model: keras.Model) -> keras.Model:
    """A clone of a Sequential/Functional `model` with notifying Dense/Conv2D layers.

    Weights are copied when `model` is built. Other layers are cloned unchanged
    (they pass the error they receive on as usual).
    """
    def clone(layer):
        cls = _NOTIFYING.get(type(layer), type(layer))
        return cls.from_config(layer.get_config())

    cloned = keras.models.clone_model(model, clone_function=clone)
    if model.built:
        if not cloned.built:
            cloned.build(model.input_shape)
        for old, new in zip(_leaf_layers(model), _leaf_layers(cloned)):
            for source, target in zip(old.weights, new.weights):  # notify_mask comes last
                target.assign(source)
    return cloned


def _leaf_layers(model) -> List[keras.layers.Layer]:
    leaves = []
    for layer in model.layers:
        if getattr(layer, "layers", None):
            leaves.extend(_leaf_layers(layer))
        else:
            leaves.append(layer)
    return leaves


def validate(threshold: float = 0.0, accumulation: str = "sum", decay: float = 0.9,
             beta_2: float = 0.999, epsilon: float = 1e-8, clip: Optional[float] = None,
             noise_stddev: float = 0.0, max_delay: int = 0, statistics_every: int = 1) -> None:
    """Raises ValueError naming the bad argument and its allowed values."""
    if not threshold >= 0.0:
        raise ValueError(f"threshold={threshold!r}: must be >= 0")
    if accumulation not in ACCUMULATIONS:
        raise ValueError(f"accumulation={accumulation!r}: choose from {', '.join(ACCUMULATIONS)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r}: must be in [0, 1]")
    if not 0.0 <= beta_2 < 1.0:
        raise ValueError(f"beta_2={beta_2!r}: must be in [0, 1)")
    if not epsilon > 0.0:
        raise ValueError(f"epsilon={epsilon!r}: must be > 0")
    if clip is not None and not clip > 0.0:
        raise ValueError(f"clip={clip!r}: must be > 0 (or None for no clipping)")
    if not noise_stddev >= 0.0:
        raise ValueError(f"noise_stddev={noise_stddev!r}: must be >= 0")
    if int(max_delay) != max_delay or max_delay < 0:
        raise ValueError(f"max_delay={max_delay!r}: must be an integer >= 0")
    if int(statistics_every) != statistics_every or statistics_every < 1:
        raise ValueError(f"statistics_every={statistics_every!r}: must be an integer >= 1")


class ThresholdUpdates(BuildsBeforeTracing, keras.Model):
    """Trains `network` with the per-weight accumulate-and-fire rule.

    Args:
      network: any Keras model mapping inputs to predictions. Must be built
        (e.g. made with `keras.Input`) or buildable by calling it. For
        `sparse_backward` it must be Sequential or Functional.
      threshold: T >= 0; an element fires where |accumulator| > T. T = 0 with
        `accumulation="sum"` reproduces the base optimizer exactly.
      accumulation: "sum", "decay" or "normalized" (see the module docstring).
      decay: accumulator decay per step for "decay".
      beta_2, epsilon: second-moment decay and epsilon for "normalized".
      clip: optional bound on the magnitude an element emits when it fires
        (the excess is discarded).
      noise_stddev: std of Gaussian noise added to every gradient element
        before accumulation (seeded, deterministic).
      sparse_backward: only units with a fired incoming weight (previous step)
        pass their error to the layer below.
      max_delay: each layer applies what fired after d ~ U{0..max_delay} steps,
        drawn per layer and step; fired-but-pending updates wait in a ring
        buffer of `max_delay + 1` slots per variable.
      seed: seed of the noise and delay draws.
      statistics_every: compute `notify_fraction`, `acc_norm` and the L1 sums
        behind `cancelled_fraction` on every k-th step only (they are then
        means / sums over the sampled steps). They cost about a fifth of a
        plain step on CPU, as much as the rule itself. `update_fraction` and
        `weight_updates` stay exact, and sparse backward still notifies every step.

    Use `compile(optimizer=..., loss=..., metrics=...)` and `fit()` as usual.
    """

    def __init__(self, network: keras.Model, threshold: float = 0.0,
                 accumulation: str = "sum", decay: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, clip: Optional[float] = None,
                 noise_stddev: float = 0.0, sparse_backward: bool = False,
                 max_delay: int = 0, seed: int = 0, statistics_every: int = 1,
                 name: str = "threshold_updates", **kwargs):
        super().__init__(name=name, **kwargs)
        validate(threshold, accumulation, decay, beta_2, epsilon, clip, noise_stddev, max_delay,
                 statistics_every)
        self.statistics_every = int(statistics_every)
        self.threshold = float(threshold)
        self.accumulation = accumulation
        self.decay = float(decay)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.clip = None if clip is None else float(clip)
        self.noise_stddev = float(noise_stddev)
        self.sparse_backward = bool(sparse_backward)
        self.max_delay = int(max_delay)
        has_notifying = any(isinstance(l, (NotifyingDense, NotifyingConv2D))
                            for l in _leaf_layers(network)) if hasattr(network, "layers") else False
        if self.sparse_backward and not has_notifying:
            network = with_sparse_backward(network)
        self.network = network
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.update_fraction_tracker = keras.metrics.Mean(name="update_fraction")
        self.notify_fraction_tracker = keras.metrics.Mean(name="notify_fraction")
        self.acc_norm_tracker = keras.metrics.Mean(name="acc_norm")
        if network.built:
            self._create_state()
            self.built = True

    # ----------------------------------------------------------------- state
    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        if not getattr(self, "_state_created", False):
            self._create_state()
        self.built = True

    def _create_state(self):
        self._vars = list(self.network.trainable_variables)
        index = {id(v): i for i, v in enumerate(self._vars)}

        def state(shape, name, dtype="float32", init="zeros"):
            return self.add_weight(shape=shape, initializer=init, dtype=dtype,
                                   trainable=False, name=name,
                                   aggregation="only_first_replica")

        self.accumulators = [state(v.shape, f"accumulator_{i}") for i, v in enumerate(self._vars)]
        self.second_moments = ([state(v.shape, f"second_moment_{i}")
                                for i, v in enumerate(self._vars)]
                               if self.accumulation == "normalized" else [])
        self.delay_buffers = ([state((self.max_delay + 1, *v.shape), f"delay_buffer_{i}")
                               for i, v in enumerate(self._vars)]
                              if self.max_delay else [])
        self.step_counter = state((), "step_counter", dtype="int64")
        self.weight_update_count = state((), "weight_update_count", dtype="int64")
        self.nonfinite_step_count = state((), "nonfinite_step_count", dtype="int64")
        # Keras does not save a SeedGenerator's state with the weights: give the
        # generator a state variable of ours so a checkpoint restores the noise
        # and delay streams exactly.
        seed = self.seed
        self.rng_state = self.add_weight(
            shape=(2,), dtype=self.seed_generator.state.dtype, trainable=False,
            initializer=lambda shape, dtype=None: ops.convert_to_tensor([seed, 0], dtype=dtype),
            name="rng_state", aggregation="only_first_replica")
        self.seed_generator.state = self.rng_state
        self.received_l1 = state((), "received_l1", dtype="float64")
        self.emitted_l1 = state((), "emitted_l1", dtype="float64")

        # Groups (one per leaf layer) for the per-layer delays; kernel layers for
        # the notification masks: (kernel index, bias index or None, layer).
        self._group_of = [None] * len(self._vars)
        self._kernel_layers = []
        groups = 0
        for layer in _leaf_layers(self.network) if hasattr(self.network, "layers") else []:
            own = [index[id(v)] for v in layer.trainable_variables if id(v) in index]
            if not own:
                continue
            for i in own:
                self._group_of[i] = groups
            groups += 1
            kernel = getattr(layer, "kernel", None)
            if kernel is not None and id(kernel) in index and len(kernel.shape) >= 2:
                bias = getattr(layer, "bias", None)
                self._kernel_layers.append((
                    index[id(kernel)],
                    index[id(bias)] if bias is not None and id(bias) in index else None,
                    layer if hasattr(layer, "notify_mask") else None))
        for i, group in enumerate(self._group_of):
            if group is None:
                self._group_of[i] = groups
                groups += 1
        self._num_groups = groups
        self._num_elements = sum(math.prod(int(d) for d in v.shape) for v in self._vars)
        self._num_units = sum(self._vars[k].shape[-1] for k, _, _ in self._kernel_layers)
        self._state_created = True

    # ------------------------------------------------------------------ call
    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def test_step(self, data):
        logs = super().test_step(data)
        return {k: v for k, v in logs.items() if k not in _OWN_METRICS}

    # ------------------------------------------------------------------ step
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=True)
            track_loss(self, loss, x)
        # No optimizer.scale_loss: thresholds compare unscaled gradients, so a
        # LossScaleOptimizer (mixed_float16) is not supported; bfloat16 needs none.
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError("ThresholdUpdates does not support loss scaling "
                             "(mixed_float16); use mixed_bfloat16 or float32")
        grads = tape.gradient(loss, self._vars)
        grads = [ops.zeros_like(v) if g is None else ops.convert_to_tensor(g)
                 for g, v in zip(grads, self._vars)]
        if replicas > 1:
            # The fire decisions must be identical on every replica, so they are
            # taken on the summed gradient (the loss is already 1/replicas scaled).
            grads = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, grads)
        updates, _ = self.accumulate_and_fire(grads)
        updates = self._delay(updates)
        if replicas > 1:
            # The optimizer sums gradients over replicas again.
            updates = [u / replicas for u in updates]
        self.optimizer.apply(updates, self._vars)
        self._record()
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["weight_updates"] = ops.cast(self.weight_update_count, "float32")
        logs["nonfinite_steps"] = ops.cast(self.nonfinite_step_count, "float32")
        logs["cancelled_fraction"] = ops.cast(
            1.0 - self.emitted_l1 / ops.maximum(self.received_l1, 1e-30), "float32")
        return logs

    def accumulate_and_fire(self, grads):
        """Adds `grads` to the accumulators; returns (updates to apply, fired masks).

        Updates the accumulators (and second moments) in place. `updates[i]` is
        zero wherever `fired[i]` is False. The step's statistics (fired count,
        L1 of increments and emissions, accumulator norm) are left for `_record`
        to publish.

        On CPU every pass over all weights costs about as much as the rule
        itself, so the step makes as few as it can: the elementwise rule (one
        fused loop under XLA) and one reduction for the fired count, which also
        detects non-finite values. The sampled statistics, and the exact count
        of a step with non-finite values, recompute the rule from its inputs
        (gradients and the accumulators before the step) inside a branch taken
        only when needed; handing the rule's outputs to the branch instead
        would make XLA write them all out on every step.
        """
        step = self.step_counter + 1
        self.step_counter.assign(step)
        inputs = []
        for i, (g, acc) in enumerate(zip(grads, self.accumulators)):
            g = ops.cast(g, acc.dtype)
            if self.noise_stddev:
                g = g + self.noise_stddev * ops.cast(random_streams.normal(
                    g.shape, random_streams.next_seed(self.seed_generator)), acc.dtype)
            inputs.append((g, acc.value,
                           self.second_moments[i].value if self.second_moments else None))
        self._notified = None
        updates, fired_masks, counts = [], [], []
        rules = []
        for i, (g, acc_value, v_value) in enumerate(inputs):
            rule = self._rule(step, g, acc_value, v_value)
            increment, total, fired, remaining, update, v_new = rule
            rules.append(rule)
            self.accumulators[i].assign(remaining)
            if v_new is not None:
                self.second_moments[i].assign(v_new)
            updates.append(update)
            fired_masks.append(fired)
            counts.append(self._fired_sum(total, fired))
        count = ops.sum(ops.stack([c for c, _ in counts]))
        self._nonfinite = ops.any(ops.stack([bad for _, bad in counts]))
        self._fired_count = tf.cond(
            self._nonfinite,
            lambda: ops.sum(ops.stack([self._exact_fired(step, *x) for x in inputs])),
            lambda: count)
        # Sparse backward needs the notified units every step; the statistics reuse them.
        self._notified = self._notified_units(fired_masks) if self.sparse_backward else None
        self._step_statistics = self._sampled_statistics(step, inputs, rules)
        return updates, fired_masks

    def _rule(self, step, g, acc, v):
        """The elementwise rule: (increment, total, fired, remaining, update, new v or None)."""
        v_new = None
        if self.accumulation == "sum":
            increment, total = g, acc + g
        elif self.accumulation == "decay":
            increment, total = g, self.decay * acc + g
        else:
            v_new = self.beta_2 * v + (1.0 - self.beta_2) * ops.square(g)
            correction = 1.0 - ops.power(ops.cast(self.beta_2, acc.dtype),
                                         ops.cast(step, acc.dtype))
            increment = g / (ops.sqrt(v_new / correction) + self.epsilon)
            total = acc + increment
        fired = ops.greater(ops.abs(total), self.threshold)
        remaining = ops.where(fired, 0.0, total)
        if self.clip is None:
            update = total - remaining  # exactly `total` where fired, 0 elsewhere
        else:
            update = ops.where(fired, ops.clip(total, -self.clip, self.clip), 0.0)
        return increment, total, fired, remaining, update, v_new

    @staticmethod
    def _fired_sum(total, fired):
        """(fired count as int64, whether `total` has a non-finite element); one reduction.

        A float32 sum of 0/1 values is exact up to 2**24 elements; 0 * total
        turns the sum NaN when an element is NaN or inf (the count of such a
        step is then recomputed exactly, see `_exact_fired`).
        """
        if math.prod(int(d) for d in total.shape) <= 2**24:
            flags = ops.sum(ops.cast(fired, total.dtype) + 0.0 * total)
            finite = ops.isfinite(flags)
            return ops.cast(ops.where(finite, flags, 0.0), "int64"), ops.logical_not(finite)
        return (ops.sum(ops.cast(fired, "int64")),
                ops.logical_not(ops.all(ops.isfinite(total))))

    def _exact_fired(self, step, g, acc, v):
        fired = self._rule(step, g, acc, v)[2]
        return ops.sum(ops.cast(fired, "int64"))

    def _sampled_statistics(self, step, inputs, rules):
        """(weight, received L1, emitted L1, sum of squared accumulators, notified units).

        With `statistics_every == 1` from the step's own `rules`; else on every
        k-th step only (weight 1; else all 0), from the rule recomputed on
        `inputs` (see `accumulate_and_fire`), or from `rules` with sparse
        backward, whose fired masks are written out every step anyway.
        """
        def compute(rules):
            increments = [r[0] for r in rules]
            updates = [r[4] for r in rules]
            remainders = [r[3] for r in rules]
            fired = [r[2] for r in rules]
            received = ops.sum(ops.stack([ops.sum(ops.abs(i)) for i in increments]))
            emitted = ops.sum(ops.stack([ops.sum(ops.abs(u)) for u in updates]))
            squares = ops.sum(ops.stack([2.0 * tf.nn.l2_loss(r) for r in remainders]))
            units = self._notified if self._notified is not None else self._notified_units(fired)
            notified = (ops.sum(ops.stack([ops.sum(ops.cast(unit, "float32")) for unit in units]))
                        if self._kernel_layers else ops.zeros(()))
            return ops.ones(()), received, emitted, squares, notified

        if self.statistics_every == 1:
            return compute(rules)
        sampled = ops.equal(ops.mod(step, self.statistics_every), 0)
        if self.sparse_backward:
            return tf.cond(sampled, lambda: compute(rules), lambda: (ops.zeros(()),) * 5)
        return tf.cond(sampled,
                       lambda: compute([self._rule(step, *x) for x in inputs]),
                       lambda: (ops.zeros(()),) * 5)

    def _notified_units(self, fired):
        """Per kernel layer: [units] bools, True where an incoming weight (or bias) fired."""
        units = []
        for k, b, _ in self._kernel_layers:
            unit = ops.any(ops.reshape(fired[k], (-1, fired[k].shape[-1])), axis=0)
            if b is not None:
                unit = ops.logical_or(unit, fired[b])
            units.append(unit)
        return units

    def _delay(self, updates):
        """Per-layer random delays through ring buffers; identity when max_delay=0."""
        if not self.max_delay:
            return updates
        slots = self.max_delay + 1
        delays = random_streams.randint((self._num_groups,), slots,
                                        random_streams.next_seed(self.seed_generator))
        now = ops.cast(ops.mod(self.step_counter - 1, slots), "int32")
        out_mask = ops.one_hot(now, slots, dtype="float32")
        applied = []
        for i, (u, buf) in enumerate(zip(updates, self.delay_buffers)):
            expand = (slots,) + (1,) * len(u.shape)
            target = ops.mod(now + delays[self._group_of[i]], slots)
            in_mask = ops.reshape(ops.one_hot(target, slots, dtype=buf.dtype), expand)
            pending = buf + in_mask * ops.expand_dims(u, 0)
            applied.append(ops.take(pending, now, axis=0))
            buf.assign(pending * ops.reshape(1.0 - out_mask, expand))
        return applied

    def _record(self):
        weight, received, emitted, acc_squares, notified = self._step_statistics
        self.weight_update_count.assign_add(self._fired_count)
        self.nonfinite_step_count.assign_add(ops.cast(self._nonfinite, "int64"))
        self.update_fraction_tracker.update_state(
            ops.cast(self._fired_count, "float32") / float(max(self._num_elements, 1)))
        self.received_l1.assign_add(ops.cast(received, "float64"))
        self.emitted_l1.assign_add(ops.cast(emitted, "float64"))
        self.acc_norm_tracker.update_state(ops.sqrt(acc_squares), sample_weight=weight)
        if self._kernel_layers:
            self.notify_fraction_tracker.update_state(notified / float(self._num_units),
                                                      sample_weight=weight)
        if self.sparse_backward:
            for (_, _, layer), unit in zip(self._kernel_layers, self._notified):
                if layer is not None:
                    layer.notify_mask.assign(ops.cast(unit, layer.notify_mask.dtype))

    # ----------------------------------------------------------- inspection
    @property
    def num_weights(self) -> int:
        """Number of scalar weights the rule acts on (every trainable element)."""
        return self._num_elements

    def pending_updates(self):
        """Fired updates still waiting in the delay buffers, one tensor per variable."""
        return [ops.sum(b, axis=0) for b in self.delay_buffers]
