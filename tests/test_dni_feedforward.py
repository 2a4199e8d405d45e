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


def nonzero_module_outputs(model, seed=5):
    """Random module output layers (they start at zero)."""
    rng = np.random.default_rng(seed)
    for module in model.sg_modules:
        for v in module.trainable_variables:
            if "output" in v.path:
                v.assign(rng.normal(0.0, 0.1, v.shape).astype("float32"))


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
    # Non-zero module outputs: a zero-initialised module that has not been
    # selected yet predicts exactly 0, and its block then legitimately stays put
    # while the module itself learns.
    nonzero_module_outputs(model)
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
    nonzero_module_outputs(again)
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
                          (dict(method="backprop", update_prob=0.5), "backprop")]:
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


# --------------------------------------------------------------- one step by hand
STEP_B = 6  # tiny batch: per-example (B * dL/dh) and batch-mean units differ 6-fold


def _step_model(method, sg_scale, lambda_mix, unlock, sg_hidden_layers=0):
    """A 3-layer FCN (2 decoupling points) with random, NON-zero modules, SGD lr 1."""
    net = fcn_layers(3, 10, width=5, seed=1)
    model = DNIClassifier(net, 10, method=method, sg_scale=sg_scale, lambda_mix=lambda_mix,
                          unlock=unlock, sg_hidden_layers=sg_hidden_layers, sg_units=4,
                          input_hidden_layers=0, diagnostics=True, seed=3)
    model.build((None, 8, 8, 1))
    # Zero-initialised output layers would hide wrong targets, scales and inputs.
    rng = np.random.default_rng(7)
    for module in model.sg_modules:
        for v in module.trainable_variables:
            if "output" in v.path:
                v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _reference_gradients(model, x, y):
    """DNI/cDNI gradients of one step, from the paper, with a tape per block.

    Returns ({id(variable): gradient}, [(cosine, norm ratio) per point]).
    Every block j < last is trained by the surrogate sum(h_j * sg_scale * M_j) / B
    (M in per-example units); the last one by the batch-mean loss. The target of
    M_k is lam * B * (true dL/dh_k) + (1 - lam) * bootstrap, where bootstrap =
    the next module's UNSCALED prediction backpropagated through the next block
    (or B * dL/dh_k at the last point). With complete unlock block j > 0 runs on
    I_j(x), and I_j regresses onto the real output of block j - 1.
    """
    b = float(x.shape[0])
    x = tf.constant(x)
    y = tf.constant(y)
    context = tf.one_hot(y, 10) if model.method == "cdni" else None
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    num_points = len(model.points)
    complete = model.unlock == "complete"
    scale, lam = model.sg_scale, model.lambda_mix
    grads = {}

    def run(j, h):
        start, stop = model.block_slices[j]
        for layer in model.net_layers[start:stop]:
            h = layer(h, training=True)
        return h

    # Block inputs (constants) and the input models' regression.
    block_in = [x]
    h = x
    for j in range(num_points):
        real = run(j, block_in[j])
        if complete:
            imodel = model.input_models[j]
            with tf.GradientTape() as tape:
                pred = imodel(x, training=True)
                loss = tf.reduce_mean(tf.reduce_sum(tf.square(pred - real), axis=-1))
            for v, g in zip(imodel.trainable_variables,
                            tape.gradient(loss, imodel.trainable_variables)):
                grads[id(v)] = g
            block_in.append(tf.constant(pred.numpy()))
        else:
            block_in.append(tf.constant(real.numpy()))
    # Per block: layer gradients and the gradient at the block's input.
    input_grad = [None] * (num_points + 1)   # per-example units, unscaled
    jacobian_vjp = []
    for j in range(num_points + 1):
        start, stop = model.block_slices[j]
        variables = [v for layer in model.net_layers[start:stop] for v in layer.trainable_variables]
        u = block_in[j]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(u)
            out = run(j, u)
            if j < num_points:
                m = model.sg_modules[j](out, context=context, training=True)
                objective = tf.reduce_sum(out * tf.stop_gradient(scale * m)) / b
            else:
                objective = loss_fn(y, out)
        for v, g in zip(variables, tape.gradient(objective, variables)):
            grads[id(v)] = g
        if j > 0:
            gu = tape.gradient(objective, u) * b
            input_grad[j] = gu if j == num_points else gu / scale
        jacobian_vjp.append((tape, out, u))
    # True per-example gradients at each point: chain back from the loss.
    true = [None] * num_points
    g = input_grad[num_points]                      # B * dL/dh at the last point
    for k in range(num_points - 1, -1, -1):
        true[k] = g
        if k > 0:
            tape, out, u = jacobian_vjp[k]
            g = tape.gradient(out, u, output_gradients=g)
    # Modules: L2 regression onto the (constant) targets.
    diagnostics = []
    for k, module in enumerate(model.sg_modules):
        out = run(k, block_in[k])
        target = lam * true[k] + (1.0 - lam) * input_grad[k + 1]
        with tf.GradientTape() as tape:
            m = module(out, context=context, training=True)
            loss = tf.reduce_mean(tf.reduce_sum(tf.square(m - target), axis=-1))
        for v, g in zip(module.trainable_variables,
                        tape.gradient(loss, module.trainable_variables)):
            grads[id(v)] = g
        sg = np.ravel(scale * m.numpy())
        tg = np.ravel(true[k].numpy())
        diagnostics.append((sg @ tg / (np.linalg.norm(sg) * np.linalg.norm(tg)),
                            np.linalg.norm(sg) / np.linalg.norm(tg)))
    return grads, diagnostics


@pytest.mark.parametrize("method,sg_scale,lambda_mix,unlock,hidden", [
    ("dni", 1.0, 0.0, "update", 0),
    ("cdni", 0.5, 0.0, "update", 0),
    ("dni", 2.0, 0.3, "update", 0),
    ("cdni", 0.5, 1.0, "update", 0),
    ("cdni", 0.5, 0.3, "update", 1),
    ("dni", 0.5, 0.0, "complete", 0),
    ("cdni", 1.0, 0.5, "complete", 0),
])
def test_one_step_matches_a_hand_computed_dni_step(method, sg_scale, lambda_mix, unlock, hidden):
    """SGD lr 1: every variable (layers, modules, input models) moves by minus its
    reference gradient, and the diagnostics compare the scaled synthetic gradient
    with the TRUE gradient (not the bootstrapped target)."""
    model = _step_model(method, sg_scale, lambda_mix, unlock, sg_hidden_layers=hidden)
    x, y = X[:STEP_B], Y[:STEP_B]
    expected, diagnostics = _reference_gradients(model, x, y)
    variables = model.trainable_variables
    assert {id(v) for v in variables} == set(expected)
    before = values(variables)
    logs = model.train_on_batch(x, y, return_dict=True)
    for v, b in zip(variables, before):
        np.testing.assert_allclose(v.numpy() - b, -expected[id(v)].numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=v.path)
    for k, (cosine, ratio) in zip(model.points, diagnostics):
        assert logs[f"sg_cosine_{k}"] == pytest.approx(cosine, rel=1e-4, abs=1e-5)
        assert logs[f"sg_norm_ratio_{k}"] == pytest.approx(ratio, rel=1e-4)
