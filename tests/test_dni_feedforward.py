"""Tests for dni_tf.dni_feedforward (DNI/cDNI training of feed-forward nets) and its CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import keras

from dni_tf.dni_feedforward import DNIClassifier, cnn_layers, fcn_layers
from dni_tf.studies.dni_feedforward import DNIConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)
X = RNG.random((96, 8, 8, 1)).astype("float32")
Y = RNG.integers(0, 10, 96).astype("int32")


def make(layers=4, lr=1e-2, cnn=False, **kwargs):
    net = (cnn_layers(layers, 10, filters=4, kernel_size=3, seed=1) if cnn
           else fcn_layers(layers, 10, width=16, seed=1))
    model = DNIClassifier(net, 10, seed=3, sg_units=8, **kwargs)
    model.build((None, 8, 8, 1))
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def batch(step, size=32):
    start = (step * 16) % 64
    return X[start:start + size], Y[start:start + size]


def values(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def optimizer_slots(optimizer):
    """Per-variable optimizer state (Adam moments): not the step counter or the lr."""
    return [s for s in optimizer.variables
            if s is not optimizer.iterations and "learning_rate" not in s.path]


def layer_vars(model, i):
    return model.net_layers[i].trainable_variables


def test_oracle_training_equals_backprop_step_for_step():
    backprop = make(method="backprop")
    oracle = make(method="dni", oracle=True)
    for step in range(4):
        loss_b = backprop.train_on_batch(*batch(step), return_dict=True)["loss"]
        loss_o = oracle.train_on_batch(*batch(step), return_dict=True)["loss"]
        assert loss_o == pytest.approx(loss_b, rel=1e-5)
        for layer_b, layer_o in zip(backprop.net_layers, oracle.net_layers):
            for vb, vo in zip(layer_b.weights, layer_o.weights):
                np.testing.assert_allclose(vo.numpy(), vb.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,cnn", [("dni", False), ("cdni", False), ("cdni", True)])
def test_first_step_moves_only_the_last_block_and_the_top_module(method, cnn):
    model = make(method=method, cnn=cnn, layers=4 if not cnn else 3)
    n = len(model.net_layers)
    before_layers = [values(layer_vars(model, i)) for i in range(n)]
    before_modules = [values(m.trainable_variables) for m in model.sg_modules]
    logs = model.train_on_batch(*batch(0), return_dict=True)
    for i in range(n - 1):  # every decoupled layer gets a zero synthetic gradient
        assert not any(changed(before_layers[i], layer_vars(model, i))), f"layer {i + 1} moved"
    assert all(changed(before_layers[-1], layer_vars(model, n - 1)))
    # The module next to the loss regresses onto the true gradient at once; lower
    # modules bootstrap from zero predictions, so their first targets are zero.
    top = model.sg_modules[-1]
    assert any(changed(before_modules[-1], top.trainable_variables))
    assert logs[f"sg_loss_{n - 1}"] > 0.0
    for module, before in zip(model.sg_modules[:-1], before_modules[:-1]):
        assert not any(changed(before, module.trainable_variables))
    # After n-1 more steps the learning signal has reached every layer and module.
    for step in range(1, n):
        model.train_on_batch(*batch(step))
    for i in range(n):
        assert any(changed(before_layers[i], layer_vars(model, i))), f"layer {i + 1} never moved"
    for module, before in zip(model.sg_modules, before_modules):
        assert any(changed(before, module.trainable_variables))
    # cDNI's prediction depends on the label, DNI's does not (same h, two labels).
    h = tf.repeat(model.net_layers[0](X[:1]), 2, axis=0)
    prediction = model.sg_modules[0](h, context=tf.one_hot([1, 7], 10)).numpy()
    if method == "cdni":
        assert np.abs(prediction[0] - prediction[1]).max() > 1e-5
    else:
        np.testing.assert_array_equal(prediction[0], prediction[1])


def test_sparse_updates_leave_unselected_blocks_and_their_optimizer_state_unchanged():
    model = make(method="cdni", update_prob=0.5, lambda_mix=1.0)
    assert len(model.block_optimizers) == 3
    for step in range(4):  # warm up: modules and layers become non-trivial
        model.train_on_batch(*batch(step))
    pattern = []
    for step in range(4, 10):
        groups = [model._block_variables(j) + optimizer_slots(model.block_optimizers[j])
                  for j in range(3)]
        before = [values(g) for g in groups]
        before_last = values(layer_vars(model, 3))
        model.train_on_batch(*batch(step))
        moved = []
        for g, b in zip(groups, before):
            flags = changed(b, g)
            assert all(flags) or not any(flags), "a block was partly updated"
            moved.append(all(flags))
        pattern.append(moved)
        assert all(changed(before_last, layer_vars(model, 3)))  # the last block: always
    flat = np.array(pattern)
    assert flat.any() and not flat.all(), pattern  # both outcomes happen
    # The draws are seeded: a second model repeats them.
    again = make(method="cdni", update_prob=0.5, lambda_mix=1.0)
    for step in range(10):
        again.train_on_batch(*batch(step))
    for va, vb in zip(model.trainable_variables, again.trainable_variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_complete_unlock_trains_the_input_models():
    model = make(method="cdni", unlock="complete", lr=3e-3)
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(32, drop_remainder=True).repeat()
    history = model.fit(dataset, steps_per_epoch=10, epochs=4, verbose=0).history
    for k in model.points:
        losses = history[f"input_loss_{k}"]
        assert losses[-1] < 0.5 * losses[0], (k, losses)
    # Inference uses the real forward pass, not the input models.
    np.testing.assert_allclose(model.predict(X[:8], verbose=0), model(X[:8]).numpy(), atol=1e-5)


def test_diagnostics_and_listed_decoupling_points():
    model = make(method="cdni", decouple=[2], diagnostics=True, layers=4)
    assert model.points == [2] and model.block_slices == [(0, 2), (2, 4)]
    logs = {}
    for step in range(5):
        logs = model.train_on_batch(*batch(step), return_dict=True)
    assert set(logs) >= {"loss", "accuracy", "sg_loss_2", "sg_cosine_2", "sg_norm_ratio_2"}
    assert -1.0 <= logs["sg_cosine_2"] <= 1.0 and logs["sg_norm_ratio_2"] > 0.0
    # Oracle diagnostics: the "synthetic" gradient is the true one.
    oracle = make(method="dni", oracle=True, diagnostics=True, layers=3)
    logs = oracle.train_on_batch(*batch(0), return_dict=True)
    assert logs["sg_cosine_1"] == pytest.approx(1.0, abs=1e-4)
    assert logs["sg_norm_ratio_1"] == pytest.approx(1.0, abs=1e-4)
    # Evaluation reports only the task metrics.
    assert set(model.evaluate(X, Y, verbose=0, return_dict=True)) == {"loss", "accuracy"}


def test_checkpoint_restores_modules_optimizers_and_rng(tmp_path):
    model = make(method="cdni", update_prob=0.5)
    for step in range(3):
        model.train_on_batch(*batch(step))
    path = str(tmp_path / "ckpt.weights.h5")
    model.save_weights(path)
    restored = make(method="cdni", update_prob=0.5)
    restored.load_weights(path)
    for step in range(3, 6):
        model.train_on_batch(*batch(step))
        restored.train_on_batch(*batch(step))
    for va, vb in zip(model.variables, restored.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    for opt_a, opt_b in zip(model.block_optimizers, restored.block_optimizers):
        for va, vb in zip(opt_a.variables, opt_b.variables):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_config_validation_names_the_flag():
    for kwargs, match in [(dict(layers=1), "layers"), (dict(update_prob=0.0), "update_prob"),
                          (dict(update_prob=1.5), "update_prob"), (dict(method="sgd"), "method"),
                          (dict(layers=4, decouple=[4]), "decouple"),
                          (dict(layers=4, decouple=[0]), "decouple"),
                          (dict(method="backprop", update_prob=0.5), "backprop"),
                          (dict(steps=100, eval_every=30), "eval_every")]:
        with pytest.raises(ValueError, match=match):
            DNIConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="decoupling points"):
        DNIClassifier(fcn_layers(3), 10, decouple=[3])


def _cli(*args, workdir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "experiments.dni_feedforward",
                           f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_grid_writes_table_history_and_figures(tmp_path):
    workdir = tmp_path / "grid"
    proc = _cli("--dataset=digits", "--method=backprop,cdni", "--layers=3", "--steps=4",
                "--eval_every=2", "--batch_size=32", workdir=workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(workdir / "table.csv")
    assert list(table["method"]) == ["backprop", "cdni"]
    assert list(table.columns[1:]) == ["FCN 3 layers"]
    assert ((table.iloc[:, 1:] >= 0) & (table.iloc[:, 1:] <= 100)).all().all()
    assert (workdir / "table.md").read_text().count("|") > 8
    for name in ("test_error.png", "sg_loss.png", "history.csv", "results.json"):
        assert (workdir / name).stat().st_size > 0
    run = json.loads((workdir / "fcn3_cdni" / "results.json").read_text())
    assert run["config"]["method"] == "cdni" and run["metrics"]["steps"] == 4
    history = pd.read_csv(workdir / "fcn3_cdni" / "history.csv")
    assert list(history["step"]) == [2, 4] and "train_sg_loss_2" in history
