"""Decoupled Neural Interfaces for feed-forward networks (arXiv 1608.05343, Sec. 3.1).

`DNIClassifier` is a `keras.Model` whose `train_step` trains a classifier split
into blocks at decoupling points. A network of `n` layers has decoupling points
`1 .. n-1` (point `k` sits on the output `h_k` of layer `k`); `decouple` lists
the points in use (default: every point). The layers between consecutive points
form a block. One training step:

1. Forward. Each block runs on its input with the gradient stopped, so nothing
   flows backward across a decoupling point (update unlock). With
   `unlock="complete"` a synthetic input model `I_k(x)` predicts `h_k` from the
   data and the next block runs on that prediction instead (forward unlock too);
   `I_k` regresses onto the real `h_k`.
2. Synthetic gradients. The module `M_k(h_k, c)` (`dni_tf.synthetic_gradients`;
   `c` = one-hot label for cDNI, none for DNI) predicts the gradient at point
   `k`. The block below a point is updated from `sg_scale * M_k(h_k)` (or from
   the true gradient in `oracle` mode); the last block from the true loss. With
   BP(lambda) (`lambda_mix = lam > 0`) the gradient sent below point k is
   `lam * (gradient arriving from above) + (1 - lam) * sg_scale * M_k`, so
   `lam = 1` is backprop. One backward pass gives all these updates.
3. Module targets, all constants (`stop_gradient`): the same backward pass also
   gives, at each block's input, the gradient arriving from above (the next
   module's synthetic gradient backpropagated through the next block, plus
   lambda x what arrived there; the loss gradient for the last block): the
   bootstrapped target (synthetic terms unscaled by sg_scale). `target_mix = t`
   mixes the TRUE gradient into the targets only (`t * true + (1 - t) *
   bootstrapped`; one extra backward chain). Each module is trained by L2
   regression (mean over examples) onto its target.
4. Sparse updates (`update_prob = p < 1`): each decoupled block, together with
   the module at its output, is updated with probability p per step by its own
   optimizer; an unselected block's update is not computed (`tf.cond`; under a
   distribution strategy it is computed and undone), so its weights, Adam
   moments and step count stay unchanged; its learning rate follows the global
   schedule. Batch-norm moving statistics still follow the forward pass. The
   last block is always updated. The draws are stateless random numbers keyed
   by `(seed, step)` held in the model weight `rng_state`: deterministic for a
   seed and restored by checkpoints (a `SeedGenerator`'s state is not saved by
   `save_weights` in Keras 3.15).
5. Complete unlock: input models regress onto the real activations (one extra
   forward pass; `input_targets="real"`, the default, so errors do not compound
   and the moving statistics are those of the real chain that evaluation uses),
   or onto block k-1 applied to I_{k-1}(x) (`"chained"`).

All of this is built once at trace time: the per-layer Python loops only build
the graph; a step has no host round trips. Every module, input model, extra
optimizer and the RNG state is created in `build()`/`compile()`, so
`save_weights`/`load_weights` (and `dni_tf.harness.training`'s resume) cover them.

Units (`gradient_units`): "batch_mean" = dL/dh of the batch-mean loss, or
"per_example" = `B * dL/dh`; "auto" = batch_mean for DNI, per_example for cDNI.
`sg_lr_scale` sets the modules' learning rate relative to the network's
(None = per method: `default_sg_lr_scale`).
Decoupling points (`fcn_layers`/`cnn_layers` `point`): "pre_relu" (the
batch-norm output before the ReLU) or "post_relu"; `build_classifier`'s "auto"
= pre_relu for DNI, post_relu otherwise. Both measured in docs/dni_feedforward.md.

Metrics returned by `train_step` (and so logged to history.csv/TensorBoard):
`loss`, `accuracy`, per point k `sg_loss_k` (the module's regression loss) and,
with complete unlock, `input_loss_k`; with `diagnostics=True` also
`sg_cosine_k` and `sg_norm_ratio_k` (cosine similarity and norm ratio
||sg|| / ||true|| between the (scaled) synthetic and the true gradient over the
batch, per step) and `update_cosine_k` (the gradient of the block below point k
as used vs from the true gradient, each summed over the evaluation period;
costs one extra backward chain and a backward pass per block). `test_step` returns only `loss` and the
compiled metrics.

The models of the paper are built by `fcn_layers` and `cnn_layers`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from dni_tf import random_streams
from dni_tf.synthetic_gradients import SyntheticGradient, regression_loss
from dni_tf.core import BuildsBeforeTracing, track_loss

METHODS = ("backprop", "dni", "cdni")
UNLOCKS = ("update", "complete")


# --------------------------------------------------------------------------- models
POINTS = ("pre_relu", "post_relu")


def _check_point(point: str) -> None:
    if point not in POINTS:
        raise ValueError(f"point must be one of {POINTS}, got {point!r}")


INITS = ("keras", "torch")


def _kernel_init(init: str, seed: int, hidden: bool):
    """Keras: He-normal (hidden) / Glorot-uniform (output); torch: U(+-1/sqrt(fan_in))."""
    if init == "torch":  # PyTorch's nn.Linear/Conv default: limit sqrt(3 * scale / fan_in)
        return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed)
    return (keras.initializers.HeNormal(seed=seed) if hidden
            else keras.initializers.GlorotUniform(seed=seed))


def fcn_layers(num_layers: int, num_classes: int = 10, width: int = 256,
               seed: int = 0, point: str = "pre_relu",
               input_norm: Optional[Tuple[float, float]] = None, output_norm: bool = False,
               init: str = "keras", bn_momentum: float = 0.99,
               bn_epsilon: float = 1e-3) -> List[keras.Sequential]:
    """The paper's FCN as a list of `num_layers` layers (each a keras.Sequential).

    The network: n-1 x [Dense(width, no bias), batch norm, ReLU] (flattened
    input), then Dense(num_classes) logits. Input: images [B, H, W, C] in [0, 1].
    Options (defaults = the earlier network):

    * `input_norm=(mean, std)`: layer 1 first maps x to (x - mean) / std.
    * `output_norm`: the logits are Dense(num_classes, no bias) -> batch norm
      (as the public PyTorch implementation's MNIST MLP).
    * `init`: "keras" (He-normal hidden, Glorot-uniform output) or "torch"
      (uniform in +-1/sqrt(fan_in), PyTorch's default for nn.Linear).
    * `bn_momentum`, `bn_epsilon`: of every batch norm (Keras defaults 0.99,
      1e-3; PyTorch's are 0.9 in this convention and 1e-5).
    `point` says where the split between layer k and k+1 (decoupling point k)
    sits; the network computes the same function either way (same seed, same
    weights):

    * "pre_relu" (default): layer k ends at its batch-norm output and layer k+1
      starts with the ReLU, so a synthetic gradient module reads the
      normalised pre-activation and predicts its gradient (as the public
      PyTorch implementation does). The layer below is updated by exactly the
      gradient it would get at its own output; the module sees the sign of every
      unit (which units the ReLU will pass) and need not predict the gradient
      the ReLU then zeroes.
    * "post_relu": layer k ends after the ReLU (the earlier behaviour).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    _check_point(point)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    pre = point == "pre_relu"

    def norm():
        return keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon)

    first = [keras.layers.Flatten()]
    if input_norm is not None:
        mean, std = (float(v) for v in input_norm)
        if not std > 0.0:
            raise ValueError(f"input_norm std must be > 0, got {std}")
        first.append(keras.layers.Rescaling(1.0 / std, offset=-mean / std))
    layers = []
    for i in range(num_layers - 1):
        parts = list(first) if i == 0 else []
        if pre and i > 0:
            parts.append(keras.layers.ReLU())
        parts += [keras.layers.Dense(width, use_bias=False,
                                     kernel_initializer=_kernel_init(init, seed + i, True)),
                  norm()]
        if not pre:
            parts.append(keras.layers.ReLU())
        layers.append(keras.Sequential(parts, name=f"layer_{i + 1}"))
    last = list(first) if num_layers == 1 else []
    if pre and num_layers > 1:
        last.append(keras.layers.ReLU())
    last.append(keras.layers.Dense(
        num_classes, use_bias=not output_norm,
        kernel_initializer=_kernel_init(init, seed + num_layers, False)))
    if output_norm:  # batch norm's offset replaces the bias
        last.append(norm())
    layers.append(keras.Sequential(last, name=f"layer_{num_layers}"))
    return layers


def cnn_layers(num_layers: int = 3, num_classes: int = 10, filters: int = 128,
               kernel_size: int = 5, seed: int = 0,
               point: str = "pre_relu") -> List[keras.Sequential]:
    """The paper's MNIST/CIFAR-10 CNN as a list of `num_layers` layers.

    The network: n-1 x [Conv2D(filters, kernel_size, 'same', no bias), batch
    norm, ReLU, 3x3 stride-2 pooling ('same'): max pooling after layer 1,
    average pooling after later layers], then flatten + Dense(num_classes).
    `point` as in `fcn_layers` (same function either way):

    * "pre_relu" (default): a point reads the batch-norm output before the
      ReLU. Layer 1 ends with conv, BN, max pooling (max pooling commutes with
      the ReLU, so it can sit before the point: 14x14 maps at point 1 for a
      28x28 input); later layers start with the ReLU and the previous layer's
      average pooling (which does not commute with the ReLU), so points 2, 3 ...
      read maps at the resolution of their convolution (14x14, 7x7 ...).
    * "post_relu": each layer ends after its pooling (14x14 and 7x7 maps at the
      first two points).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    _check_point(point)
    pre = point == "pre_relu"

    def pool(i):
        return (keras.layers.MaxPooling2D(3, 2, padding="same") if i == 0
                else keras.layers.AveragePooling2D(3, 2, padding="same"))

    layers = []
    for i in range(num_layers - 1):
        parts = []
        if pre and i > 0:
            parts += [keras.layers.ReLU()] + ([pool(i - 1)] if i > 1 else [])
        parts += [keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False,
                                      kernel_initializer=keras.initializers.HeNormal(seed=seed + i)),
                  keras.layers.BatchNormalization()]
        if pre:
            if i == 0:
                parts.append(pool(0))
        else:
            parts += [keras.layers.ReLU(), pool(i)]
        layers.append(keras.Sequential(parts, name=f"layer_{i + 1}"))
    last = []
    if pre and num_layers > 1:
        last += [keras.layers.ReLU()] + ([pool(num_layers - 2)] if num_layers > 2 else [])
    last += [keras.layers.Flatten(),
             keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(
                 seed=seed + num_layers))]
    layers.append(keras.Sequential(last, name=f"layer_{num_layers}"))
    return layers


class SyntheticInput(keras.layers.Layer):
    """Synthetic input model I(x) for complete unlock: predicts a block's input.

    Args:
      target_shape: per-example shape of the activation to predict, (D,) or
        (H, W, C).
      hidden_layers: 0-2 hidden layers (Dense/Conv2D, batch norm, ReLU).
      units: hidden width (default 1024 dense, 128 conv filters).
      kernel_size: conv kernel size.

    Call: `I(x, training)` with images x [B, H0, W0, C0] -> [B, *target_shape].
    Dense targets flatten x first; conv targets run the hidden convolutions at
    the input resolution, resize (area) to (H, W), then a final convolution.
    Unlike the synthetic gradient module, the output layer is not zero.
    """

    def __init__(self, target_shape: Tuple[int, ...], hidden_layers: int = 0,
                 units: Optional[int] = None, kernel_size: int = 5, seed: int = 0, **kwargs):
        # float32 whatever the global (mixed) policy, like the synthetic gradient
        # modules: it regresses onto activations, and bfloat16 would round away the
        # small differences that train it.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.target_shape = tuple(int(d) for d in target_shape)
        self.hidden_layers = hidden_layers
        self.units = units
        self.kernel_size = kernel_size
        self.seed = seed
        self.conv = len(self.target_shape) == 3
        width = units or (128 if self.conv else 1024)
        # Public attribute names: Keras saving skips attributes starting with "_".
        self.hidden_cores, self.hidden_norms = [], []
        for i in range(hidden_layers):
            init = keras.initializers.HeNormal(seed=seed + i)
            self.hidden_cores.append(
                keras.layers.Conv2D(width, kernel_size, padding="same", use_bias=False,
                                    kernel_initializer=init, dtype=self.dtype_policy) if self.conv
                else keras.layers.Dense(width, use_bias=False, kernel_initializer=init,
                                        dtype=self.dtype_policy))
            self.hidden_norms.append(keras.layers.BatchNormalization(dtype=self.dtype_policy))
        init = keras.initializers.GlorotUniform(seed=seed + hidden_layers)
        self.output_layer = (keras.layers.Conv2D(self.target_shape[-1], kernel_size, padding="same",
                                                 kernel_initializer=init, dtype=self.dtype_policy)
                             if self.conv
                             else keras.layers.Dense(self.target_shape[0], kernel_initializer=init,
                                                     dtype=self.dtype_policy))

    def build(self, input_shape):
        shape = tuple(input_shape)
        if not self.conv:
            shape = (shape[0], _prod(shape[1:]))
        for core, bn in zip(self.hidden_cores, self.hidden_norms):
            core.build(shape)
            shape = core.compute_output_shape(shape)
            bn.build(shape)
        if self.conv:
            shape = (shape[0], *self.target_shape[:2], shape[-1])
        self.output_layer.build(shape)

    def call(self, x, training=False):
        x = tf.cast(x, tf.float32)
        if not self.conv:
            x = tf.reshape(x, [tf.shape(x)[0], -1])
        for core, bn in zip(self.hidden_cores, self.hidden_norms):
            x = tf.nn.relu(bn(core(x), training=training))
        if self.conv and tuple(x.shape[1:3]) != self.target_shape[:2]:
            x = tf.image.resize(x, self.target_shape[:2], method="area")
        return self.output_layer(x)


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


class SummedCosine(keras.metrics.Metric):
    """Cosine between two vectors each summed over the metric's period.

    `update_state(a, b)` adds the flattened `a` and `b` to two running sums;
    `result()` is cos(sum a, sum b). Keras resets metrics at every fit() epoch,
    which `dni_tf.harness.training` makes one evaluation period, so this is the cosine
    of the per-step gradients summed over that period.
    """

    def __init__(self, size: int, name: str, **kwargs):
        super().__init__(name=name, **kwargs)
        self.size = int(size)
        self.sum_a = self.add_variable(shape=(self.size,), initializer="zeros", name="sum_a")
        self.sum_b = self.add_variable(shape=(self.size,), initializer="zeros", name="sum_b")

    def update_state(self, a, b):
        self.sum_a.assign_add(tf.cast(a, tf.float32))
        self.sum_b.assign_add(tf.cast(b, tf.float32))

    def result(self):
        a, b = self.sum_a.value, self.sum_b.value
        return tf.reduce_sum(a * b) / (tf.norm(a) * tf.norm(b) + 1e-30)

    def reset_state(self):
        self.sum_a.assign(tf.zeros_like(self.sum_a.value))
        self.sum_b.assign(tf.zeros_like(self.sum_b.value))


def _flat(tensors) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _float32(t):
    return tf.cast(t, tf.float32)


def _scale_backward(h, lam: float):
    """Forward: `h` exactly; backward: the incoming gradient times `lam`."""
    stopped = tf.stop_gradient(h)
    return stopped + lam * (h - stopped)


GRADIENT_UNITS = ("auto", "batch_mean", "per_example")
POINT_CHOICES = ("auto", *POINTS)


def default_units(method: str) -> str:
    """`gradient_units="auto"`: batch-mean units for DNI, per-example units for cDNI.

    Measured on the parity setup (docs/dni_feedforward.md): DNI needs modules
    that track their targets quickly (batch-mean units: 97.0% vs 93.5%), while
    cDNI does better with the slower, smoother per-example units (98.3% vs
    98.0% at the same point).
    """
    return "batch_mean" if method == "dni" else "per_example"


def default_sg_lr_scale(method: str) -> float:
    """`sg_lr_scale=None`: the modules' learning rate relative to the network's, per method.

    Measured on the parity setup (docs/dni_feedforward.md): at 1/4 (or 1) of
    the network's rate an unconditioned module's output was mostly not its
    target (twice the true gradient's norm at a per-step cosine of 0.007; under
    Adam its weight steps do not shrink with its tiny batch-mean targets) and
    DNI's training loss rose after epoch 8; at 1/16 it falls steadily (3 seeds:
    97.59% vs 96.96%). cDNI is best at 1/4. Not the package default: on the
    every-layer FCN runs cDNI prefers 1 (one seed, see the doc).
    """
    return {"dni": 1.0 / 16.0, "cdni": 0.25}.get(method, 1.0)


def default_point(method: str) -> str:
    """`point="auto"` in `build_classifier`: pre-ReLU for DNI, post-ReLU for cDNI/backprop."""
    return "pre_relu" if method == "dni" else "post_relu"
INPUT_TARGETS = ("real", "chained")
_GOOD_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


# --------------------------------------------------------------------------- model
class DNIClassifier(BuildsBeforeTracing, keras.Model):
    """A classifier trained with backprop, DNI or cDNI at chosen decoupling points.

    Args:
      layers: the network as a list of `n` Keras layers/Sequentials applied in
        order (e.g. `fcn_layers(4)`); the last one outputs logits [B, classes].
      num_classes: number of classes (cDNI context size).
      method: "backprop" (plain backprop through the same layers), "dni" or
        "cdni" (modules conditioned on the one-hot label).
      decouple: decoupling points (1-based layer indices in 1 .. n-1: point k is
        the output of layer k); None = every point. Ignored for backprop.
      sg_hidden_layers, sg_units, sg_kernel_size: synthetic gradient module
        architecture (see `SyntheticGradient`).
      gradient_units: what the modules predict and regress onto.
        "batch_mean": dL/dh of the batch-mean loss L, the gradient the layer
        below receives under backprop. "per_example": B * dL/dh, the
        per-example gradient (B times larger; the earlier default). Under Adam
        the step of the module's weights does not depend on the size of its
        targets, so B-times-larger targets make the module track them about B
        times more slowly. "auto" (default): batch_mean for dni, per_example
        for cdni (`default_units`; measured, see docs/dni_feedforward.md).
      sg_scale: the synthetic gradient is multiplied by this (> 0) before it
        updates the layers; modules still predict unscaled gradients.
      lambda_mix: BP(lambda) of the paper's supplement. At every point the
        gradient sent to the layers below is
        `lambda * (gradient arriving from above) + (1 - lambda) * sg_scale * M`,
        so lambda = 1 is backprop and lambda = 0 pure DNI. Each module regresses
        onto the gradient arriving from above at its point (the lambda-return,
        with unscaled synthetic terms). Needs unlock="update", not oracle.
      target_mix: weight in [0, 1] of the TRUE gradient in the module targets
        only (`target_mix * true + (1 - target_mix) * bootstrapped`); the layers
        still follow the synthetic gradient. This is what `lambda_mix` used to
        do; it needs one extra backward chain.
      update_prob: probability (0, 1] that a decoupled block (and the module at
        its output) is updated in a step. Needs dni/cdni when < 1. Each gated
        block has its own optimizer (its own Adam step count, so bias
        correction counts only its own updates; its learning rate follows the
        global schedule), and a skipped block's update is not computed.
      unlock: "update" or "complete" (synthetic inputs too; needs dni/cdni).
      input_targets: complete unlock only. "real" (default): each input model
        I_k regresses onto the real activation h_k of the real forward chain
        (one extra forward pass, no backward), and the batch-norm moving
        statistics of the blocks fed by input models follow that real chain,
        as evaluation uses it. "chained": I_k regresses onto block k applied to
        I_{k-1}(x) (no extra pass; errors compound with depth and the moving
        statistics come from synthetic inputs).
      input_hidden_layers, input_units: synthetic input model architecture.
      oracle: use the true gradient in place of the synthetic gradient when
        updating layers (modules are still trained); a testing aid. The layer
        updates equal backprop's only with sg_scale = 1 (the true gradient is
        multiplied by sg_scale like a synthetic one).
      diagnostics: also compute true gradients and log, per point k,
        `sg_cosine_k`, `sg_norm_ratio_k` (synthetic vs true gradient at the
        point, per step, averaged over the period) and `update_cosine_k` (the
        gradients of the block just below point k, as used vs from the true
        gradient, each SUMMED over the evaluation period, then compared). Costs
        one extra backward chain and one backward pass per block.
      seed: seed for the modules' initialisers and the sparse-update draws.
      sg_lr_scale: the modules' learning rate is the network's times this
        (> 0; 1 = the same rate, the default); None = per method
        (`default_sg_lr_scale`: 1/16 for dni, 1/4 for cdni, measured on the
        parity setup). Each module's optimizer step is rescaled
        after it is applied (new = old + s * step), which is exactly a
        learning rate s times larger for Keras' Adam/SGD (their whole step is
        proportional to the learning rate); moments and step counts are the
        optimizer's as before. Under Adam this is the explicit form of what
        `gradient_units` does implicitly: per-example units are roughly
        batch-mean units with the module output layer's learning rate divided
        by B.

    Compile with a loss on integer labels and logits reduced by the batch mean,
    e.g. `SparseCategoricalCrossentropy(from_logits=True)`. `sample_weight`
    and `class_weight` are not supported (a ValueError says so): a module
    cannot predict a per-example weight it does not see.
    """

    def __init__(self, layers: Sequence[keras.layers.Layer], num_classes: int,
                 method: str = "dni", decouple: Optional[Sequence[int]] = None,
                 sg_hidden_layers: int = 0, sg_units: Optional[int] = None,
                 sg_kernel_size: int = 5, gradient_units: str = "auto",
                 sg_scale: float = 1.0, lambda_mix: float = 0.0, target_mix: float = 0.0,
                 update_prob: float = 1.0, unlock: str = "update", input_targets: str = "real",
                 input_hidden_layers: int = 1, input_units: Optional[int] = None,
                 oracle: bool = False, diagnostics: bool = False, seed: int = 0,
                 sg_lr_scale: Optional[float] = 1.0, **kwargs):
        super().__init__(**kwargs)
        n = len(layers)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if unlock not in UNLOCKS:
            raise ValueError(f"unlock must be one of {UNLOCKS}, got {unlock!r}")
        if gradient_units not in GRADIENT_UNITS:
            raise ValueError(f"gradient_units must be one of {GRADIENT_UNITS}, got {gradient_units!r}")
        if input_targets not in INPUT_TARGETS:
            raise ValueError(f"input_targets must be one of {INPUT_TARGETS}, got {input_targets!r}")
        if not 0.0 < update_prob <= 1.0:
            raise ValueError(f"update_prob must be in (0, 1], got {update_prob}")
        if not 0.0 <= lambda_mix <= 1.0:
            raise ValueError(f"lambda_mix must be in [0, 1], got {lambda_mix}")
        if not 0.0 <= target_mix <= 1.0:
            raise ValueError(f"target_mix must be in [0, 1], got {target_mix}")
        if lambda_mix > 0.0 and (unlock != "update" or oracle):
            raise ValueError("lambda_mix > 0 (BP(lambda)) needs unlock='update' and no oracle")
        if not sg_scale > 0.0:
            raise ValueError(f"sg_scale must be > 0, got {sg_scale}")
        if sg_lr_scale is None:
            sg_lr_scale = default_sg_lr_scale(method)
        if not sg_lr_scale > 0.0:
            raise ValueError(f"sg_lr_scale must be > 0, got {sg_lr_scale}")
        if method == "backprop":
            points: List[int] = []
            if update_prob < 1.0 or unlock != "update" or oracle:
                raise ValueError("update_prob < 1, complete unlock and oracle need method dni/cdni")
        else:
            if n < 2:
                raise ValueError(f"{method} needs at least 2 layers (a decoupling point), got {n}")
            points = sorted(set(range(1, n) if decouple is None else (int(k) for k in decouple)))
            if not points or points[0] < 1 or points[-1] > n - 1:
                raise ValueError(f"decoupling points must be in 1..{n - 1}, got {list(decouple or [])}")
        self.net_layers = list(layers)
        self.num_classes = num_classes
        self.method = method
        self.points = points
        self.gradient_units = default_units(method) if gradient_units == "auto" else gradient_units
        self.sg_scale = float(sg_scale)
        self.sg_lr_scale = float(sg_lr_scale)
        self.lambda_mix = float(lambda_mix)
        self.target_mix = float(target_mix)
        self.update_prob = float(update_prob)
        self.unlock = unlock
        self.input_targets = input_targets
        self.oracle = bool(oracle)
        self.diagnostics = bool(diagnostics) and method != "backprop"
        # Blocks: the layers between consecutive decoupling points (0-based slices).
        bounds = [0, *points, n]
        self.block_slices = [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]
        context_dim = num_classes if method == "cdni" else None
        self.sg_modules = [
            SyntheticGradient(hidden_layers=sg_hidden_layers, units=sg_units,
                              kernel_size=sg_kernel_size, context_dim=context_dim,
                              seed=seed + 1000 + 10 * k, name=f"sg_{k}")
            for k in points]
        self._input_config = dict(hidden_layers=input_hidden_layers, units=input_units,
                                  kernel_size=sg_kernel_size)
        self.input_models: List[SyntheticInput] = []
        self.block_optimizers: List[keras.optimizers.Optimizer] = []
        self._seed = seed
        self.rng_state = None  # (seed, step) of the sparse-update draws; a weight, built in build()
        self.sg_loss_trackers = [keras.metrics.Mean(name=f"sg_loss_{k}") for k in points]
        self.input_loss_trackers = ([keras.metrics.Mean(name=f"input_loss_{k}") for k in points]
                                    if unlock == "complete" else [])
        self.cosine_trackers = ([keras.metrics.Mean(name=f"sg_cosine_{k}") for k in points]
                                if self.diagnostics else [])
        self.norm_ratio_trackers = ([keras.metrics.Mean(name=f"sg_norm_ratio_{k}") for k in points]
                                    if self.diagnostics else [])
        self.update_cosine_trackers: List[SummedCosine] = []

    # ----------------------------------------------------------------- building
    def build(self, input_shape):
        shape = tuple(input_shape)
        point_shapes = {}
        for i, layer in enumerate(self.net_layers):
            if not layer.built:
                layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
            point_shapes[i + 1] = shape
        for module, k in zip(self.sg_modules, self.points):
            module.build(point_shapes[k])
        if self.unlock == "complete" and not self.input_models:
            self.input_models = [
                SyntheticInput(point_shapes[k][1:], seed=self._seed + 2000 + 10 * k,
                               name=f"input_model_{k}", **self._input_config)
                for k in self.points]
            for model in self.input_models:
                model.build(tuple(input_shape))
        if self.diagnostics and not self.update_cosine_trackers:
            self.update_cosine_trackers = [
                SummedCosine(sum(_prod(v.shape) for v in self._layer_vars(j)),
                             name=f"update_cosine_{k}")
                for j, k in enumerate(self.points)]
        self._build_rng_state()
        self.built = True
        self._build_optimizers()

    def _build_rng_state(self):
        if self.rng_state is None:
            # A model weight, unlike a SeedGenerator's state, so checkpoints restore it.
            self.rng_state = self.add_weight(
                name="sparse_update_rng", shape=(2,), dtype="int32", trainable=False,
                initializer=keras.initializers.Constant([self._seed + 7, 0]))

    def compile(self, *args, **kwargs):
        loss = kwargs.get("loss", args[1] if len(args) > 1 else None)
        reduction = getattr(loss, "reduction", None)
        if reduction is not None and reduction not in _GOOD_REDUCTIONS:
            raise ValueError(
                f"DNIClassifier needs a loss reduced by the batch mean, got reduction="
                f"{reduction!r}: a sum-reduced loss makes every gradient and module target "
                "B times too large (use reduction='sum_over_batch_size')")
        super().compile(*args, **kwargs)
        if self.built:
            self._build_optimizers()

    def _block_variables(self, j: int) -> List[keras.Variable]:
        start, stop = self.block_slices[j]
        variables = [v for layer in self.net_layers[start:stop] for v in layer.trainable_variables]
        if j < len(self.sg_modules):
            variables += self.sg_modules[j].trainable_variables
        return variables

    def _gated_blocks(self) -> List[int]:
        return list(range(len(self.points))) if self.update_prob < 1.0 else []

    def _build_optimizers(self):
        """Builds the compiled optimizer (and per-block clones for sparse updates).

        A clone gets a plain (settable) learning rate: every step it is set to
        the compiled optimizer's current rate, so a schedule follows the global
        step while each clone's own step count drives its bias correction.
        """
        if getattr(self, "optimizer", None) is None:
            return
        gated = self._gated_blocks()
        if gated and not self.block_optimizers:
            config = dict(self.optimizer.get_config())
            config["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
            self.block_optimizers = [self.optimizer.__class__.from_config(dict(config))
                                     for _ in gated]
            for j, opt in zip(gated, self.block_optimizers):
                opt.build(self._block_variables(j))
        if not self.optimizer.built:
            gated_ids = {id(v) for j in gated for v in self._block_variables(j)}
            self.optimizer.build([v for v in self.trainable_variables if id(v) not in gated_ids])

    # ----------------------------------------------------------------- forward
    def call(self, x, training=False):
        h = x
        for layer in self.net_layers:
            h = layer(h, training=training)
        return h

    def _run_block(self, j, h, training):
        start, stop = self.block_slices[j]
        for layer in self.net_layers[start:stop]:
            h = layer(h, training=training)
        return h

    # ----------------------------------------------------------------- training
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None and self.points:
            raise ValueError(
                "DNIClassifier does not support sample_weight or class_weight (fit() turns "
                "class_weight into sample weights): the synthetic gradient modules would have "
                "to predict each example's weight. Resample the data instead.")
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        if not self.points:
            return self._backprop_step(x, y, sample_weight)
        num_points = len(self.points)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        # Module units <-> gradients of the (replica-scaled) batch-mean loss.
        if self.gradient_units == "per_example":
            units = batch * float(replicas)
        else:
            units = tf.constant(float(replicas))
        examples = batch * float(replicas)  # the regression loss is a mean over examples
        context = tf.one_hot(y, self.num_classes) if self.method == "cdni" else None
        complete = self.unlock == "complete"
        lam = self.lambda_mix

        real_chain = complete and self.input_targets == "real"
        if real_chain:
            # Moving statistics before this step: the passes on synthetic inputs
            # below move them, the real chain (after the tape) recomputes them.
            moving = [v for i in range(1, num_points + 1) for v in self._block_moving(i)]
            saved_moving = [(v, tf.identity(v.value)) for v in moving]
        with tf.GradientTape(persistent=True) as tape:
            inputs, outputs, input_preds = [], [], []
            h = x
            for j in range(num_points + 1):
                if j > 0:
                    if complete:
                        pred = self.input_models[j - 1](x, training=True)
                        input_preds.append(pred)
                        h = tf.stop_gradient(pred)
                        tape.watch(h)
                    elif lam > 0.0:
                        h = _scale_backward(h, lam)  # BP(lambda): lambda x the gradient from above
                    else:
                        h = tf.stop_gradient(h)
                        tape.watch(h)
                inputs.append(h)
                h = self._run_block(j, h, training=True)
                outputs.append(h)
            logits = outputs[-1]
            loss = self.compute_loss(x=x, y=y, y_pred=logits, training=True)
            sg_preds = [module(tf.stop_gradient(out), context=context, training=True)
                        for module, out in zip(self.sg_modules, outputs[:-1])]
        # Input model targets (complete unlock): the real activations.
        input_targets = []
        if real_chain:
            for v, value in saved_moving:
                v.assign(value)
            r = tf.stop_gradient(outputs[0])  # block 0 always runs on the real input
            input_targets.append(r)
            for i in range(1, num_points):
                r = tf.stop_gradient(self._run_block(i, r, training=True))
                input_targets.append(r)
        elif complete:
            # "chained": block j - 1 applied to its own (synthetic) input.
            input_targets = [tf.stop_gradient(out) for out in outputs[:-1]]
        input_values = input_preds

        need_true = self.oracle or self.diagnostics or self.target_mix > 0.0
        true_grads = [None] * num_points
        if need_true:
            # True gradient chain (loss units): one extra backward pass, inputs only.
            grad = tape.gradient(loss, inputs[-1])
            for j in range(num_points - 1, -1, -1):
                true_grads[j] = grad
                if j > 0:
                    grad = tape.gradient(outputs[j], inputs[j], output_gradients=grad)
        # Under a 16-bit policy the blocks' activations (and the gradients at them)
        # are 16-bit while the modules are float32: cotangents are cast to the
        # activation's dtype, targets and diagnostics are computed in float32.
        if self.oracle:
            cotangents = [self.sg_scale * g for g in true_grads]
        else:
            cotangents = [tf.cast((1.0 - lam) * self.sg_scale * p / units, out.dtype)
                          for p, out in zip(sg_preds, outputs)]

        gated = self._gated_blocks()
        block_vars = [self._layer_vars(j) for j in range(num_points + 1)]
        flat_vars = [v for vs in block_vars for v in vs]
        grads = tape.gradient(
            [*outputs[:-1], loss], flat_vars + inputs[1:],
            output_gradients=[*cotangents, tf.ones_like(loss)],
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        layer_grads, input_grads = grads[:len(flat_vars)], grads[len(flat_vars):]

        # Module targets (module units): the gradient arriving at each point from
        # above, with its synthetic terms unscaled by sg_scale.
        if lam > 0.0 and self.sg_scale != 1.0:
            arriving = tape.gradient(
                [*outputs[:-1], loss], inputs[1:],
                output_gradients=[*[tf.cast((1.0 - lam) * p / units, out.dtype)
                                    for p, out in zip(sg_preds, outputs)], tf.ones_like(loss)],
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            scales = [1.0] * num_points
        else:
            arriving = input_grads
            # Without lambda the next block was driven by sg_scale * M (the last by the loss).
            scales = [1.0 if (k == num_points - 1 or lam > 0.0) else self.sg_scale
                      for k in range(num_points)]
        targets = []
        for k in range(num_points):
            target = _float32(arriving[k]) * units / scales[k]
            if self.target_mix > 0.0:
                target = (self.target_mix * _float32(true_grads[k]) * units
                          + (1.0 - self.target_mix) * target)
            targets.append(tf.stop_gradient(target))
        sg_losses = [regression_loss(p, t) for p, t in zip(sg_preds, targets)]
        # d(mean_n ||p_n - t_n||^2)/dp = 2 (p - t) / B; / replicas as gradients are summed.
        module_cotangents = [2.0 * (p - t) / examples for p, t in zip(sg_preds, targets)]
        module_vars = [v for m in self.sg_modules for v in m.trainable_variables]
        sources = [*sg_preds]
        output_grads = [*module_cotangents]
        input_losses = []
        input_vars = []
        if input_preds:
            for pred, real in zip(input_preds, input_targets):
                input_losses.append(regression_loss(pred, real))
                output_grads.append(tf.cast(
                    2.0 * (_float32(pred) - _float32(real)) / examples, pred.dtype))
            sources += input_values
            input_vars = [v for m in self.input_models for v in m.trainable_variables]
        aux_grads = tape.gradient(sources, module_vars + input_vars, output_gradients=output_grads,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        true_layer_grads = []
        if self.diagnostics:
            # The block just below each point, driven by the true gradient there.
            for j in range(num_points):
                true_layer_grads.append(tape.gradient(
                    outputs[j], block_vars[j], output_gradients=true_grads[j],
                    unconnected_gradients=tf.UnconnectedGradients.ZERO))
        del tape

        # Assemble (variable -> gradient) and apply.
        grad_of = {}
        for v, g in zip(flat_vars, layer_grads):
            grad_of[id(v)] = g
        for v, g in zip(module_vars + input_vars, aux_grads):
            grad_of[id(v)] = g
        gated_ids = set()
        gated_groups = []
        for j, opt in zip(gated, self.block_optimizers):
            variables = self._block_variables(j)
            gated_ids.update(id(v) for v in variables)
            gated_groups.append((opt, variables))
        free = [v for v in self.trainable_variables if id(v) not in gated_ids and id(v) in grad_of]
        if gated_groups:
            learning_rate = tf.identity(self.optimizer.learning_rate)  # before this step's apply
        scaled_modules = []
        if self.sg_lr_scale != 1.0:  # module values before this step's update
            scaled_modules = [(v, tf.identity(v.value)) for v in module_vars]
        # Every read of the weights (the real chain included) before any update.
        with tf.control_dependencies([*input_targets, *[grad_of[id(v)] for v in free],
                                      *[old for _, old in scaled_modules]]):
            self.optimizer.apply([tf.identity(grad_of[id(v)]) for v in free], free)
        if gated_groups:
            draws = random_streams.uniform([len(gated_groups)], self.rng_state.value)
            self.rng_state.assign_add(tf.constant([0, 1], tf.int32))
            selected = draws < self.update_prob
            for g, (opt, variables) in enumerate(gated_groups):
                self._apply_gated(opt, variables, [grad_of[id(v)] for v in variables],
                                  selected[g], learning_rate)
        for v, old in scaled_modules:  # sg_lr_scale: the modules' step times s
            v.assign(old + self.sg_lr_scale * (v.value - old))

        # Metrics.
        for tracker, value in zip(self.sg_loss_trackers, sg_losses):
            tracker.update_state(value)
        for tracker, value in zip(self.input_loss_trackers, input_losses):
            tracker.update_state(value)
        if self.diagnostics:
            for k in range(num_points):
                true = _float32(true_grads[k]) * units
                sg = self.sg_scale * true if self.oracle else self.sg_scale * sg_preds[k]
                dot = tf.reduce_sum(sg * true)
                sg_norm = tf.norm(tf.reshape(sg, [-1]))
                true_norm = tf.norm(tf.reshape(true, [-1]))
                self.cosine_trackers[k].update_state(dot / (sg_norm * true_norm + 1e-30))
                self.norm_ratio_trackers[k].update_state(sg_norm / (true_norm + 1e-30))
                used = [grad_of[id(v)] for v in block_vars[k]]
                self.update_cosine_trackers[k].update_state(_flat(used), _flat(true_layer_grads[k]))
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits)

    def _apply_gated(self, opt, variables, grads, selected, learning_rate):
        """Applies `opt` to one gated block only when `selected` (sparse updates)."""
        opt.learning_rate = learning_rate

        if not tf.distribute.has_strategy():
            def update():
                opt.apply(grads, variables)
                return tf.constant(True)

            tf.cond(selected, update, lambda: tf.constant(False))
            return
        # Under a distribution strategy the optimizer's cross-replica merge cannot
        # run inside tf.cond: compute the update, then undo it (step count included).
        state = [*variables, *opt.variables]
        saved = [tf.identity(s.value) for s in state]
        opt.apply(grads, variables)
        for s, old in zip(state, saved):
            s.assign(tf.where(selected, s.value, old))

    def _layer_vars(self, j):
        start, stop = self.block_slices[j]
        return [v for layer in self.net_layers[start:stop] for v in layer.trainable_variables]

    def _block_moving(self, j):
        start, stop = self.block_slices[j]
        return [v for layer in self.net_layers[start:stop] for v in layer.non_trainable_variables]

    def _backprop_step(self, x, y, sample_weight=None):
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight,
                                     training=True)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits, sample_weight=sample_weight)

    def _dni_metrics(self):
        return (self.sg_loss_trackers + self.input_loss_trackers + self.cosine_trackers
                + self.norm_ratio_trackers + self.update_cosine_trackers)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        logits = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=logits, sample_weight=sample_weight,
                                 training=False)
        track_loss(self, loss, x)
        results = self.compute_metrics(x, y, logits, sample_weight=sample_weight)
        own = {m.name for m in self._dni_metrics()}
        return {k: v for k, v in results.items() if k not in own}


def build_classifier(model: str, num_layers: int, input_shape: Tuple[int, ...],
                     num_classes: int, seed: int = 0, width: Optional[int] = None,
                     point: str = "auto", input_norm: Optional[Tuple[float, float]] = None,
                     output_norm: bool = False, init: str = "keras", bn_momentum: float = 0.99,
                     bn_epsilon: float = 1e-3, **kwargs) -> DNIClassifier:
    """A built (not compiled) `DNIClassifier` on the paper's FCN or CNN.

    `model` is "fcn" or "cnn"; `width` is the units per FCN layer (paper: 256)
    or the filters per CNN layer (paper: 128); `point` places the decoupling
    points ("pre_relu" or "post_relu", see `fcn_layers`; "auto" = pre_relu for
    dni, post_relu otherwise: `default_point`); `input_norm`, `output_norm`,
    `init`, `bn_momentum`, `bn_epsilon`: FCN only, see `fcn_layers` (the CNN
    takes only the defaults); `kwargs` go to `DNIClassifier`.
    For the CNN the synthetic gradient modules take the conv form.
    """
    layers = network_layers(model, num_layers, num_classes, seed=seed, width=width,
                            point=default_point(kwargs.get("method", "dni")) if point == "auto"
                            else point, input_norm=input_norm, output_norm=output_norm,
                            init=init, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
    classifier = DNIClassifier(layers, num_classes, seed=seed, name=f"{model}{num_layers}", **kwargs)
    classifier.build((None, *input_shape))
    return classifier


def network_layers(model: str, num_layers: int, num_classes: int, seed: int = 0,
                   width: Optional[int] = None, point: str = "pre_relu",
                   input_norm: Optional[Tuple[float, float]] = None, output_norm: bool = False,
                   init: str = "keras", bn_momentum: float = 0.99, bn_epsilon: float = 1e-3):
    """The layers of the paper's FCN (`fcn_layers`) or CNN (`cnn_layers`) for a classifier.

    The FCN options (`input_norm` ... `bn_epsilon`) are refused for the CNN.
    """
    if model == "fcn":
        return fcn_layers(num_layers, num_classes, width=width or 256, seed=seed, point=point,
                          input_norm=input_norm, output_norm=output_norm, init=init,
                          bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
    if model == "cnn":
        if (input_norm is not None or output_norm or init != "keras" or bn_momentum != 0.99
                or bn_epsilon != 1e-3):
            raise ValueError("input_norm, output_norm, init, bn_momentum and bn_epsilon are "
                             "FCN options; the CNN takes the defaults")
        return cnn_layers(num_layers, num_classes, filters=width or 128, seed=seed, point=point)
    raise ValueError(f"model must be fcn or cnn, got {model!r}")
