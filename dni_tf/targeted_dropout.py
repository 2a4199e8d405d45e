"""Targeted dropout (Gomez et al. 2019) for dense layers, and the seed-003 MLP.

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

The second half of the module is the study behind `experiments.targeted_dropout`:
`run_study` trains each regime ("none", "dropout", "targeted_weight",
"targeted_unit") through `dni_tf.training.train_and_evaluate`, prunes each trained
network with `dni_tf.pruning` at every fraction, and writes the accuracy table
(next to `PUBLISHED_BASELINE` on Fashion-MNIST) and the figures.
"""

from __future__ import annotations

import os
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
    """Seed 003's MLP (784-1000-1000-500-200-10, ReLU, logits out) under a regime.

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


# ---------------------------------------------------------------------------
# The study: train each regime, prune at every fraction, tables and figures.

# Public baseline (design.md): the plain 784-1000-1000-500-200-10 MLP on
# Fashion-MNIST, Adam 1e-3, batch 128, 20 epochs; test accuracy % by pruning %.
PUBLISHED_BASELINE = {
    "weight": {0: 88.5, 25: 88.6, 50: 88.6, 60: 88.2, 70: 86.9, 80: 86.3, 90: 80.5,
               95: 59.6, 97: 41.1, 99: 16.1},
    "unit": {0: 88.5, 25: 88.5, 50: 87.6, 60: 85.8, 70: 81.4, 80: 56.0, 90: 30.2,
             95: 20.7, 97: 12.3, 99: 2.3},
}
BASELINE_LABEL = "published baseline (none, 20 epochs)"


def compiled_model(regime: str, input_shape, num_classes: int, learning_rate: float = 1e-3,
                   **kwargs) -> keras.Model:
    """`targeted_dropout_mlp(regime, ...)` compiled with Adam and logits cross-entropy."""
    model = targeted_dropout_mlp(regime, input_shape=input_shape, num_classes=num_classes,
                                 **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def pruning_sweep(model: keras.Model, images: np.ndarray, labels: np.ndarray,
                  fractions_percent: Sequence[float], include_logits: bool = False):
    """Accuracy of pruned copies of `model` at each fraction (percent), both kinds.

    Returns a DataFrame with columns kind, fraction (percent), accuracy (0-1),
    sparsity and model_sparsity (see `pruning.PruneReport`).
    """
    import pandas as pd

    from dni_tf import pruning

    rows = []
    for kind in pruning.KINDS:
        for percent in fractions_percent:
            pruned, report = pruning.prune_model(model, percent / 100.0, kind, include_logits)
            rows.append({"kind": kind, "fraction": float(percent),
                         "accuracy": pruning.accuracy(pruned, images, labels),
                         "sparsity": report.sparsity, "model_sparsity": report.model_sparsity})
            del pruned
    return pd.DataFrame(rows)


def hidden_weight_magnitudes(model: keras.Model, include_logits: bool = False,
                             max_per_layer: int = 100_000, seed: int = 0):
    """DataFrame (layer, magnitude) of |w| of the prunable kernels (subsampled)."""
    import pandas as pd

    from dni_tf import pruning

    rng = np.random.default_rng(seed)
    frames = []
    for layer in pruning.prunable_layers(model, include_logits):
        values = np.abs(layer.kernel.numpy().ravel())
        if values.size > max_per_layer:
            values = rng.choice(values, max_per_layer, replace=False)
        frames.append(pd.DataFrame({"layer": layer.name, "magnitude": values}))
    return pd.concat(frames, ignore_index=True)


def wide_table(table, baseline: bool):
    """Long sweep table -> wide (kind, regime) x fraction accuracy in percent."""
    import pandas as pd

    frame = table.assign(accuracy=100.0 * table["accuracy"])
    rows = []
    if baseline:
        for kind, values in PUBLISHED_BASELINE.items():
            for fraction, acc in values.items():
                rows.append({"kind": kind, "regime": BASELINE_LABEL, "fraction": float(fraction),
                             "accuracy": acc})
    frame = pd.concat([frame[["kind", "regime", "fraction", "accuracy"]], pd.DataFrame(rows)],
                      ignore_index=True)
    wide = frame.pivot_table(index=["kind", "regime"], columns="fraction", values="accuracy",
                             sort=False)
    wide.columns = [f"{c:g}%" for c in wide.columns]
    return wide.reset_index()


def markdown_table(wide) -> str:
    header = "| " + " | ".join(wide.columns) + " |"
    lines = [header, "|" + "---|" * len(wide.columns)]
    for _, row in wide.iterrows():
        cells = [f"{v:.1f}" if isinstance(v, float) and not np.isnan(v) else
                 ("-" if isinstance(v, float) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(table, path: str, baseline: bool) -> None:
    """Accuracy vs pruning fraction: a line per regime, a panel per pruning kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = table.assign(accuracy=100.0 * table["accuracy"], source="this run")
    if baseline:
        rows = [{"kind": k, "regime": BASELINE_LABEL, "fraction": float(f), "accuracy": a,
                 "source": "published"}
                for k, values in PUBLISHED_BASELINE.items() for f, a in values.items()]
        frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
    grid = sns.relplot(data=frame, x="fraction", y="accuracy", hue="regime", style="source",
                       col="kind", kind="line", marker="o", height=3.6, aspect=1.15,
                       facet_kws={"sharey": True})
    grid.set_axis_labels("pruned (%)", "test accuracy (%)")
    grid.set_titles("{col_name} pruning")
    grid.figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(grid.figure)


