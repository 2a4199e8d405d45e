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
   `c` = one-hot label for cDNI, none for DNI) predicts the per-example gradient
   at point `k`. Each block below a point is updated from `sg_scale * M_k(h_k)`
   (or from the true gradient in `oracle` mode); the last block from the true
   loss. One backward pass gives all these updates.
3. Module targets, all constants (`stop_gradient`): the same backward pass also
   gives, at each block's input, the next module's synthetic gradient (or, for
   the last block, the loss gradient) backpropagated through that block: the
   bootstrapped target. With `lambda_mix = lam > 0` the target is
   `lam * true gradient + (1 - lam) * bootstrapped`, where the true gradient
   needs one extra backward chain (BP(lambda)). Each module is trained by L2
   regression (weight 1) onto its target.
4. Sparse updates (`update_prob = p < 1`): each decoupled block, together with
   the module at its output, is updated with probability p per step; an
   unselected block's
   trainable weights and its optimizer state are left unchanged that step
   (batch-norm moving statistics still follow the forward pass). The last block
   is always updated. The draws are stateless random numbers keyed by
   `(seed, step)` held in the model weight `rng_state`: deterministic for a
   seed and restored by checkpoints (a `SeedGenerator`'s state is not saved by
   `save_weights` in Keras 3.15).

All of this is built once at trace time: the per-layer Python loops only build
the graph; a step has no host round trips. Every module, input model, extra
optimizer and the RNG state is created in `build()`/`compile()`, so
`save_weights`/`load_weights` (and `dni_tf.training`'s resume) cover them.

Units: synthetic gradients are per-example gradients (`B * dL/dh` for a batch
mean loss `L` over `B` examples); see `dni_tf.synthetic_gradients`.

Metrics returned by `train_step` (and so logged to history.csv/TensorBoard):
`loss`, `accuracy`, per point k `sg_loss_k` (the module's regression loss) and,
with complete unlock, `input_loss_k`; with `diagnostics=True` also
`sg_cosine_k` and `sg_norm_ratio_k` (cosine similarity and norm ratio
||sg|| / ||true|| between the (scaled) synthetic and the true gradient over the
batch; costs one extra backward chain). `test_step` returns only `loss` and the
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
from dni_tf.core import track_loss

METHODS = ("backprop", "dni", "cdni")
UNLOCKS = ("update", "complete")


# --------------------------------------------------------------------------- models
def fcn_layers(num_layers: int, num_classes: int = 10, width: int = 256,
               seed: int = 0) -> List[keras.Sequential]:
    """The paper's FCN as a list of `num_layers` layers (each a keras.Sequential).

    Layers 1 .. n-1: (flatten for the first) Dense(width, no bias), batch norm,
    ReLU. Layer n: Dense(num_classes) logits. Input: images [B, H, W, C] in [0, 1].
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers = []
    for i in range(num_layers - 1):
        parts = [keras.layers.Flatten()] if i == 0 else []
        parts += [keras.layers.Dense(width, use_bias=False,
                                     kernel_initializer=keras.initializers.HeNormal(seed=seed + i)),
                  keras.layers.BatchNormalization(),
                  keras.layers.ReLU()]
        layers.append(keras.Sequential(parts, name=f"layer_{i + 1}"))
    last = [keras.layers.Flatten()] if num_layers == 1 else []
    last.append(keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + num_layers)))
    layers.append(keras.Sequential(last, name=f"layer_{num_layers}"))
    return layers


def cnn_layers(num_layers: int = 3, num_classes: int = 10, filters: int = 128,
               kernel_size: int = 5, seed: int = 0) -> List[keras.Sequential]:
    """The paper's MNIST/CIFAR-10 CNN as a list of `num_layers` layers.

    Layers 1 .. n-1: Conv2D(filters, kernel_size, 'same', no bias), batch norm,
    ReLU, then 3x3 stride-2 pooling ('same'): max pooling after layer 1,
    average pooling after later layers. Layer n: flatten + Dense(num_classes).
    A 28x28 input gives feature maps of 14x14 and 7x7 at the first two points.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers = []
    for i in range(num_layers - 1):
        pool = (keras.layers.MaxPooling2D(3, 2, padding="same") if i == 0
                else keras.layers.AveragePooling2D(3, 2, padding="same"))
        layers.append(keras.Sequential([
            keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False,
                                kernel_initializer=keras.initializers.HeNormal(seed=seed + i)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            pool,
        ], name=f"layer_{i + 1}"))
    layers.append(keras.Sequential([
        keras.layers.Flatten(),
        keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed + num_layers)),
    ], name=f"layer_{num_layers}"))
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
                                    kernel_initializer=init) if self.conv
                else keras.layers.Dense(width, use_bias=False, kernel_initializer=init))
            self.hidden_norms.append(keras.layers.BatchNormalization())
        init = keras.initializers.GlorotUniform(seed=seed + hidden_layers)
        self.output_layer = (keras.layers.Conv2D(self.target_shape[-1], kernel_size, padding="same",
                                            kernel_initializer=init) if self.conv
                        else keras.layers.Dense(self.target_shape[0], kernel_initializer=init))

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


