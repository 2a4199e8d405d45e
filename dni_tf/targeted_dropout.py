"""Targeted dropout (Gomez et al. 2019) for dense layers, and the study's 784-1000-1000-500-200-10 MLP.

Targeted dropout drops, during training only, elements that a later magnitude
pruning would remove anyway, so the network learns not to rely on them:

* weight variant: in each output column of the kernel, the `gamma` fraction of
  weights with the smallest |w| is the target set; each targeted weight is zeroed
  with probability `alpha` for the step.
* unit variant: the `gamma` fraction of units (kernel columns) with the smallest
  L2 norm is the target set; each targeted unit is dropped with probability
  `alpha` (its kernel column *and* its bias are zeroed, so its pre-activation is
  exactly 0 and a ReLU unit outputs 0).

Dropped elements are not rescaled (unlike standard dropout), as in the paper.
One mask is drawn per step and shared by the whole batch. At evaluation
(`training=False`) the layer is a plain dense layer: deterministic, unaffected.

`alpha` and `gamma` can be ramped linearly from 0 to their final values over
`ramp_steps` training steps; the layer's own `step` variable (incremented by each
training call) drives the ramp and seeds the masks, so both resume exactly from a
checkpoint.

Cost. Ranking |w| per column is a sort of the whole kernel; on CPU a sort of a
1000x1000 kernel costs ~20x its batch-128 matmul, so ranking at every step would
dominate the step. `rank_every=N` re-ranks every N training steps and keeps the
per-column thresholds in a variable in between (the target set then lags the
weights by < N steps). `rank_every=1` is exact. The unit variant ranks only
`units` norms and is always exact. The Bernoulli draws use 16-bit random
integers (alpha is applied with a resolution of 1/65536), which halves the cost
of the random numbers against float32 uniforms.

The study (training every regime, the pruning sweep, tables and figures) is
`dni_tf.studies.targeted_dropout`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from dni_tf import models

VARIANTS = ("weight", "unit")
REGIMES = ("none", "dropout", "targeted_weight", "targeted_unit")
_PROB_SCALE = 65536  # resolution of the 16-bit Bernoulli draws


def bernoulli_mask(shape: Sequence[int], probability, seed: tf.Tensor) -> tf.Tensor:
    """Boolean tensor of `shape` whose entries are True with `probability`.

    `seed` is a stateless seed (int32 [2]). Draws 16-bit integers (two per 32-bit
    random word), so `probability` is rounded to a multiple of 1/65536;
    probability 0 gives all False, 1 all True.
    """
    shape = [int(d) for d in shape]
    last = shape[-1]
    words = tf.random.stateless_uniform(shape[:-1] + [(last + 1) // 2], seed=seed,
                                        minval=None, maxval=None, dtype=tf.uint32)
    halves = tf.reshape(tf.bitcast(words, tf.uint16), shape[:-1] + [2 * ((last + 1) // 2)])
    if last % 2:
        halves = halves[..., :last]
    cutoff = tf.cast(tf.round(tf.cast(probability, tf.float32) * _PROB_SCALE), tf.int32)
    return tf.cast(halves, tf.int32) < cutoff


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
      ramp_steps: if > 0, alpha and gamma grow linearly from 0 to their values
        over this many training steps (step s uses s / ramp_steps of them).
      rank_every: re-rank the weights every this many training steps (weight
        variant only; 1 = every step, exact).
      seed: int seed of the dropout masks (step s uses the stateless seed
        (seed, s)); None picks one at random (kept in the config).
    """

    def __init__(self, units: int, activation=None, use_bias: bool = True,
                 variant: str = "weight", alpha: float = 0.5, gamma: float = 0.5,
                 ramp_steps: int = 0, rank_every: int = 1, seed: Optional[int] = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
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
        self.rank_every = int(rank_every)
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
        alpha = tf.constant(self.alpha, tf.float32)
        gamma = tf.constant(self.gamma, tf.float32)
        if self.ramp_steps > 0:
            ramp = tf.minimum(tf.cast(self.step, tf.float32) / float(self.ramp_steps), 1.0)
            alpha, gamma = alpha * ramp, gamma * ramp
        return alpha, gamma

    def _seed(self) -> tf.Tensor:
        """Stateless seed int32 [2] for this step's mask: (seed, step)."""
        step = tf.cast(tf.math.floormod(tf.convert_to_tensor(self.step), 2**31 - 1), tf.int32)
        return tf.stack([tf.constant(self.seed % (2**31 - 1), tf.int32), step])

    def target_mask(self) -> tf.Tensor:
        """Boolean target set for the current step, without dropping anything.

        Weight variant: [n_in, units], using the cached thresholds (call after a
        training call). Unit
        variant: [units], computed from the current kernel.
        """
        kernel = tf.stop_gradient(tf.convert_to_tensor(self.kernel))
        if self.variant == "weight":
            return tf.abs(kernel) < self.threshold[None, :]
        _, gamma = self.rates()
        norms = tf.norm(kernel, axis=0)
        k = tf.cast(tf.floor(gamma * self.units + 1e-6), tf.int32)
        return norms < _kth_smallest_threshold(norms, k)

    def ranked_threshold(self) -> tf.Tensor:
        """Per-column |w| threshold [units] for the current gamma (a full sort)."""
        _, gamma = self.rates()
        n_in = self.kernel.shape[0]
        k = tf.cast(tf.floor(gamma * n_in + 1e-6), tf.int32)
        magnitudes = tf.abs(tf.stop_gradient(tf.convert_to_tensor(self.kernel)))
        return _kth_smallest_threshold(magnitudes, k)

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
            target = self.target_mask()
            drop = target & bernoulli_mask([self.units], alpha, self._seed())
            keep = tf.cast(~drop, kernel.dtype)
            kernel = kernel * keep[None, :]
            if bias is not None:
                bias = bias * keep
        self.step.assign_add(1)
        return kernel, bias, drop

    def call(self, inputs, training=None):
        if training:
            kernel, bias, _ = self.dropped_weights()
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
                      gamma=self.gamma, ramp_steps=self.ramp_steps, rank_every=self.rank_every,
                      seed=self.seed,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def targeted_dropout_mlp(regime: str = "none", input_shape: Tuple[int, ...] = (28, 28, 1),
                         hidden: Sequence[int] = (1000, 1000, 500, 200), num_classes: int = 10,
                         use_bias: bool = True, alpha: float = 0.5, gamma: float = 0.5,
                         dropout_rate: float = 0.25, ramp_steps: int = 0, rank_every: int = 1,
                         target_logits: bool = False, seed: int = 0) -> keras.Sequential:
    """The 784-1000-1000-500-200-10 ReLU MLP (logits out) of the targeted-dropout study, under a regime.

    Regimes: "none" (plain `dni_tf.models.mlp`), "dropout" (standard inverted
    dropout of rate `dropout_rate` after every hidden ReLU), "targeted_weight" and
    "targeted_unit" (every hidden layer a `TargetedDense`; the logits layer too
    if `target_logits`). Initialisation is the same in every regime (Glorot
    uniform, seed + layer index), and layer names are `dense_i` / `logits`, so
    pruning and figures treat all regimes alike. Input [B, *input_shape].
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
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
                             variant=regime.split("_")[1], alpha=alpha, gamma=gamma,
                             ramp_steps=ramp_steps, rank_every=rank_every,
                             seed=seed * 1000 + 17 + index, kernel_initializer=init, name=name)

    targeted = regime.startswith("targeted")
    for i, width in enumerate(hidden):
        layers.append(dense(width, i, "relu", f"dense_{i}", targeted))
        if regime == "dropout":
            layers.append(keras.layers.Dropout(dropout_rate, seed=seed * 1000 + 17 + i,
                                               name=f"dropout_{i}"))
    layers.append(dense(num_classes, len(hidden), None, "logits", targeted and target_logits))
    return keras.Sequential(layers, name=f"mlp_{regime}")

