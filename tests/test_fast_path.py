"""dni_tf.harness.fast_path: defaults for --jit_compile, --steps_per_execution, --mixed_precision."""

import keras
import pytest

from dni_tf import models
from dni_tf.harness import fast_path
from dni_tf.errors import UsageError


def test_steps_per_execution_divides_every_period():
    assert fast_path.default_steps_per_execution([1000, 500, 100]) == 50
    assert fast_path.default_steps_per_execution([600, 250], cap=50) == 50
    assert fast_path.default_steps_per_execution([600, 90], cap=50) == 30
    assert fast_path.default_steps_per_execution([7, 1000]) == 1
    assert fast_path.default_steps_per_execution([None, 0], cap=20) == 20
    for periods in ([1000, 600, 64], [938, 100], [97]):
        k = fast_path.default_steps_per_execution(periods)
        assert all(p % k == 0 for p in periods)


def test_steps_per_execution_must_divide_the_periods():
    fast_path.validate_steps_per_execution(50, [1000, None, 100])
    with pytest.raises(UsageError, match="--steps_per_execution=30"):
        fast_path.validate_steps_per_execution(30, [1000, 100])
    with pytest.raises(UsageError, match="--steps_per_execution=0"):
        fast_path.validate_steps_per_execution(0, [])


def test_jit_compile_default_falls_back_with_one_line():
    assert fast_path.resolve_jit_compile(None) == (True, None)
    assert fast_path.resolve_jit_compile(False) == (False, None)
    jit, line = fast_path.resolve_jit_compile(None, unsupported_reason="variable lengths")
    assert not jit and "variable lengths" in line
    with pytest.raises(UsageError, match="--jit_compile"):
        fast_path.resolve_jit_compile(True, unsupported_reason="variable lengths")


def test_jit_compile_default_off_for_convolutions_on_cpu():
    if fast_path.has_accelerator():
        pytest.skip("the CPU rule only applies without an accelerator")
    assert fast_path.resolve_jit_compile(None, models.mlp(hidden=(4,)))[0]
    jit, line = fast_path.resolve_jit_compile(None, models.tutorial_cnn())
    assert not jit and "convolutions" in line
    assert fast_path.resolve_jit_compile(True, models.tutorial_cnn()) == (True, None)


def test_mixed_precision_policy():
    try:
        assert fast_path.set_mixed_precision("bfloat16") == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().compute_dtype == "bfloat16"
        with pytest.raises(UsageError, match="--mixed_precision=fp8"):
            fast_path.set_mixed_precision("fp8")
    finally:
        fast_path.set_mixed_precision("none")
    assert keras.mixed_precision.global_policy().name == "float32"