# --------------------------------------------------------------------------- model
class DNIClassifier(keras.Model):
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
      sg_scale: synthetic gradients are multiplied by this (> 0) before they
        update the layers; modules still predict unscaled gradients.
      lambda_mix: BP(lambda) weight of the true gradient in the module targets
        (0 = pure bootstrapping, 1 = regress onto the true gradient).
      update_prob: probability (0, 1] that a decoupled block (and the module at
        its output) is updated in a step. Needs dni/cdni when < 1.
      unlock: "update" or "complete" (synthetic inputs too; needs dni/cdni).
      input_hidden_layers, input_units: synthetic input model architecture.
      oracle: use the true gradient in place of the synthetic gradient when
        updating layers (modules are still trained); a testing aid that makes
        the layer updates equal backprop's.
      diagnostics: also compute true gradients and log `sg_cosine_k`,
        `sg_norm_ratio_k` (one extra backward chain per step).
      seed: seed for the modules' initialisers and the sparse-update draws.

    Compile with a loss on integer labels and logits, e.g.
    `SparseCategoricalCrossentropy(from_logits=True)`; sample weights are not
    supported by `train_step`. With `update_prob < 1` the compiled optimizer is
    cloned (from its config) once per decoupled block, so each block has its
    own optimizer state that can be left untouched when the block is skipped.
    """

    def __init__(self, layers: Sequence[keras.layers.Layer], num_classes: int,
                 method: str = "dni", decouple: Optional[Sequence[int]] = None,
                 sg_hidden_layers: int = 0, sg_units: Optional[int] = None,
                 sg_kernel_size: int = 5, sg_scale: float = 1.0, lambda_mix: float = 0.0,
                 update_prob: float = 1.0, unlock: str = "update",
                 input_hidden_layers: int = 1, input_units: Optional[int] = None,
                 oracle: bool = False, diagnostics: bool = False, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        n = len(layers)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if unlock not in UNLOCKS:
            raise ValueError(f"unlock must be one of {UNLOCKS}, got {unlock!r}")
        if not 0.0 < update_prob <= 1.0:
            raise ValueError(f"update_prob must be in (0, 1], got {update_prob}")
        if not 0.0 <= lambda_mix <= 1.0:
            raise ValueError(f"lambda_mix must be in [0, 1], got {lambda_mix}")
        if not sg_scale > 0.0:
            raise ValueError(f"sg_scale must be > 0, got {sg_scale}")
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
        self.sg_scale = float(sg_scale)
        self.lambda_mix = float(lambda_mix)
        self.update_prob = float(update_prob)
        self.unlock = unlock
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
        if self.rng_state is None:
            # A model weight, unlike a SeedGenerator's state, so checkpoints restore it.
            self.rng_state = self.add_weight(
                name="sparse_update_rng", shape=(2,), dtype="int32", trainable=False,
                initializer=keras.initializers.Constant([self._seed + 7, 0]))
        self.built = True
        self._build_optimizers()

    def compile(self, *args, **kwargs):
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
        """Builds the compiled optimizer (and per-block clones for sparse updates)."""
        if getattr(self, "optimizer", None) is None:
            return
        gated = self._gated_blocks()
        if gated and not self.block_optimizers:
            config = self.optimizer.get_config()
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
        x, y = data[0], data[1]
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        if not self.points:
            return self._backprop_step(x, y)
        num_points = len(self.points)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        # Per-example units <-> gradients of the (replica-scaled) batch-mean loss.
        units = batch * float(replicas)
        context = tf.one_hot(y, self.num_classes) if self.method == "cdni" else None

        with tf.GradientTape(persistent=True) as tape:
            inputs, outputs, input_preds = [], [], []
            h = x
            for j in range(num_points + 1):
                if j > 0:
                    real = tf.stop_gradient(h)
                    if self.unlock == "complete":
                        pred = self.input_models[j - 1](x, training=True)
                        input_preds.append((pred, real))
                        h = tf.stop_gradient(pred)
                    else:
                        h = real
                    tape.watch(h)
                inputs.append(h)
                h = self._run_block(j, h, training=True)
                outputs.append(h)
            logits = outputs[-1]
            loss = self.compute_loss(x=x, y=y, y_pred=logits, training=True)
            sg_preds = [module(tf.stop_gradient(out), context=context, training=True)
                        for module, out in zip(self.sg_modules, outputs[:-1])]
            input_values = [pred for pred, _ in input_preds]

        need_true = self.oracle or self.diagnostics or self.lambda_mix > 0.0
        true_grads = [None] * num_points
        if need_true:
            # True gradient chain (loss units): one extra backward pass, inputs only.
            grad = tape.gradient(loss, inputs[-1])
            for j in range(num_points - 1, -1, -1):
                true_grads[j] = grad
                if j > 0:
                    grad = tape.gradient(outputs[j], inputs[j], output_gradients=grad)
        if self.oracle:
            cotangents = [self.sg_scale * g for g in true_grads]
        else:
            cotangents = [self.sg_scale * p / units for p in sg_preds]

        gated = self._gated_blocks()
        block_vars = [self._layer_vars(j) for j in range(num_points + 1)]
        flat_vars = [v for vs in block_vars for v in vs]
        grads = tape.gradient(
            [*outputs[:-1], loss], flat_vars + inputs[1:],
            output_gradients=[*cotangents, tf.ones_like(loss)],
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        layer_grads, input_grads = grads[:len(flat_vars)], grads[len(flat_vars):]

        # Module targets (per-example units): bootstrapped, optionally mixed.
        targets = []
        for k in range(num_points):
            scale = 1.0 if k == num_points - 1 else self.sg_scale
            # The next block was driven by scale * M (or by the loss for the last block).
            target = input_grads[k] * units / scale
            if self.lambda_mix > 0.0:
                target = self.lambda_mix * true_grads[k] * units + (1.0 - self.lambda_mix) * target
            targets.append(tf.stop_gradient(target))
        sg_losses = [regression_loss(p, t) for p, t in zip(sg_preds, targets)]
        # d(mean_n ||p_n - t_n||^2)/dp = 2 (p - t) / B; / replicas as gradients are summed.
        module_cotangents = [2.0 * (p - t) / units for p, t in zip(sg_preds, targets)]
        module_vars = [v for m in self.sg_modules for v in m.trainable_variables]
        sources = [*sg_preds]
        output_grads = [*module_cotangents]
        input_losses = []
        input_vars = []
        if input_preds:
            for pred, real in input_preds:
                input_losses.append(regression_loss(pred, real))
                output_grads.append(2.0 * (pred - real) / units)
            sources += input_values
            input_vars = [v for m in self.input_models for v in m.trainable_variables]
        aux_grads = tape.gradient(sources, module_vars + input_vars, output_gradients=output_grads,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
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
        self.optimizer.apply([grad_of[id(v)] for v in free], free)
        if gated_groups:
            draws = random_streams.uniform([len(gated_groups)], self.rng_state.value)
            self.rng_state.assign_add(tf.constant([0, 1], tf.int32))
            selected = draws < self.update_prob
            for g, (opt, variables) in enumerate(gated_groups):
                state = [*variables, *[s for s in opt.variables if s is not opt.iterations]]
                saved = [tf.identity(s.value) for s in state]
                opt.apply([grad_of[id(v)] for v in variables], variables)
                for s, old in zip(state, saved):
                    s.assign(tf.where(selected[g], s.value, old))

        # Metrics.
        for tracker, value in zip(self.sg_loss_trackers, sg_losses):
            tracker.update_state(value)
        for tracker, value in zip(self.input_loss_trackers, input_losses):
            tracker.update_state(value)
        if self.diagnostics:
            for k in range(num_points):
                sg = (self.sg_scale * true_grads[k] * units if self.oracle
                      else self.sg_scale * sg_preds[k])
                true = true_grads[k] * units
                dot = tf.reduce_sum(sg * true)
                sg_norm = tf.norm(tf.reshape(sg, [-1]))
                true_norm = tf.norm(tf.reshape(true, [-1]))
                self.cosine_trackers[k].update_state(dot / (sg_norm * true_norm + 1e-12))
                self.norm_ratio_trackers[k].update_state(sg_norm / (true_norm + 1e-12))
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits)

    def _layer_vars(self, j):
        start, stop = self.block_slices[j]
        return [v for layer in self.net_layers[start:stop] for v in layer.trainable_variables]

    def _backprop_step(self, x, y):
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=logits, training=True)
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(loss, variables), variables)
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits)

    def _dni_metrics(self):
        return (self.sg_loss_trackers + self.input_loss_trackers + self.cosine_trackers
                + self.norm_ratio_trackers)

    def test_step(self, data):
        x, y = data[0], data[1]
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        logits = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=logits, training=False)
        track_loss(self, loss, x)
        results = self.compute_metrics(x, y, logits)
        own = {m.name for m in self._dni_metrics()}
        return {k: v for k, v in results.items() if k not in own}


def build_classifier(model: str, num_layers: int, input_shape: Tuple[int, ...],
                     num_classes: int, seed: int = 0, width: Optional[int] = None,
                     **kwargs) -> DNIClassifier:
    """A built (not compiled) `DNIClassifier` on the paper's FCN or CNN.

    `model` is "fcn" or "cnn"; `width` is the units per FCN layer (paper: 256)
    or the filters per CNN layer (paper: 128); `kwargs` go to `DNIClassifier`.
    For the CNN the synthetic gradient modules take the conv form.
    """
    if model == "fcn":
        layers = fcn_layers(num_layers, num_classes, width=width or 256, seed=seed)
    elif model == "cnn":
        layers = cnn_layers(num_layers, num_classes, filters=width or 128, seed=seed)
    else:
        raise ValueError(f"model must be fcn or cnn, got {model!r}")
    classifier = DNIClassifier(layers, num_classes, seed=seed, name=f"{model}{num_layers}", **kwargs)
    classifier.build((None, *input_shape))
    return classifier
