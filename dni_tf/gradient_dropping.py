"""Gradient dropping: train on whatever part of each backward pass survives.

Source: the write-up *Effective learning while misplacing gradient updates*
(README, Sources [1]): MNIST, the TensorFlow tutorial CNN, batch 50, 20,000 steps.

Each step the full gradient is computed, then parts of it are lost at random and
only the surviving part is applied. What counts as a "part" is the granularity:

* `variable` (the write-up's method): each trainable variable (a kernel, a bias) is
  kept with probability `keep_prob`, independently.
* `layer`: all variables of one layer are kept or lost together.
* `element`: each scalar of each gradient is kept independently.
* `worker`: the variables are spread over `num_workers` simulated machines
  (greedily balancing parameter counts); each machine's whole share is lost with
  probability `1 - keep_prob` (the write-up's motivation: unreliable machines).
* `replica`: the real thing under a `tf.distribute` strategy: each replica's
  whole gradient contribution is lost with probability `1 - keep_prob` per step
  and the update is the mean over the surviving replicas (nothing is applied
  when none survives). Every replica draws the same survivor set from the
  shared generator, so they stay in sync. With one replica this drops the
  whole gradient at once.

What happens to a lost gradient is `dropped_state`:

* `"zero_gradient"` (default): the optimizer receives a zero gradient, which is
  what the write-up's method does ("apply the gradients, some of which are zero"):
  Adam's moments decay and the variable keeps moving along its momentum for
  that step. It costs nothing over a plain step.
* `"freeze"`: the optimizer never sees it. The variable *and its optimizer
  slots* (e.g. Adam's moments) stay exactly as they were, as if that machine's
  update never arrived; Adam's step counter is global and advances.

Cost: the mask-and-apply part of the step (drawing, selecting, the optimizer's
update and the freeze write-back) is compiled with XLA as one fused pass over
the parameters, also when the step itself is not (`fuse_update`, see
docs/performance.md). Every granularity and dropped state then costs at most
a plain Keras step on the tutorial CNN (measured by `python -m benchmarks.all`).

Kept gradients can be rescaled by `1 / keep_prob` (`rescale=True`, off by default
as in the write-up) so the expected update equals the full one.

With `keep_prob=1` training is exactly plain backprop; with `keep_prob=0` no
variable changes (with Adam from a fresh start, in both modes). Masks are
drawn through `dni_tf.random_streams` from a `keras.random.SeedGenerator`, so
runs are reproducible, identical with and without XLA, and the generator state
is checkpointed with the model (`element` masks hash each element's index
under keys drawn from that stream, see `_element_kept`). Lost gradients are selected away, not
multiplied by zero, so a lost NaN or inf never reaches the weights.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from dni_tf import random_streams
from dni_tf.core import BuildsBeforeTracing, track_loss

GRANULARITIES = ("variable", "layer", "element", "worker", "replica")
DROPPED_STATES = ("freeze", "zero_gradient")


def layer_groups(variables: Sequence[keras.Variable]) -> List[int]:
    """Group index per variable: variables sharing a layer path share a group."""
    index: Dict[str, int] = {}
    return [index.setdefault(v.path.rsplit("/", 1)[0], len(index)) for v in variables]


def worker_groups(variables: Sequence[keras.Variable], num_workers: int) -> List[int]:
    """Assigns each variable to one of `num_workers` machines.

    Largest variables first, each to the machine holding the fewest parameters so
    far (ties to the lowest index), so shares are balanced and deterministic.
    """
    sizes = [_numel(v.shape) for v in variables]
    load = [0] * num_workers
    groups = [0] * len(variables)
    for i in sorted(range(len(variables)), key=lambda i: (-sizes[i], i)):
        worker = min(range(num_workers), key=lambda w: (load[w], w))
        groups[i] = worker
        load[worker] += sizes[i]
    return groups


def _assign_op(variable, value):
    variable.assign(value)
    return tf.no_op()


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 (wrapping multiplies): a bijection."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(shift, tf.uint32)))
        h = h * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(16, tf.uint32)))


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


class GradientDropping(BuildsBeforeTracing, keras.Model):
    """Wraps any Keras model so that its training applies a random part of each gradient.

    Usage:
        model = GradientDropping(dni_tf.models.tutorial_cnn(), keep_prob=0.5, seed=0)
        model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(dataset, ...)

    Args:
      network: the model to train; its inputs/outputs are this model's.
      keep_prob: probability in [0, 1] that a part of the gradient is applied.
      granularity: one of `GRANULARITIES` (see the module docstring).
      num_workers: machines for `granularity="worker"` (>= 1).
      rescale: multiply kept gradients by 1 / keep_prob.
      dropped_state: one of `DROPPED_STATES` (see the module docstring).
      seed: seed of the mask generator.
      fuse_update: compile the mask-and-apply part of the step with XLA when
        the step itself is not (None: wherever it can, i.e. one replica, the
        default strategy, keep_prob < 1; False: never). It makes no difference
        to which parts are kept; the optimizer's float arithmetic may differ
        from graph mode in the last bit, as with `jit_compile=True`.

    Metrics, besides the compiled loss and metrics:
      `kept_fraction`: mean fraction of the parts (variables, layers, elements or
        workers) whose gradient was applied.
      `kept_parameter_fraction`: mean fraction of scalar parameters updated.
    """

    def __init__(self, network: keras.Model, keep_prob: float = 1.0,
                 granularity: str = "variable", num_workers: int = 4,
                 rescale: bool = False, dropped_state: str = "zero_gradient",
                 seed: Optional[int] = None, fuse_update: Optional[bool] = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if dropped_state not in DROPPED_STATES:
            raise ValueError(f"dropped_state must be one of {DROPPED_STATES}, got {dropped_state!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if rescale and keep_prob == 0.0:
            raise ValueError("rescale=True needs keep_prob > 0")
        if rescale and granularity == "replica":
            raise ValueError("rescale=True does not apply to granularity='replica': "
                             "surviving replicas are already averaged")
        self.network = network
        self.keep_prob = float(keep_prob)
        self.granularity = granularity
        self.num_workers = int(num_workers)
        self.rescale = bool(rescale)
        self.dropped_state = dropped_state
        self.seed = seed
        self.fuse_update = fuse_update
        self.mask_generator = keras.random.SeedGenerator(seed)
        self.kept_fraction_tracker = keras.metrics.Mean(name="kept_fraction")
        self.kept_parameter_tracker = keras.metrics.Mean(name="kept_parameter_fraction")
        self._groups: Optional[List[int]] = None

    def call(self, inputs, training=None):
        return self.network(inputs, training=training)

    def build(self, input_shape):
        if not self.network.built:
            self.network.build(input_shape)
        self.built = True

    @property
    def metrics(self):
        return [*super().metrics, self.kept_fraction_tracker, self.kept_parameter_tracker]

    def get_config(self):
        return {"keep_prob": self.keep_prob, "granularity": self.granularity,
                "num_workers": self.num_workers, "rescale": self.rescale,
                "dropped_state": self.dropped_state, "seed": self.seed,
                "fuse_update": self.fuse_update}

    # -- masks -------------------------------------------------------------

    def _group_index(self, variables) -> List[int]:
        if self._groups is None or len(self._groups) != len(variables):
            if self.granularity == "variable":
                self._groups = list(range(len(variables)))
            elif self.granularity == "layer":
                self._groups = layer_groups(variables)
            else:
                self._groups = worker_groups(variables, self.num_workers)
        return self._groups

    def _uniform(self, shape):
        return random_streams.uniform(shape, random_streams.next_seed(self.mask_generator))

    def _kept(self, shape):
        """Boolean draws, True with probability keep_prob.

        Exactly `random_streams.uniform(shape, seed) < keep_prob` (float32), but
        compared on the raw words: one pass instead of four, which matters for
        `element` (one word per parameter per step).
        """
        seed = random_streams.next_seed(self.mask_generator)  # advances the stream always
        if self.keep_prob >= 1.0:  # every uniform is < 1
            return ops.ones(shape, dtype="bool")
        bits = random_streams.words(shape, seed)
        return tf.less(bits, tf.constant(self._bound(), tf.uint32))

    def draw_masks(self, variables) -> List[tf.Tensor]:
        """One boolean mask per variable: scalar, or the variable's shape for `element`.

        Also records the kept fractions in the metric trackers.
        """
        masks, fraction, parameter_fraction = self._masks_and_fractions(variables)
        self.kept_fraction_tracker.update_state(fraction)
        self.kept_parameter_tracker.update_state(parameter_fraction)
        return masks

    def _element_kept(self, shape):
        """Boolean [shape], True with probability keep_prob, independently per element.

        One Philox draw per variable and step gives two 32-bit keys; each
        element's word is a counter-based hash of its flat index under those
        keys (two rounds of MurmurHash3's 32-bit finalizer, a bijection of the
        index for fixed keys, with the second key mixed in between so two
        steps' masks are not shifted copies of one sequence). Philox itself
        costs about 6 ns per element on a CPU, a third of the tutorial CNN's
        whole step at 3.3M parameters; the hash fuses into the update under
        XLA at a fraction of that. Integer ops only: identical with and
        without XLA. Resolution as `_kept`: the top 24 bits are compared.
        """
        seed = random_streams.next_seed(self.mask_generator)
        if self.keep_prob >= 1.0:
            return ops.ones(shape, dtype="bool")
        keys = random_streams.words([2], seed)
        index = tf.bitcast(tf.range(_numel(shape), dtype=tf.int32), tf.uint32)
        word = _fmix32(index * tf.constant(0x9E3779B9, tf.uint32) + keys[0])
        word = _fmix32(tf.bitwise.bitwise_xor(word, keys[1]))
        return tf.reshape(tf.less(word, tf.constant(self._bound(), tf.uint32)), shape)

    def _bound(self) -> int:
        # uniform = top24 / 2**24 < p32  <=>  top24 < ceil(p32 * 2**24)
        #                                 <=>  word < ceil(p32 * 2**24) * 2**8.
        return math.ceil(float(np.float32(self.keep_prob)) * 2**24) << 8

    def _masks_and_fractions(self, variables):
        """(masks, kept fraction of the parts, kept fraction of the parameters)."""
        if self.granularity == "element":
            masks = [self._element_kept(v.shape) for v in variables]
            # int32 sums are exact up to 2**31 elements per variable.
            kept = [ops.cast(ops.sum(ops.cast(m, "int32")), "int64") for m in masks]
            total = float(sum(_numel(v.shape) for v in variables))
            fraction = ops.cast(ops.sum(ops.stack(kept)), "float32") / total
            return masks, fraction, fraction
        groups = self._group_index(variables)
        num_groups = max(groups) + 1
        group_kept = self._kept((num_groups,))
        masks = [group_kept[g] for g in groups]
        sizes = ops.convert_to_tensor([float(_numel(v.shape)) for v in variables])
        kept_float = ops.cast(ops.stack(masks), "float32")
        if self.granularity == "worker":
            # Workers own no variable when num_workers > #variables; count real ones.
            owned = sorted(set(groups))
            fraction = ops.mean(ops.cast(ops.take(group_kept, owned), "float32"))
        else:
            fraction = ops.mean(ops.cast(group_kept, "float32"))
        return masks, fraction, ops.sum(kept_float * sizes) / ops.sum(sizes)

    def average_surviving_replicas(self, grads):
        """This replica's gradients weighted so the optimizer applies the survivors' mean.

        Returns (weighted gradients, per-variable masks: "anything applied").
        Keras scales each replica's loss by 1 / replicas and the optimizer sums
        the replicas' gradients, so weighting survivors by replicas / survivors
        (and the lost ones by 0) makes the applied gradient the survivors' mean.
        """
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        survived = self._uniform((replicas,)) < self.keep_prob
        survivors = ops.sum(ops.cast(survived, "float32"))
        mine = ops.take(survived, context.replica_id_in_sync_group)
        weight = ops.where(mine, replicas / ops.maximum(survivors, 1.0), 0.0)
        anything_applied = survivors > 0
        self.kept_fraction_tracker.update_state(survivors / replicas)
        self.kept_parameter_tracker.update_state(ops.cast(anything_applied, "float32"))
        # A select, so that a lost replica's NaN or inf gradient vanishes.
        return ([ops.where(mine, g * ops.cast(weight, g.dtype), ops.zeros_like(g)) for g in grads],
                [anything_applied] * len(grads))

    def apply_masks(self, grads, masks):
        """Zeroes the lost parts of `grads` (and rescales the kept ones with `rescale`).

        A select, not a multiplication by the mask: a lost NaN or inf gradient
        must vanish (NaN * 0 is NaN), as it would if its machine never answered.
        """
        return [ops.where(m, g * (1.0 / self.keep_prob) if self.rescale else g,
                          ops.zeros_like(g))
                for g, m in zip(grads, masks)]

    # -- optimizer state -----------------------------------------------------

    def _optimizer_slots(self, variables) -> List[List[keras.Variable]]:
        """Optimizer variables belonging to each trainable variable.

        Keras names a slot `<variable path with / as _>_<slot name>`; a slot is
        matched to the variable with the longest such prefix and the same shape.
        Runs at trace time only.
        """
        prefixes = [v.path.replace("/", "_") + "_" for v in variables]
        slots: List[List[keras.Variable]] = [[] for _ in variables]
        for slot in self.optimizer.variables:
            matches = [i for i, p in enumerate(prefixes)
                       if slot.name.startswith(p) and tuple(slot.shape) == tuple(variables[i].shape)]
            if not matches and len(slot.shape) == 0:
                continue  # global state: step counter, learning rate
            if not matches:
                raise ValueError(
                    f"dropped_state='freeze' cannot tell which variable optimizer slot "
                    f"{slot.path!r} belongs to; use dropped_state='zero_gradient'")
            slots[max(matches, key=lambda i: len(prefixes[i]))].append(slot)
        return slots

    # -- training ------------------------------------------------------------

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                     training=True)
            track_loss(self, loss, x)
            # Keras' LossScaleOptimizer needs the scaled loss; a no-op otherwise.
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, variables)
        if self.granularity == "replica":
            grads, masks = self.average_surviving_replicas(grads)
            if self.dropped_state == "freeze":
                self._apply_frozen(grads, variables, masks)
            else:
                self.optimizer.apply(grads, variables)
        else:
            fractions = self._update_function()(grads)
            self.kept_fraction_tracker.update_state(fractions[0])
            self.kept_parameter_tracker.update_state(fractions[1])
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _fused(self) -> bool:
        """Whether the mask-and-apply part runs as its own XLA cluster.

        Outside XLA every elementwise op of the update (drawing, selecting,
        each of Adam's own steps, the freeze write-back) is a separate pass over
        all parameters; XLA fuses them into one, which is what brings the
        per-step cost to that of a plain step. Only with one replica and the
        default strategy (an optimizer's cross-replica merge cannot run inside
        a nested XLA function) and when the whole step is not compiled already.
        """
        if self.fuse_update is False or self.jit_compile:
            return False
        strategy = tf.distribute.get_strategy()
        return (strategy.num_replicas_in_sync == 1 and not tf.distribute.has_strategy()
                and self.keep_prob < 1.0)

    def _update_function(self):
        """grads -> (kept fraction, kept parameter fraction); applies the kept parts."""
        fused = self._fused()
        if getattr(self, "_update_fn_key", None) != (fused, self.keep_prob):
            variables = self.trainable_variables
            if not self.optimizer.built:
                self.optimizer.build(variables)

            def apply(grads, masks):
                grads = self.apply_masks(grads, masks)
                if self.dropped_state == "freeze":
                    self._apply_frozen(grads, variables, masks, select=fused or self.jit_compile)
                else:
                    self.optimizer.apply(grads, variables)

            def draw_and_apply(grads):
                masks, fraction, parameter_fraction = self._masks_and_fractions(variables)
                apply(grads, masks)
                return fraction, parameter_fraction

            if fused and self.granularity == "element":
                # Element masks are drawn in their own XLA cluster and handed over
                # as bytes: inside one cluster XLA recomputes the hash in every
                # fusion that reads a mask (the count, the gradient select and, for
                # freeze, the variable and each slot), which cost freeze ~1.12x.
                def draw():
                    masks, fraction, parameter_fraction = self._masks_and_fractions(variables)
                    return [ops.cast(m, "uint8") for m in masks], fraction, parameter_fraction

                draw_fn = tf.function(draw, jit_compile=True)
                apply_fn = tf.function(
                    lambda grads, masks: apply(grads, [ops.cast(m, "bool") for m in masks]),
                    jit_compile=True)

                def two_clusters(grads):
                    masks, fraction, parameter_fraction = draw_fn()
                    apply_fn(grads, masks)
                    return fraction, parameter_fraction

                self._update_fn = two_clusters
            elif fused:
                self._update_fn = tf.function(draw_and_apply, jit_compile=True)
            else:
                self._update_fn = draw_and_apply
            self._update_fn_key = (fused, self.keep_prob)
        return self._update_fn

    def test_step(self, data):
        # The kept fractions describe training steps only.
        logs = super().test_step(data)
        return {k: v for k, v in logs.items()
                if k not in (self.kept_fraction_tracker.name, self.kept_parameter_tracker.name)}

    def _apply_frozen(self, grads, variables, masks, select=False):
        """Applies `grads`, then puts dropped variables and their slots back.

        `select`: write every variable back through a select (what XLA fuses
        into the optimizer's own pass); else scalar masks write back only
        dropped variables, under a `tf.cond` (cheaper in graph mode).
        """
        if not self.optimizer.built:
            self.optimizer.build(variables)
        slots = self._optimizer_slots(variables)
        before = [[ops.copy(s) for s in [v, *slot]] for v, slot in zip(variables, slots)]
        self.optimizer.apply(grads, variables)
        for v, slot, old, keep in zip(variables, slots, before, masks):
            for target, old_value in zip([v, *slot], old):
                if select or self.granularity == "element":
                    target.assign(ops.where(keep, target.value, old_value))
                else:  # scalar mask: write back only when dropped
                    tf.cond(keep, tf.no_op, lambda t=target, o=old_value: _assign_op(t, o))
