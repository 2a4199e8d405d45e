"""Image classifiers used by the studies; all output logits."""

from __future__ import annotations

from typing import Sequence, Tuple

import keras


def tutorial_cnn(input_shape: Tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
                 dropout_rate: float = 0.5, seed: int = 0) -> keras.Sequential:
    """The TensorFlow "Deep MNIST for experts" CNN (used by the gradient-dropping write-up).

    5x5 conv 32 + ReLU, 2x2 max pool, 5x5 conv 64 + ReLU, 2x2 max pool,
    dense 1024 + ReLU, dropout 0.5, dense `num_classes` (logits). 'same' padding,
    as in the tutorial. Input [B, 28, 28, 1] in [0, 1]; output [B, num_classes].
    Eight trainable variables (a kernel and a bias per layer).
    """
    # One seed per layer: an initialiser with one seed draws the same numbers each call.
    init = lambda i: keras.initializers.TruncatedNormal(stddev=0.1, seed=seed + i)  # noqa: E731
    bias = keras.initializers.Constant(0.1)
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu",
                            kernel_initializer=init(0), bias_initializer=bias, name="conv1"),
        keras.layers.MaxPooling2D(2, name="pool1"),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu",
                            kernel_initializer=init(1), bias_initializer=bias, name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(1024, activation="relu", kernel_initializer=init(2),
                           bias_initializer=bias, name="fc1"),
        keras.layers.Dropout(dropout_rate, seed=seed, name="dropout"),
        keras.layers.Dense(num_classes, kernel_initializer=init(3), bias_initializer=bias,
                           name="logits"),
    ], name="tutorial_cnn")


def mlp(input_shape: Tuple[int, ...] = (28, 28, 1), hidden: Sequence[int] = (1000, 1000, 500, 200),
        num_classes: int = 10, use_bias: bool = True, seed: int = 0,
        name: str = "mlp") -> keras.Sequential:
    """Flatten, then ReLU dense layers of sizes `hidden`, then logits.

    Default sizes are the targeted-dropout study's 784-1000-1000-500-200-10 network. Dense layers
    are named `dense_0`, `dense_1`, ... and `logits`.
    """
    layers = [keras.Input(input_shape), keras.layers.Flatten(name="flatten")]
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(
            width, activation="relu", use_bias=use_bias, name=f"dense_{i}",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i)))
    layers.append(keras.layers.Dense(
        num_classes, use_bias=use_bias, name="logits",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + len(hidden))))
    return keras.Sequential(layers, name=name)
