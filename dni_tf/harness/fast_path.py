"""Choosing the fast execution options: XLA, steps per call, mixed precision.

For the experiment harness and the entry points (`--jit_compile`,
`--steps_per_execution`, `--mixed_precision`); see docs/performance.md for the
measurements behind the defaults. Imports only Keras and TensorFlow.

* `resolve_jit_compile`: the `jit_compile` to pass to `compile()` from the
  flag (None = default), whether the algorithm compiles, and whether XLA pays
  off for the network on this machine; the one line to log when it falls back.
* `default_steps_per_execution`: the largest number of steps per call that
  every evaluation / checkpoint / logging period is a multiple of, so callbacks
  that act "every k steps" still land on their steps.
* `set_mixed_precision`: validates and applies `none|bfloat16|float16`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import keras
import tensorflow as tf

from dni_tf.errors import UsageError

MIXED_PRECISION = {"none": "float32", "bfloat16": "mixed_bfloat16",
                   "float16": "mixed_float16"}
_CONV_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


def has_accelerator() -> bool:
    """Whether TensorFlow sees a GPU (or other non-CPU device)."""
    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def xla_pays_off(network) -> Tuple[bool, str]:
    """(whether XLA is expected to speed up training `network` here, why not).

    On a CPU-only machine XLA's convolutions run about 2x slower than
    TensorFlow's oneDNN kernels (tutorial CNN, docs/performance.md), so
    convolutional networks default to graph mode there; dense and recurrent
    networks, and everything on an accelerator, default to XLA.
    """
    if has_accelerator():
        return True, ""
    layers = network._flatten_layers() if hasattr(network, "_flatten_layers") else []
    if any(isinstance(layer, _CONV_LAYERS) for layer in layers):
        return False, "XLA's CPU convolutions are slower than graph mode's"
    return True, ""


def resolve_jit_compile(requested: Optional[bool], network=None,
                        unsupported_reason: Optional[str] = None) -> Tuple[bool, Optional[str]]:
    """(jit_compile for `compile()`, one line to log or None).

    Args:
      requested: the flag: True / False, or None for the default.
      network: the model being trained (to judge whether XLA pays off); None
        skips that judgement.
      unsupported_reason: why this algorithm/configuration cannot compile with
        XLA (e.g. variable-length sequences), or None when it can.

    Raises UsageError naming `--jit_compile` when XLA is requested explicitly
    but unsupported.
    """
    if unsupported_reason:
        if requested:
            raise UsageError(f"--jit_compile: not supported here: {unsupported_reason}")
        if requested is None:
            return False, f"jit_compile off (fallback to graph mode): {unsupported_reason}"
        return False, None
    if requested is not None:
        return bool(requested), None
    if network is not None:
        pays, why = xla_pays_off(network)
        if not pays:
            return False, f"jit_compile off by default: {why}"
    return True, None


def default_steps_per_execution(periods: Iterable[Optional[int]], cap: int = 50) -> int:
    """Largest k <= cap dividing every positive period (steps between evaluations,
    checkpoints, log lines ...), so each lands at the end of a call; 1 if none.

    Keras calls batch-level callbacks once per call of `steps_per_execution`
    steps, so anything that must happen after exactly step n needs k | n.
    """
    periods = [int(p) for p in periods if p]
    if any(p < 0 for p in periods):
        raise ValueError(f"periods must be positive, got {periods}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    g = 0
    for p in periods:
        g = math.gcd(g, p)
    if g == 0:
        return cap
    return max(d for d in range(1, min(g, cap) + 1) if g % d == 0)


def validate_steps_per_execution(steps_per_execution: int,
                                 periods: Iterable[Optional[int]]) -> None:
    """Raises UsageError naming `--steps_per_execution` unless it divides every period."""
    if steps_per_execution < 1:
        raise UsageError(f"--steps_per_execution={steps_per_execution}: must be >= 1")
    bad = [p for p in periods if p and p % steps_per_execution]
    if bad:
        raise UsageError(f"--steps_per_execution={steps_per_execution}: must divide the "
                         f"evaluation/checkpoint/logging periods {sorted(set(bad))}")


def set_mixed_precision(name: str) -> str:
    """Sets Keras' global dtype policy from `none|bfloat16|float16`; returns the policy name.

    Call before building models. Under `mixed_*` layers compute in 16 bits and
    keep float32 variables; Keras wraps the optimizer in a LossScaleOptimizer
    for float16 (not needed for bfloat16). The algorithms keep their own
    state (accumulators, synthetic-gradient targets, losses) in float32.
    """
    if name not in MIXED_PRECISION:
        raise UsageError(f"--mixed_precision={name}: choose from {', '.join(MIXED_PRECISION)}")
    policy = MIXED_PRECISION[name]
    keras.mixed_precision.set_global_policy(policy)
    return policy
