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
* `FastPathOptions`: the three fields, declared once; every study config
  inherits them (one flag each, checked with the rest of the config) and
  calls `resolve(...)` when it compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from absl import logging

from dni_tf.errors import UsageError
from dni_tf.harness.config import option

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


# Below this, auto's choice says so: the periods, not the step, limit the speed.
SMALL_STEPS_PER_EXECUTION = 5


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


@dataclasses.dataclass
class FastPath:
    """What a study passes to `compile()` (and the lines it logged choosing them)."""

    jit_compile: bool
    steps_per_execution: int
    mixed_precision: str = "none"
    lines: Tuple[str, ...] = ()

    def compile_kwargs(self) -> dict:
        return dict(jit_compile=self.jit_compile, steps_per_execution=self.steps_per_execution)


@dataclasses.dataclass
class FastPathOptions:
    """`--jit_compile`, `--steps_per_execution`, `--mixed_precision`, shared by every study.

    A study config inherits this and may override the hooks below; its
    `validate()` calls `check_fast_path()` so an explicit request that cannot be
    honoured is a UsageError (exit 2) before anything is loaded or trained.
    When it compiles, the study calls `resolve(network)`: the defaults are XLA
    where the algorithm compiles and XLA pays off (`xla_pays_off`), and the
    largest number of steps per call (<= 50) that every evaluation period
    divides; each fallback is logged in one line.
    """

    jit_compile: Optional[bool] = option(
        None, "Compile the train step with XLA: true, false, or auto (on where the algorithm "
        "compiles and XLA pays off; off with one logged line otherwise).", none_text="auto")
    steps_per_execution: int = option(
        0, "Training steps per compiled call (0 = auto: the largest k <= 50 dividing every "
        "evaluation period; an explicit k must divide them).", low=0)
    mixed_precision: str = option(
        "none", "Keras mixed precision: bfloat16 or float16 compute with float32 variables "
        "(synthetic-gradient modules, accumulators and losses stay float32), or none.",
        choices=tuple(MIXED_PRECISION))

    # --- hooks a study overrides ------------------------------------------------
    def fast_path_periods(self) -> Sequence[int]:
        """Step counts that must each be a whole number of calls (evaluation periods)."""
        return ()

    def jit_unsupported(self) -> Optional[str]:
        """Why this configuration cannot compile with XLA, or None."""
        return None

    def steps_per_execution_unsupported(self) -> Optional[str]:
        """Why this configuration must run one step per call, or None."""
        return None

    def mixed_precision_unsupported(self) -> Optional[str]:
        """Why `self.mixed_precision` cannot be used here, or None."""
        if self.mixed_precision == "float16":
            return ("the training step does not scale the loss for float16 (use "
                    "--mixed_precision=bfloat16)")
        return None

    # --- shared logic -------------------------------------------------------------
    def check_fast_path(self, periods: Optional[Sequence[int]] = None) -> None:
        """UsageError (naming the flag) for an explicit request that cannot be honoured."""
        if self.mixed_precision != "none":
            why = self.mixed_precision_unsupported()
            if why:
                raise UsageError(f"--mixed_precision={self.mixed_precision}: not supported "
                                 f"here: {why}")
        if self.jit_compile:
            why = self.jit_unsupported()
            if why:
                raise UsageError(f"--jit_compile=true: not supported here: {why} (use "
                                 "--jit_compile=auto or false)")
        if self.steps_per_execution > 1:
            why = self.steps_per_execution_unsupported()
            if why:
                raise UsageError(f"--steps_per_execution={self.steps_per_execution}: not "
                                 f"supported here: {why} (use 0 = auto, or 1)")
            validate_steps_per_execution(
                self.steps_per_execution,
                self.fast_path_periods() if periods is None else periods)

    def apply_mixed_precision(self) -> str:
        """Sets Keras' global dtype policy from `mixed_precision` (call before building
        the model; `none` restores float32). Returns the policy name."""
        if self.mixed_precision == "float16" and not tf.config.list_physical_devices("GPU"):
            # Measured: the tutorial CNN ran 0.1 steps/s under float16 against 3.8 in float32.
            logging.warning("--mixed_precision=float16 on a CPU: its float16 kernels are "
                            "emulated and far slower than float32 (bfloat16 is the CPU choice)")
        return set_mixed_precision(self.mixed_precision)

    def resolve(self, network=None, periods: Optional[Sequence[int]] = None,
                log: bool = True) -> FastPath:
        """The options to compile with: auto values resolved, each fallback logged
        once per process (call `apply_mixed_precision()` before building the model).

        `network`: the (inner) network, to judge whether XLA pays off here;
        `periods`: the evaluation periods when they are only known now (e.g.
        from the data), else `fast_path_periods()`.
        """
        periods = list(self.fast_path_periods() if periods is None else periods)
        self.check_fast_path(periods)
        lines: List[str] = []
        requested = self.jit_compile
        distributed = under_distribution()
        if distributed and len(tf.distribute.get_strategy().extended.worker_devices) > 1:
            # Keras' compiled step reads every replica's variables from one XLA
            # cluster, which XLA refuses ("Trying to access resource ... located in
            # device CPU:1 from device CPU:0"; TensorFlow's known XLA issue
            # "tf.Variable on a different device"), for a plain Keras model too.
            if requested:
                raise UsageError("--jit_compile=true: not supported with a distribution "
                                 "strategy over several devices of one machine (XLA cannot "
                                 "read one replica's variables from another device); use "
                                 "--jit_compile=auto or false")
            requested = False
            if self.jit_compile is None:
                lines.append("jit_compile off under a distribution strategy over several "
                             "devices (XLA cannot read one replica's variables from another)")
        elif requested is None and distributed:
            # One device per worker: untested with XLA (auto leaves it off); an
            # explicit --jit_compile=true is honoured.
            requested = False
            lines.append("jit_compile off by default under a distribution strategy "
                         "(--jit_compile=true to try XLA there)")
        jit, line = resolve_jit_compile(requested, network, self.jit_unsupported())
        if line:
            lines.append(line)
        spe = self.steps_per_execution
        if distributed:
            # Several steps per call fail under MultiWorkerMirroredStrategy (Keras'
            # step loop, TensorFlow 2.21); one step per call is what was tested.
            if spe > 1:
                raise UsageError(f"--steps_per_execution={spe}: not supported with a "
                                 "distribution strategy (use 0 = auto, or 1)")
            if not spe:
                lines.append("steps_per_execution 1 (one step per call) under a "
                             "distribution strategy")
            spe = 1
        if not spe:
            why = self.steps_per_execution_unsupported()
            spe = 1 if why else default_steps_per_execution(periods)
            if why:
                lines.append(f"steps_per_execution 1 (one step per call): {why}")
            elif spe < SMALL_STEPS_PER_EXECUTION:
                lines.append(
                    f"steps_per_execution {spe}: no k from {spe + 1} to 50 divides the "
                    f"evaluation periods {sorted({int(p) for p in periods if p})} (--eval_every "
                    f"and --steps with a larger common divisor run more steps per call)")
        if log:
            log_once(lines)
        return FastPath(bool(jit), int(spe), self.mixed_precision, tuple(lines))


def under_distribution() -> bool:
    """Whether the current tf.distribute strategy has several replicas or workers."""
    strategy = tf.distribute.get_strategy()
    return strategy.num_replicas_in_sync > 1 or isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy)


_LOGGED = set()


def log_once(lines: Iterable[str]) -> None:
    """Logs each line the first time this process sees it (a sweep logs a fallback once)."""
    for line in lines:
        if line not in _LOGGED:
            _LOGGED.add(line)
            logging.info("%s", line)


def evaluation_periods(steps: int, eval_every: int) -> Tuple[int, int]:
    """(eval_every, length of the last period) of a run of `steps` (harness schedule):
    the periods that steps per call must divide."""
    return (eval_every, steps % eval_every or eval_every)
