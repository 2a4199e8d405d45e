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


# ---------------------------------------------------------------- in the studies
import logging  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dni_tf.data import make_dataset  # noqa: E402
from dni_tf.harness.training import train_and_evaluate  # noqa: E402


def _dropping_model(steps_per_execution):
    """GradientDropping (its masks come from a random stream a resume must restore)
    on a tiny MLP, graph mode."""
    from dni_tf.gradient_dropping import GradientDropping

    keras.utils.set_random_seed(0)
    model = GradientDropping(models.mlp((5,), hidden=(8,), num_classes=3, seed=0),
                             keep_prob=0.5, seed=3, fuse_update=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False, steps_per_execution=steps_per_execution)
    return model


class _Calls(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(batch + 1)


def _fit(workdir, steps, steps_per_execution=2, eval_every=4, calls=None):
    rng = np.random.RandomState(0)
    x, y = rng.rand(64, 5).astype("float32"), rng.randint(0, 3, 64).astype("int32")
    model = _dropping_model(steps_per_execution)
    outcome = train_and_evaluate(
        model, make_dataset(x, y, 8, shuffle=True, seed=0, repeat=True, drop_remainder=True),
        make_dataset(x, y, 32, shuffle=False), steps=steps, eval_every=eval_every,
        workdir=str(workdir), callbacks=[calls] if calls else [])
    return model, outcome.history


def test_resume_at_a_multiple_of_k_equals_an_uninterrupted_run(tmp_path):
    calls = _Calls()
    whole, history = _fit(tmp_path / "whole", 8, calls=calls)
    assert calls.ends == [2, 4, 2, 4]  # 2 steps per call: each evaluation lands on its step
    assert list(history["step"]) == [4, 8]
    _fit(tmp_path / "parts", 4)
    resumed, resumed_history = _fit(tmp_path / "parts", 8)
    assert list(resumed_history["step"]) == [4, 8]
    for a, b in zip(whole.variables, resumed.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_a_period_that_k_does_not_divide_lowers_k(tmp_path):
    # A resume with another --eval_every: the harness lowers k rather than let an
    # evaluation fall inside a call.
    calls = _Calls()
    model, history = _fit(tmp_path, 6, steps_per_execution=4, eval_every=3, calls=calls)
    assert model.steps_per_execution == 3
    assert list(history["step"]) == [3, 6] and calls.ends == [3, 3]


def test_awkward_periods_give_a_small_k_and_say_why(caplog):
    from dni_tf.studies.threshold_updates import ThresholdSweepConfig

    fast_path._LOGGED.clear()
    with caplog.at_level(logging.INFO):
        prime = ThresholdSweepConfig(steps=937 * 3, eval_every=937).resolve()
        even = ThresholdSweepConfig(steps=938 * 3, eval_every=938).resolve()
    assert (prime.steps_per_execution, even.steps_per_execution) == (1, 14)
    lines = [r.getMessage() for r in caplog.records if "steps_per_execution" in r.getMessage()]
    assert lines == ["steps_per_execution 1: no k from 2 to 50 divides the evaluation periods "
                     "[937] (--eval_every and --steps with a larger common divisor run more "
                     "steps per call)"]


def test_study_defaults_and_the_conv_fallback_line(caplog):
    from dni_tf.studies import gradient_drop, threshold_updates

    fast_path._LOGGED.clear()
    config = gradient_drop.GradientDropConfig(steps=1000, eval_every=500)
    with caplog.at_level(logging.INFO):
        model = gradient_drop.build_model(config, 0.5, (28, 28, 1), 10)
        gradient_drop.build_model(config, 0.8, (28, 28, 1), 10)  # the line is logged once
    lines = [r.getMessage() for r in caplog.records if "jit_compile" in r.getMessage()]
    if fast_path.has_accelerator():
        assert model.jit_compile and not lines
    else:
        assert not model.jit_compile
        assert lines == ["jit_compile off by default: XLA's CPU convolutions are slower "
                         "than graph mode's"]
    assert model.steps_per_execution == 50
    # The MLP compiles with XLA by default.
    mlp = threshold_updates.ThresholdSweepConfig(steps=30, eval_every=12)
    fast = mlp.resolve(models.mlp((4,), hidden=(4,), num_classes=2))
    assert (fast.jit_compile, fast.steps_per_execution) == (True, 6)


def test_bfloat16_trains_each_family_and_keeps_synthetic_gradients_float32():
    from dni_tf.gradient_dropping import GradientDropping
    from dni_tf.synthetic_gradients import SyntheticGradient
    from dni_tf.targeted_dropout import targeted_dropout_mlp
    from dni_tf.threshold_updates import ThresholdUpdates

    rng = np.random.RandomState(0)
    x, y = rng.rand(32, 6).astype("float32"), rng.randint(0, 3, 32).astype("int32")
    try:
        fast_path.set_mixed_precision("bfloat16")
        mlp = lambda: models.mlp((6,), hidden=(8,), num_classes=3, seed=0)  # noqa: E731
        for model in (GradientDropping(mlp(), keep_prob=0.5, seed=1),
                      ThresholdUpdates(mlp(), threshold=0.0, seed=1),
                      targeted_dropout_mlp("targeted_weight", input_shape=(6,), hidden=(8,),
                                           num_classes=3, seed=1)):
            model.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=False)
            before = [v.numpy().copy() for v in model.trainable_variables]
            model.run_eagerly = True  # the dtypes are the point here, not the tracing
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            assert np.isfinite(history.history["loss"][-1])
            assert any(not np.array_equal(b, v.numpy())
                       for b, v in zip(before, model.trainable_variables))
            hidden = [layer for layer in model._flatten_layers()
                      if isinstance(layer, keras.layers.Dense)][0]
            assert hidden.compute_dtype == "bfloat16" and hidden.kernel.dtype == "float32"
        # Synthetic-gradient modules stay float32 under the mixed policy: variables,
        # computation and output, for 16-bit activations.
        module = SyntheticGradient(hidden_layers=1, units=4, context_dim=3)
        out = module(tf.ones([2, 5], tf.bfloat16), context=tf.one_hot([0, 1], 3))
        assert out.dtype == tf.float32
        assert {layer.compute_dtype for layer in module.stack} == {"float32"}
        assert {v.dtype for v in module.variables} == {"float32"}
    finally:
        fast_path.set_mixed_precision("none")


FLOAT16_MODELS = {
    "gradient dropping, variable, freeze": lambda mlp: __import__(
        "dni_tf.gradient_dropping", fromlist=["x"]).GradientDropping(
            mlp, keep_prob=0.5, granularity="variable", dropped_state="freeze", seed=1),
    "gradient dropping, element": lambda mlp: __import__(
        "dni_tf.gradient_dropping", fromlist=["x"]).GradientDropping(
            mlp, keep_prob=0.5, granularity="element", seed=1),
    "targeted dropout": None,
}


@pytest.mark.parametrize("name", list(FLOAT16_MODELS))
def test_float16_scales_the_loss_and_follows_the_float32_run(name):
    """Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer: the
    step must differentiate the *scaled* loss (else every update is 2**15 times
    too small) and the run then follows the float32 run; a step whose scaled
    gradients overflow is skipped whole (weights and Adam moments unchanged, the
    scale halved)."""
    from dni_tf.targeted_dropout import targeted_dropout_mlp

    rng = np.random.RandomState(0)
    x, y = rng.rand(64, 6).astype("float32"), rng.randint(0, 3, 64).astype("int32")

    def make():
        if FLOAT16_MODELS[name] is None:
            model = targeted_dropout_mlp("targeted_weight", input_shape=(6,), hidden=(8,),
                                         num_classes=3, seed=1)
        else:
            model = FLOAT16_MODELS[name](models.mlp((6,), hidden=(8,), num_classes=3, seed=0))
        model.compile(optimizer=keras.optimizers.Adam(1e-2, epsilon=1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.build((None, 6))
        return model

    from mixed_precision_helpers import built_under

    reference = make()
    model = built_under("float16", make)
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        v.assign(r)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    for m in (reference, model):
        m.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 15  # no step skipped
    for v, r in zip(model.trainable_variables, reference.trainable_variables):
        if "bias" in v.path:
            continue  # from zero: Adam turns float16's rounding of tiny gradients into steps
        error = np.linalg.norm(v.numpy() - r.numpy()) / np.linalg.norm(r.numpy())
        assert error < 2e-3, (v.path, error)
    # An overflowing step: nothing moves, the scale halves.
    model.optimizer.dynamic_scale.assign(2.0 ** 100)
    state = [v.numpy().copy() for v in model.trainable_variables + model.optimizer.variables
             if "scale" not in v.path and "iteration" not in v.path]
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    after = [v.numpy() for v in model.trainable_variables + model.optimizer.variables
             if "scale" not in v.path and "iteration" not in v.path]
    for b, a in zip(state, after):
        np.testing.assert_array_equal(a, b)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0 ** 99


def test_under_a_distribution_strategy_no_auto_xla_and_one_step_per_call(mirrored_strategy):
    import dataclasses

    from dni_tf.studies.threshold_updates import ThresholdSweepConfig

    config = ThresholdSweepConfig(steps=30, eval_every=12)
    with mirrored_strategy.scope():
        fast = config.resolve(models.mlp((4,), hidden=(4,), num_classes=2))
        assert (fast.jit_compile, fast.steps_per_execution) == (False, 1)
        with pytest.raises(UsageError, match="--steps_per_execution=6: not supported with a "
                                             "distribution strategy"):
            dataclasses.replace(config, steps_per_execution=6).resolve()
        # XLA cannot compile a step whose replicas' variables sit on several devices
        # (checked: a plain Keras model fails the same way), so true is refused.
        with pytest.raises(UsageError, match="--jit_compile=true: not supported with a "
                                             "distribution strategy over several devices"):
            dataclasses.replace(config, jit_compile=True).resolve()
