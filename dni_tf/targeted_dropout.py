"""Targeted dropout (Gomez et al. 2019) for dense layers, and the targeted-dropout study's MLP.

Targeted dropout drops, during training only, elements that a later magnitude
pruning would remove anyway, so the network learns not to rely on them. As in
the paper and its official code (for-ai/TD):

* weight variant: in each output column of the kernel, the `floor(gamma * n_in)`
  weights with the smallest |w| are the target set; each targeted weight is
  zeroed with probability `alpha` for the step.
* unit variant: the `floor(gamma * units)` units (kernel columns) with the
  smallest L2 norm are the target set; each targeted unit is dropped with
  probability `alpha`: its kernel column is zeroed. Its bias is left alone, as in
  the official code (`drop_bias=True` also zeroes the bias of a dropped unit, so
  a dropped ReLU unit outputs exactly 0 instead of relu(b)).

Dropped elements are not rescaled (unlike standard dropout). One mask is drawn
per step and shared by the whole batch.

Evaluation (`training=False`), `evaluation=`:
* "dense" (default): the plain dense layer, every weight used. This is what a
  pruning sweep at 0% measures and what the plain networks are evaluated with.
* "remove_targets": the whole current target set is removed (weights of the
  target set zeroed; targeted units' kernel columns zeroed), as the official
  code's `targeted_weight` does when it is called with `is_training=False`.

Ramp (`ramp_steps > 0`), the schedule of the paper's ramped targeted dropout,
driven by the layer's own `step` variable (training calls so far), with
T = ramp_steps:
* gamma(s) = 0.95 * gamma * s / (T/2) for s <= T/2, then linearly from
  0.95 * gamma to gamma at s = T, and gamma afterwards;
* alpha stays at `alpha` (`ramp="paper"`), or, with `ramp="official"`, also
  grows linearly from 0 to `alpha` over the T steps, as in the official code's
  `targeted_*_piecewise` functions.

Masks are stateless Philox draws seeded by (seed, step), the same with and
without XLA; `step` (and the cached thresholds) are layer weights, so a resumed
run continues the same masks and the same point of the ramp.

Cost. Ranking |w| per column costs more than the layer's matmul: a sort of a
1000x1000 kernel took ~100 ms on two CPU cores; the exact radix select used
here (`kth_smallest_magnitude`, 31 counting passes) ~58 ms, ~29 ms under XLA.
`rank_every=N`
re-ranks every N training steps and keeps the per-column thresholds in a
variable in between (the target set then lags the weights by < N steps).
`rank_every=1` (default) is exact. The unit variant ranks only `units` norms and
is always exact. The Bernoulli draws use 16-bit random integers (alpha is
applied with a resolution of 1/65536).

The study (training every regime, the pruning sweep, tables and figures) is
`dni_tf.studies.targeted_dropout`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from dni_tf import models, random_streams

VARIANTS = ("weight", "unit")
RAMPS = ("paper", "official")
EVALUATIONS = ("dense", "remove_targets")
REGIMES = ("none", "dropout", "targeted_weight", "targeted_unit", "targeted_weight_ramp",
           "targeted_unit_ramp")
_PROB_SCALE = 65536  # resolution of the 16-bit Bernoulli draws
RAMP_MIDPOINT_FRACTION = 0.95  # gamma reaches 0.95 * gamma half-way through the ramp


def bernoulli_mask(shape: Sequence[int], probability, seed: tf.Tensor) -> tf.Tensor:
    """Boolean tensor of `shape` whose entries are True with `probability`.

    `seed` is a stateless seed (int32 [2]). Draws 16-bit integers (two per 32-bit
    Philox word, identical with and without XLA), so `probability` is rounded to
    a multiple of 1/65536; probability 0 gives all False, 1 all True.
    """
    shape = [int(d) for d in shape]
    last = shape[-1]
    words = random_streams.words(shape[:-1] + [(last + 1) // 2], seed)
    halves = tf.reshape(tf.bitcast(words, tf.uint16), shape[:-1] + [2 * ((last + 1) // 2)])
    if last % 2:
        halves = halves[..., :last]
    cutoff = tf.cast(tf.round(tf.cast(probability, tf.float32) * _PROB_SCALE), tf.int32)
    return tf.cast(halves, tf.int32) < cutoff


def ramp_rates(step, alpha: float, gamma: float, ramp_steps: int,
               ramp: str = "paper") -> Tuple[tf.Tensor, tf.Tensor]:
    """(alpha, gamma) in effect at training step `step` (float32 scalars).

    No ramp when ramp_steps is 0. Otherwise, with T = ramp_steps: gamma grows
    linearly from 0 to 0.95 * gamma over the first T/2 steps, then to gamma at
    step T; alpha is constant ("paper") or grows linearly from 0 to alpha over
    the T steps ("official").
    """
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    alpha_t = tf.constant(alpha, tf.float32)
    gamma_t = tf.constant(gamma, tf.float32)
    if ramp_steps <= 0:
        return alpha_t, gamma_t
    s = tf.cast(step, tf.float32)
    half = ramp_steps / 2.0
    first = tf.minimum(s / half, 1.0)
    second = tf.clip_by_value((s - half) / half, 0.0, 1.0)
    fraction = RAMP_MIDPOINT_FRACTION * first + (1.0 - RAMP_MIDPOINT_FRACTION) * second
    done = s >= float(ramp_steps)
    gamma_t = tf.where(done, gamma_t, gamma_t * fraction)
    if ramp == "official":
        alpha_t = tf.where(done, alpha_t, alpha_t * tf.minimum(s / float(ramp_steps), 1.0))
    return alpha_t, gamma_t


def target_count(fraction, n: int) -> tf.Tensor:
    """floor(fraction * n) as int32 (a 1e-6 tolerance: 0.29 * 100 counts 29)."""
    return tf.cast(tf.floor(tf.cast(fraction, tf.float32) * n + 1e-6), tf.int32)


def _kth_smallest_threshold(values: tf.Tensor, k: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """Per-slice threshold t such that `values < t` marks the k smallest along axis.

    Returns the (k+1)-th smallest value (or +inf when k equals the axis length),
    so `values < t` selects exactly k elements unless there are ties at t (then
    fewer). `values` is [n, m] with axis=0 -> [m], or [n] -> scalar.
    """
    ordered = tf.sort(values, axis=axis)
    inf_shape = tf.concat([[1], tf.shape(values)[1:]], 0) if axis == 0 else None
    padded = tf.concat([ordered, tf.fill(inf_shape, tf.constant(float("inf"), values.dtype))], axis)
    return tf.gather(padded, k, axis=axis)


def kth_smallest_magnitude(magnitudes: tf.Tensor, k) -> tf.Tensor:
    """Per-column (k+1)-th smallest of non-negative float32 `magnitudes` [n, m] -> [m].

    +inf when k >= n, so `magnitudes < result` marks the k smallest of each
    column (fewer with ties), exactly as `_kth_smallest_threshold` does. A
    bitwise binary search (radix select): non-negative float32 values order like
    their int32 bit patterns, so 31 counting passes find each column's
    (k+1)-th smallest pattern. Bit-identical to sorting; on two CPU cores it
    took 58 ms for a 1000x1000 kernel against 102 ms for `tf.sort` (29 ms
    against 250 ms under XLA).
    """
    n = magnitudes.shape[0]
    bits = tf.bitcast(magnitudes, tf.int32)
    found = tf.zeros(tf.shape(magnitudes)[1:], tf.int32)
    for bit in range(30, -1, -1):
        trial = found | (1 << bit)
        below = tf.reduce_sum(tf.cast(bits < trial[None, :], tf.int32), axis=0)
        found = tf.where(below <= k, trial, found)
    return tf.where(k >= n, tf.constant(float("inf"), tf.float32), tf.bitcast(found, tf.float32))


class TargetedDense(keras.layers.Layer):
    """A dense layer `activation(x @ kernel + bias)` with targeted dropout.

    Input [..., n_in]; output [..., units]. Weights: `kernel` [n_in, units],
    optional `bias` [units], and non-trainable state: `step` (training calls so
    far, drives the ramp, re-ranking and the mask seed) and `threshold` [units]
    (weight variant: the cached per-column magnitude threshold). Both are saved
    by `save_weights`, so a resumed run continues the same masks.

    Args:
      units: output width.
      variant: "weight" or "unit" (see the module docstring).
      alpha: drop probability inside the target set, in [0, 1].
      gamma: targeted fraction, in [0, 1]: the bottom `floor(gamma * n_in)` weights
        of each column, or the bottom `floor(gamma * units)` units by L2 norm.
      ramp_steps: if > 0, the paper's ramp over this many training steps (see
        `ramp_rates`).
      ramp: "paper" (ramp gamma only) or "official" (also ramp alpha).
      rank_every: re-rank the weights every this many training steps (weight
        variant only; 1 = every step, exact).
      drop_bias: unit variant: also zero the bias of a dropped unit (default
        False: the official code drops kernel columns only).
      evaluation: "dense" (plain dense layer at evaluation) or "remove_targets"
        (the whole target set removed at evaluation, as the official code).
      seed: int seed of the dropout masks (step s uses the stateless seed
        (seed, s)); None picks one at random (kept in the config).
    """

    def __init__(self, units: int, activation=None, use_bias: bool = True,
                 variant: str = "weight", alpha: float = 0.5, gamma: float = 0.5,
                 ramp_steps: int = 0, ramp: str = "paper", rank_every: int = 1,
                 drop_bias: bool = False, evaluation: str = "dense", seed: Optional[int] = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
        if evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
        for name, value in (("alpha", alpha), ("gamma", gamma)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if ramp_steps < 0 or rank_every < 1:
            raise ValueError("ramp_steps must be >= 0 and rank_every >= 1")
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.variant = variant
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.ramp_steps = int(ramp_steps)
        self.ramp = ramp
        self.rank_every = int(rank_every)
        self.drop_bias = bool(drop_bias)
        self.evaluation = evaluation
        # Masks come from stateless draws seeded by (seed, step). A
        # keras.random.SeedGenerator would be the usual choice, but its state is
        # not written by `save_weights` (Keras 3.15), so a resumed run would
        # replay the first masks; `step` is a saved weight, so this resumes exactly.
        self.seed = int(seed) if seed is not None else int(np.random.randint(0, 2**31 - 1))
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        n_in = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(n_in, self.units),
                                      initializer=self.kernel_initializer)
        self.bias = (self.add_weight(name="bias", shape=(self.units,),
                                     initializer=self.bias_initializer)
                     if self.use_bias else None)
        # "only_first_replica": the counters are identical on every replica, and
        # MirroredStrategy needs an aggregation to let replicas assign them.
        self.step = self.add_weight(name="step", shape=(), dtype="int64", initializer="zeros",
                                    trainable=False, aggregation="only_first_replica")
        self.threshold = self.add_weight(name="threshold", shape=(self.units,), initializer="zeros",
                                         trainable=False, aggregation="only_first_replica")

    def rates(self) -> Tuple[tf.Tensor, tf.Tensor]:
        """(alpha, gamma) in effect for the current `step` (float32 scalars)."""
        return ramp_rates(tf.convert_to_tensor(self.step), self.alpha, self.gamma,
                          self.ramp_steps, self.ramp)

    def _seed(self) -> tf.Tensor:
        """Stateless seed int32 [2] for this step's mask: (seed, step)."""
        step = tf.cast(tf.math.floormod(tf.convert_to_tensor(self.step), 2**31 - 1), tf.int32)
        return tf.stack([tf.constant(self.seed % (2**31 - 1), tf.int32), step])

    def _kernel_value(self) -> tf.Tensor:
        return tf.stop_gradient(tf.convert_to_tensor(self.kernel))

    def unit_targets(self) -> tf.Tensor:
        """Boolean [units]: the bottom floor(gamma * units) units by column L2 norm, now."""
        _, gamma = self.rates()
        norms = tf.norm(self._kernel_value(), axis=0)
        return norms < _kth_smallest_threshold(norms, target_count(gamma, self.units))

    def ranked_threshold(self) -> tf.Tensor:
        """Per-column |w| threshold [units] for the current gamma (exact ranking)."""
        _, gamma = self.rates()
        n_in = self.kernel.shape[0]
        magnitudes = tf.abs(self._kernel_value())
        if magnitudes.dtype != tf.float32:
            return _kth_smallest_threshold(magnitudes, target_count(gamma, n_in))
        return kth_smallest_magnitude(magnitudes, target_count(gamma, n_in))

    def target_mask(self) -> tf.Tensor:
        """Boolean target set for the current step, without dropping anything.

        Weight variant: [n_in, units], using the cached thresholds (call after a
        training call). Unit variant: [units], computed from the current kernel.
        """
        if self.variant == "weight":
            return tf.abs(self._kernel_value()) < self.threshold[None, :]
        return self.unit_targets()

    def dropped_weights(self):
        """One training step's (kernel, bias, drop_mask); advances `step` (and so the seed).

        drop_mask is [n_in, units] (weight variant) or [units] (unit variant).
        """
        alpha, _ = self.rates()
        kernel = tf.convert_to_tensor(self.kernel)
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        if self.variant == "weight":
            if self.rank_every == 1:
                threshold = self.ranked_threshold()
            else:
                threshold = tf.cond(tf.equal(self.step % self.rank_every, 0),
                                    self.ranked_threshold,
                                    lambda: tf.convert_to_tensor(self.threshold))
            # Assigned outside the cond: MirroredStrategy cannot sync a variable
            # update made inside control flow.
            self.threshold.assign(threshold)
            target = tf.abs(tf.stop_gradient(kernel)) < threshold[None, :]
            drop = target & bernoulli_mask(kernel.shape, alpha, self._seed())
            kernel = kernel * tf.cast(~drop, kernel.dtype)
        else:
            target = self.unit_targets()
            drop = target & bernoulli_mask([self.units], alpha, self._seed())
            keep = tf.cast(~drop, kernel.dtype)
            kernel = kernel * keep[None, :]
            if bias is not None and self.drop_bias:
                bias = bias * keep
        self.step.assign_add(1)
        return kernel, bias, drop

    def targets_removed(self):
        """(kernel, bias) with the whole current target set removed (fresh ranking).

        Weight variant: the bottom floor(gamma * n_in) |w| of each column zeroed;
        unit variant: the targeted units' kernel columns zeroed (and their bias
        with `drop_bias`). Does not advance `step`.
        """
        kernel = tf.convert_to_tensor(self.kernel)
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        if self.variant == "weight":
            keep = tf.abs(self._kernel_value()) >= self.ranked_threshold()[None, :]
            return kernel * tf.cast(keep, kernel.dtype), bias
        keep = tf.cast(~self.unit_targets(), kernel.dtype)
        if bias is not None and self.drop_bias:
            bias = bias * keep
        return kernel * keep[None, :], bias

    def call(self, inputs, training=None):
        if training:
            kernel, bias, _ = self.dropped_weights()
        elif self.evaluation == "remove_targets":
            kernel, bias = self.targets_removed()
        else:
            kernel = self.kernel
            bias = self.bias
        outputs = tf.matmul(inputs, kernel)
        if bias is not None:
            outputs = outputs + bias
        return self.activation(outputs) if self.activation is not None else outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, activation=keras.activations.serialize(self.activation),
                      use_bias=self.use_bias, variant=self.variant, alpha=self.alpha,
                      gamma=self.gamma, ramp_steps=self.ramp_steps, ramp=self.ramp,
                      rank_every=self.rank_every, drop_bias=self.drop_bias,
                      evaluation=self.evaluation, seed=self.seed,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def regime_variant(regime: str) -> Optional[str]:
    """"weight"/"unit" for a targeted regime (ramped or not), None for none/dropout."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    return regime.split("_")[1] if regime.startswith("targeted") else None


def targeted_dropout_mlp(regime: str = "none", input_shape: Tuple[int, ...] = (28, 28, 1),
                         hidden: Sequence[int] = (1000, 1000, 500, 200), num_classes: int = 10,
                         use_bias: bool = True, alpha: float = 0.5, gamma: float = 0.5,
                         dropout_rate: float = 0.25, ramp_steps: int = 0, ramp: str = "paper",
                         rank_every: int = 1, drop_bias: bool = False, evaluation: str = "dense",
                         target_logits: bool = False, seed: int = 0) -> keras.Sequential:
    """The 784-1000-1000-500-200-10 ReLU MLP (logits out) of the targeted-dropout study, under a regime.

    Regimes: "none" (plain `dni_tf.models.mlp`), "dropout" (standard inverted
    dropout of rate `dropout_rate` after every hidden ReLU), "targeted_weight" and
    "targeted_unit" (every hidden layer a `TargetedDense`; the logits layer too
    if `target_logits`), and "targeted_weight_ramp" / "targeted_unit_ramp" (the
    same with the paper's ramp over `ramp_steps` > 0 steps; a plain targeted
    regime ramps too when given ramp_steps > 0). Initialisation is the same in
    every regime (Glorot uniform, seed + layer index), and layer names are
    `dense_i` / `logits`, so pruning and figures treat all regimes alike.
    Input [B, *input_shape].
    """
    variant = regime_variant(regime)
    if regime.endswith("_ramp") and ramp_steps <= 0:
        raise ValueError(f"regime {regime!r} needs ramp_steps > 0, got {ramp_steps}")
    if regime == "none":
        return models.mlp(input_shape, hidden, num_classes, use_bias=use_bias, seed=seed,
                          name="mlp_none")
    layers = [keras.Input(input_shape), keras.layers.Flatten(name="flatten")]

    def dense(width, index, activation, name, targeted):
        init = keras.initializers.GlorotUniform(seed=seed + index)
        if not targeted:
            return keras.layers.Dense(width, activation=activation, use_bias=use_bias, name=name,
                                      kernel_initializer=init)
        return TargetedDense(width, activation=activation, use_bias=use_bias,
                             variant=variant, alpha=alpha, gamma=gamma,
                             ramp_steps=ramp_steps, ramp=ramp, rank_every=rank_every,
                             drop_bias=drop_bias, evaluation=evaluation,
                             seed=seed * 1000 + 17 + index, kernel_initializer=init, name=name)

    targeted = variant is not None
    for i, width in enumerate(hidden):
        layers.append(dense(width, i, "relu", f"dense_{i}", targeted))
        if regime == "dropout":
            layers.append(keras.layers.Dropout(dropout_rate, seed=seed * 1000 + 17 + i,
                                               name=f"dropout_{i}"))
    layers.append(dense(num_classes, len(hidden), None, "logits", targeted and target_logits))
    return keras.Sequential(layers, name=f"mlp_{regime}")


def set_evaluation(model: keras.Model, evaluation: str) -> None:
    """Sets `evaluation` ("dense" / "remove_targets") on every TargetedDense of `model`."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    for layer in model.layers:
        if isinstance(layer, TargetedDense):
            layer.evaluation = evaluation