def plot_magnitudes(magnitudes, path: str) -> None:
    """|w| histograms (log x): a panel per layer, a line per regime if present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = magnitudes[magnitudes["magnitude"] > 0]
    hue = "regime" if "regime" in frame.columns else None
    grid = sns.displot(data=frame, x="magnitude", hue=hue, col="layer", kind="hist",
                       element="step", fill=False, stat="density", common_norm=False,
                       bins=80, log_scale=(True, False), height=2.8, aspect=1.1)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("|w|", "density")
    grid.figure.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(grid.figure)


def run_study(data, workdir: str, config: dict, *, regimes: Sequence[str],
              fractions: Sequence[float], hidden: Sequence[int], steps: int, eval_every: int,
              alpha: float = 0.5, gamma: float = 0.5, dropout_rate: float = 0.25,
              rank_every: int = 1, ramp_steps: int = 0, use_bias: bool = True,
              batch_size: int = 128, learning_rate: float = 1e-3, prune_logits: bool = False,
              seed: int = 0) -> dict:
    """Trains each regime in `workdir/<regime>/`, prunes it, writes tables and figures.

    `data` is a `dni_tf.data.ImageData`; `fractions` are percentages. A rerun
    resumes each regime from its checkpoints (a finished regime is only reloaded
    and pruned again). Returns the metrics dict written to `workdir/results.json`.
    """
    import pandas as pd

    from dni_tf import results, training

    baseline = data.name == "fashion_mnist"
    tables, magnitudes, metrics = [], [], {}
    for regime in regimes:
        rundir = os.path.join(workdir, regime)
        keras.utils.clear_session()
        model = compiled_model(regime, data.image_shape, data.num_classes, learning_rate,
                               hidden=hidden, use_bias=use_bias, alpha=alpha, gamma=gamma,
                               dropout_rate=dropout_rate, ramp_steps=ramp_steps,
                               rank_every=rank_every, seed=seed)
        last = training.train_and_evaluate(
            model, data.train_dataset(batch_size, seed=seed), data.test_dataset(1000),
            steps=steps, eval_every=eval_every, workdir=rundir, label=regime)
        table = pruning_sweep(model, *data.test, fractions, prune_logits).assign(regime=regime)
        results.write_csv(os.path.join(rundir, "pruning.csv"), table)
        mags = hidden_weight_magnitudes(model, prune_logits, seed=seed)
        plot_magnitudes(mags, os.path.join(rundir, "weight_magnitudes.png"))
        run_metrics = {"test_accuracy": last.get("test_accuracy"), "step": last.get("step")}
        for row in table.itertuples():
            run_metrics[f"{row.kind}_pruned_{row.fraction:g}_accuracy"] = row.accuracy
            run_metrics[f"{row.kind}_pruned_{row.fraction:g}_sparsity"] = row.sparsity
        results.save_results(rundir, dict(config, regime=regime), run_metrics)
        metrics.update({f"{regime}/{k}": v for k, v in run_metrics.items()})
        tables.append(table)
        magnitudes.append(mags.assign(regime=regime))
    table = pd.concat(tables, ignore_index=True)
    results.write_csv(os.path.join(workdir, "pruning_accuracy.csv"), table)
    wide = wide_table(table, baseline)
    results.atomic_write_text(os.path.join(workdir, "pruning_accuracy.md"), markdown_table(wide))
    plot_accuracy(table, os.path.join(workdir, "pruning_accuracy.png"), baseline)
    plot_magnitudes(pd.concat(magnitudes, ignore_index=True),
                    os.path.join(workdir, "weight_magnitudes.png"))
    extra = {"published_baseline": PUBLISHED_BASELINE} if baseline else {}
    results.save_results(workdir, config, metrics, **extra)
    return metrics
