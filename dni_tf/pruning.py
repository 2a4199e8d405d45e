"""Magnitude pruning of a trained dense network, with no retraining.

Two kinds, applied to every prunable dense kernel (all dense layers except the
logits layer unless `include_logits=True`, as in the for.ai pruning study the
seed follows):

* "weight": in each output column of a kernel [n_in, n_out], the
  `floor(fraction * n_in)` weights with the smallest |w| are set to 0.
* "unit": the `floor(fraction * n_out)` units whose kernel columns have the
  smallest L2 norm are removed: their kernel column is set to 0 and so is their
  bias, so the pruned unit's pre-activation is exactly 0 (a ReLU unit then
  outputs 0 and its outgoing weights no longer matter).

Ties are broken by position (stable sort), so exactly the stated count is
removed. Networks without biases (`use_bias=False`) are supported. `prune_model`
works on a copy; the trained model is left untouched. The report gives the exact
sparsity achieved (zeros counted after pruning, so weights that were already 0
are counted once).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import keras
import numpy as np

KINDS = ("weight", "unit")


def prune_count(fraction: float, n: int) -> int:
    """Elements removed out of `n` at `fraction` in [0, 1]: floor(fraction * n).

    A tiny tolerance makes e.g. 0.29 * 100 count 29, not 28.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(n, int(np.floor(fraction * n + 1e-9)))


def weight_prune_mask(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean keep-mask [n_in, n_out]: False for the smallest |w| of each column."""
    kernel = np.asarray(kernel)
    k = prune_count(fraction, kernel.shape[0])
    keep = np.ones(kernel.shape, dtype=bool)
    if k:
        order = np.argsort(np.abs(kernel), axis=0, kind="stable")[:k]  # [k, n_out]
        np.put_along_axis(keep, order, False, axis=0)
    return keep


def unit_prune_mask(kernel: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean keep-mask [n_out]: False for the units with the smallest column L2 norm."""
    kernel = np.asarray(kernel)
    k = prune_count(fraction, kernel.shape[1])
    keep = np.ones(kernel.shape[1], dtype=bool)
    if k:
        keep[np.argsort(np.linalg.norm(kernel, axis=0), kind="stable")[:k]] = False
    return keep


def prune_kernel(kernel: np.ndarray, bias: Optional[np.ndarray], fraction: float,
                 kind: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Pruned copies of (kernel [n_in, n_out], bias [n_out] or None)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    kernel = np.array(kernel, copy=True)
    bias = None if bias is None else np.array(bias, copy=True)
    if kind == "weight":
        kernel[~weight_prune_mask(kernel, fraction)] = 0
    else:
        keep = unit_prune_mask(kernel, fraction)
        kernel[:, ~keep] = 0
        if bias is not None:
            bias[~keep] = 0
    return kernel, bias


@dataclasses.dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]
    removed: int       # weights (kind "weight") or units (kind "unit") removed
    zeros: int         # kernel entries equal to 0 after pruning
    size: int          # kernel entries


@dataclasses.dataclass
class PruneReport:
    """What a pruning pass did.

    `sparsity` is the fraction of zero entries over the pruned kernels (biases
    excluded); `model_sparsity` the same over every dense kernel, logits included.
    """

    kind: str
    fraction: float
    layers: List[LayerReport]
    sparsity: float
    model_sparsity: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def dense_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """Layers with a 2-D `kernel` variable (Dense, TargetedDense), in model order."""
    return [layer for layer in model.layers
            if getattr(layer, "kernel", None) is not None and len(layer.kernel.shape) == 2]


def prunable_layers(model: keras.Model, include_logits: bool = False) -> List[keras.layers.Layer]:
    """Dense layers to prune: all but the last (the logits) unless include_logits."""
    layers = dense_layers(model)
    return layers if include_logits else layers[:-1]


def clone(model: keras.Model) -> keras.Model:
    """A copy of `model` with the same weights (all variables, incl. RNG state)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def prune_model(model: keras.Model, fraction: float, kind: str,
                include_logits: bool = False) -> Tuple[keras.Model, PruneReport]:
    """Returns (pruned copy of `model`, report); `model` itself is not changed.

    Args:
      model: a built model whose dense layers hold `kernel` [n_in, n_out] and
        optionally `bias` [n_out] (None when use_bias=False).
      fraction: fraction in [0, 1] to remove: of each column's weights ("weight")
        or of each layer's units ("unit").
      kind: "weight" or "unit".
      include_logits: also prune the last dense layer (default: no).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    prune_count(fraction, 1)  # validates the range
    copy = clone(model)
    targets = {id(layer) for layer in prunable_layers(copy, include_logits)}
    reports, pruned_zeros, pruned_size, all_zeros, all_size = [], 0, 0, 0, 0
    for layer in dense_layers(copy):
        kernel = np.asarray(layer.kernel.numpy())
        if id(layer) in targets:
            bias = None if getattr(layer, "bias", None) is None else layer.bias.numpy()
            kernel, bias = prune_kernel(kernel, bias, fraction, kind)
            layer.kernel.assign(kernel)
            if bias is not None:
                layer.bias.assign(bias)
            n = kernel.shape[0] if kind == "weight" else kernel.shape[1]
            removed = prune_count(fraction, n) * (kernel.shape[1] if kind == "weight" else 1)
            zeros = int(np.count_nonzero(kernel == 0))
            reports.append(LayerReport(layer.name, tuple(kernel.shape), removed, zeros, kernel.size))
            pruned_zeros += zeros
            pruned_size += kernel.size
        all_zeros += int(np.count_nonzero(kernel == 0))
        all_size += kernel.size
    report = PruneReport(kind, float(fraction), reports,
                         sparsity=pruned_zeros / max(pruned_size, 1),
                         model_sparsity=all_zeros / max(all_size, 1))
    return copy, report


def accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of a logits model on (images [N, ...], labels [N]), training=False.

    Runs eagerly in batches: each pruned copy is a new model, and `predict` would
    trace a new graph for every one of them.
    """
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size], training=False)
        correct += int(np.sum(np.argmax(np.asarray(logits), axis=-1)
                              == np.asarray(labels[start:start + batch_size])))
    return correct / max(len(labels), 1)
