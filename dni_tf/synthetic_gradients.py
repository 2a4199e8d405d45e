"""Synthetic gradient modules M(h, c) (Jaderberg et al. 2016, arXiv 1608.05343).

A synthetic gradient module sits at a decoupling point of a network. It reads
the activation `h` there (and, for cDNI, a context `c` such as the one-hot
label) and predicts the gradient of the loss with respect to `h`, so the layers
below can be updated without waiting for the rest of the network to run forward
and backward.

    module = SyntheticGradient(hidden_layers=1, context_dim=10)   # cDNI module
    delta_hat = module(h, context=one_hot_labels, training=True)   # shape of h
    loss = regression_loss(delta_hat, tf.stop_gradient(target))    # train M
    # update the layers that produced h from the (constant) synthetic gradient:
    surrogate = surrogate_objective(h, delta_hat, batch_size)      # grad = dL/dtheta

Conventions the caller must know:

* Units. The module predicts whatever its caller regresses it onto. The
  recurrent DNI and `surrogate_objective` use the *per-example* gradient
  `d loss_n / d h_n` (`B * dL/dh` for a batch-mean loss `L`; it does not shrink
  with the batch size; `surrogate_objective` divides by `B` again).
  `dni_tf.dni_feedforward` offers both (`gradient_units`): under Adam the
  module's weight steps do not depend on the size of the targets, so B-times
  larger targets are tracked about B times more slowly.
* The output layer is initialised to zero: a fresh module predicts exactly zero,
  so the first update of the layers below it is zero (a pitfall of many public
  implementations that use random output weights).
* The target is a constant: always pass it through `tf.stop_gradient` (done in
  `regression_loss` as well, to be safe); otherwise the regression loss would
  also push the network that produced the target.
* The module itself never backpropagates into `h` or `c` (both are read through
  `stop_gradient`), so training it cannot change the layers below.

Forms (chosen from the rank of `h` with `form="auto"`):

* dense: `h` is [B, D]. Hidden layers are Dense(units, no bias) -> batch norm ->
  ReLU; the output is Dense(D). The context [B, K] is concatenated to `h`.
* conv: `h` is [B, H, W, C]. Hidden layers are Conv2D(filters, kernel_size,
  'same', no bias) -> batch norm -> ReLU; the output is Conv2D(C, kernel_size,
  'same'). The context [B, K] is tiled over H x W and concatenated as channels.

`hidden_layers=0` is a linear (affine) model. The paper's defaults are 1024
units for 256-wide FCN layers and 128 5x5 filters for CNN layers.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

FORMS = ("auto", "dense", "conv")


class SyntheticGradient(keras.layers.Layer):
    """The synthetic gradient model M(h, c): predicts dL/dh, same shape as `h`.

    Args:
      hidden_layers: 0, 1 or 2 hidden layers (linear/conv, batch norm, ReLU).
      units: hidden width; default 1024 (dense form) or 128 filters (conv form).
      kernel_size: conv form kernel size (paper: 5).
      form: "dense", "conv", or "auto" (dense for rank-2 `h`, conv for rank-4).
      context_dim: size K of the context vector for cDNI (e.g. the number of
        classes, context = one-hot label [B, K]); None for unconditioned DNI.
        When set, `call` requires `context`.
      seed: seed for the hidden layers' initialisers (the output layer is zero).

    Call:
      `module(h, context=None, training=False) -> delta_hat` with
      `delta_hat.shape == h.shape` and dtype float32. `training` selects batch
      statistics in the hidden batch-norm layers.
    """

    def __init__(self, hidden_layers: int = 0, units: Optional[int] = None,
                 kernel_size: int = 5, form: str = "auto",
                 context_dim: Optional[int] = None, seed: int = 0, **kwargs):
        # float32 whatever the global (mixed) policy: predictions and their
        # regression targets are gradients, whose small values bfloat16's 8-bit
        # mantissa would round away.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"hidden_layers must be 0, 1 or 2, got {hidden_layers}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if context_dim is not None and context_dim <= 0:
            raise ValueError(f"context_dim must be positive or None, got {context_dim}")
        self.hidden_layers = hidden_layers
        self.units = units
        self.kernel_size = kernel_size
        self.form = form
        self.context_dim = context_dim
        self.seed = seed
        self.stack = []  # public name: Keras saving skips attributes starting with '_'
        self._resolved_form = None

    def build(self, input_shape):
        rank = len(input_shape)
        form = self.form
        if form == "auto":
            form = {2: "dense", 4: "conv"}.get(rank)
            if form is None:
                raise ValueError(f"cannot pick a form for h of shape {tuple(input_shape)}: "
                                 "need [B, D] (dense) or [B, H, W, C] (conv)")
        if (form == "dense" and rank != 2) or (form == "conv" and rank != 4):
            raise ValueError(f"{form} form needs h of rank {2 if form == 'dense' else 4}, "
                             f"got shape {tuple(input_shape)}")
        self._resolved_form = form
        out_dim = int(input_shape[-1])
        in_dim = out_dim + (self.context_dim or 0)
        conv = form == "conv"
        width = self.units or (128 if conv else 1024)
        shape = list(input_shape)
        shape[-1] = in_dim
        layers = []
        for i in range(self.hidden_layers):
            init = keras.initializers.HeNormal(seed=self.seed + i)
            if conv:
                layers.append(keras.layers.Conv2D(width, self.kernel_size, padding="same",
                                                  use_bias=False, kernel_initializer=init,
                                                  name=f"hidden_{i}", dtype=self.dtype_policy))
            else:
                layers.append(keras.layers.Dense(width, use_bias=False,
                                                 kernel_initializer=init, name=f"hidden_{i}",
                                                 dtype=self.dtype_policy))
            layers.append(keras.layers.BatchNormalization(name=f"bn_{i}", dtype=self.dtype_policy))
            layers.append(keras.layers.ReLU(name=f"relu_{i}", dtype=self.dtype_policy))
        if conv:
            layers.append(keras.layers.Conv2D(out_dim, self.kernel_size, padding="same",
                                              kernel_initializer="zeros", bias_initializer="zeros",
                                              name="output", dtype=self.dtype_policy))
        else:
            layers.append(keras.layers.Dense(out_dim, kernel_initializer="zeros",
                                             bias_initializer="zeros", name="output",
                                             dtype=self.dtype_policy))
        for layer in layers:
            layer.build(tuple(shape))
            shape = layer.compute_output_shape(tuple(shape))
        self.stack = layers

    def call(self, h, context=None, training=False):
        h = tf.stop_gradient(tf.cast(h, tf.float32))
        if self.context_dim is not None:
            if context is None:
                raise ValueError("this module was built with context_dim; pass context (cDNI)")
            context = tf.stop_gradient(tf.cast(context, h.dtype))
            if self._resolved_form == "conv":
                spatial = tf.shape(h)[1:3]
                context = context[:, None, None, :] * tf.ones(
                    tf.concat([[1], spatial, [1]], axis=0), h.dtype)
            h = tf.concat([h, context], axis=-1)
        x = h
        for layer in self.stack:
            if isinstance(layer, keras.layers.BatchNormalization):
                x = layer(x, training=training)
            else:
                x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(hidden_layers=self.hidden_layers, units=self.units,
                      kernel_size=self.kernel_size, form=self.form,
                      context_dim=self.context_dim, seed=self.seed)
        return config


def regression_loss(prediction, target):
    """L2 regression loss of a synthetic gradient onto its (constant) target.

    `mean_n ||prediction_n - target_n||^2`: the squared error summed over every
    non-batch axis and averaged over the batch axis 0. `target` is wrapped in
    `stop_gradient`. Returns a float32 scalar.
    """
    diff = tf.cast(prediction, tf.float32) - tf.stop_gradient(tf.cast(target, tf.float32))
    per_example = tf.reduce_sum(tf.reshape(tf.square(diff), [tf.shape(diff)[0], -1]), axis=1)
    return tf.reduce_mean(per_example)


def surrogate_objective(h, synthetic_gradient, batch_size):
    """A scalar whose gradient w.r.t. whatever produced `h` is the SG's backprop.

    `sum(h * stop_gradient(synthetic_gradient)) / batch_size`: differentiating it
    with respect to the parameters upstream of `h` gives the update those
    parameters would get if `synthetic_gradient` (per-example units) were the
    true per-example gradient of a batch-mean loss at `h`.
    """
    sg = tf.stop_gradient(tf.cast(synthetic_gradient, h.dtype))
    return tf.reduce_sum(h * sg) / tf.cast(batch_size, h.dtype)
