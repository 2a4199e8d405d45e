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

from dni_tf.dni_feedforward import DNIClassifier, build_classifier, cnn_layers, fcn_layers
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
                "--eval_every=2", "--batch_size=32", "--mixed_precision=bfloat16",
                workdir=workdir)
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
    assert run["config"]["mixed_precision"] == "bfloat16"
    history = pd.read_csv(workdir / "fcn3_cdni" / "history.csv")
    assert list(history["step"]) == [2, 4] and "train_sg_loss_2" in history


@pytest.mark.parametrize("cnn", [False, True])
def test_decoupling_points_move_but_the_network_function_does_not(cnn):
    x = RNG.random((4, 12, 12, 1)).astype("float32")
    outputs = {}
    for point in ("pre_relu", "post_relu"):
        net = (cnn_layers(4, 10, filters=3, kernel_size=3, seed=2, point=point) if cnn
               else fcn_layers(4, 10, width=7, seed=2, point=point))
        h = x
        for layer in net:
            h = layer(h, training=True)
        outputs[point] = h.numpy()
        ends = [type(layer.layers[-1]).__name__ for layer in net[:-1]]
        if point == "pre_relu":  # points read the batch-norm output (layer 1 of the CNN: max pool)
            assert ends == (["MaxPooling2D", "BatchNormalization", "BatchNormalization"] if cnn
                            else ["BatchNormalization"] * 3)
        else:
            assert ends == (["MaxPooling2D", "AveragePooling2D", "AveragePooling2D"] if cnn
                            else ["ReLU"] * 3)
    np.testing.assert_allclose(outputs["pre_relu"], outputs["post_relu"], rtol=1e-5, atol=1e-6)


def test_auto_defaults_pick_the_point_and_units_per_method():
    dni = build_classifier("fcn", 3, (8, 8, 1), 10, width=6, method="dni")
    cdni = build_classifier("fcn", 3, (8, 8, 1), 10, width=6, method="cdni")
    assert type(dni.net_layers[0].layers[-1]).__name__ == "BatchNormalization"
    assert type(cdni.net_layers[0].layers[-1]).__name__ == "ReLU"
    assert dni.gradient_units == "batch_mean" and cdni.gradient_units == "per_example"
    assert DNIClassifier(fcn_layers(3), 10, method="dni", gradient_units="per_example"
                         ).gradient_units == "per_example"


def test_bp_lambda_one_is_backprop_for_any_sg_scale():
    backprop = make(method="backprop")
    mixed = make(method="cdni", lambda_mix=1.0, sg_scale=0.5)
    nonzero_module_outputs(mixed)  # a (1 - lambda) x synthetic term would show
    for step in range(3):
        backprop.train_on_batch(*batch(step))
        mixed.train_on_batch(*batch(step))
        for layer_b, layer_m in zip(backprop.net_layers, mixed.net_layers):
            for vb, vm in zip(layer_b.weights, layer_m.weights):
                np.testing.assert_allclose(vm.numpy(), vb.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lambda_mix"):
        make(method="dni", lambda_mix=0.5, unlock="complete")


def test_sparse_updates_count_each_blocks_own_steps_and_follow_the_global_lr():
    model = make(method="cdni", update_prob=0.5, lr=1e-2)
    nonzero_module_outputs(model)
    moved = np.zeros(3, int)
    for step in range(8):
        before = [values(model._block_variables(j)) for j in range(3)]
        model.train_on_batch(*batch(step))
        moved += [all(changed(b, model._block_variables(j))) for j, b in enumerate(before)]
    assert 0 < moved.sum() < 24, moved
    # Adam's bias correction counts only the steps a block was updated.
    assert [int(o.iterations.numpy()) for o in model.block_optimizers] == list(moved)
    assert int(model.optimizer.iterations.numpy()) == 8
    for opt in model.block_optimizers:
        assert float(opt.learning_rate.numpy()) == pytest.approx(1e-2)


def test_sample_weight_class_weight_and_a_summed_loss_are_refused():
    model = make(method="dni")
    with pytest.raises(ValueError, match="sample_weight or class_weight"):
        model.fit(X, Y, sample_weight=np.ones(96), epochs=1, batch_size=32, verbose=0)
    with pytest.raises(ValueError, match="sample_weight or class_weight"):
        model.fit(X, Y, class_weight={i: 1.0 for i in range(10)}, epochs=1, batch_size=32,
                  verbose=0)
    with pytest.raises(ValueError, match="reduction='sum'"):
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum"))
    # Backprop supports sample weights: weight 0 on every example = no update.
    backprop = make(method="backprop")
    before = values(backprop.trainable_variables)
    backprop.fit(X[:32], Y[:32], sample_weight=np.zeros(32), batch_size=32, epochs=1, verbose=0)
    assert not any(changed(before, backprop.trainable_variables))


@pytest.mark.parametrize("input_targets", ["real", "chained"])
def test_complete_unlock_moving_statistics_follow_the_real_chain(input_targets):
    model = make(method="cdni", unlock="complete", input_targets=input_targets)
    reference = make(method="backprop")  # same seeds: the same layers
    model.train_on_batch(*batch(0))
    reference(batch(0)[0], training=True)  # one real forward pass updates its statistics
    same = [np.allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
            for a, b in zip([v for layer in model.net_layers for v in layer.non_trainable_variables],
                            [v for layer in reference.net_layers
                             for v in layer.non_trainable_variables])]
    assert all(same) == (input_targets == "real"), same


# --------------------------------------------------------------- one step by hand
STEP_B = 6  # tiny batch: per-example (B * dL/dh) and batch-mean units differ 6-fold


def _step_model(method, sg_scale, lambda_mix, unlock, sg_hidden_layers=0, target_mix=0.0,
                gradient_units="batch_mean", point="pre_relu", input_targets="real",
                sg_lr_scale=1.0, **network):
    """A 3-layer FCN (2 decoupling points) with random, NON-zero modules, SGD lr 1.

    `network`: `fcn_layers` options (input_norm, output_norm, init, ...).
    """
    net = fcn_layers(3, 10, width=5, seed=1, point=point, **network)
    model = DNIClassifier(net, 10, method=method, sg_scale=sg_scale, lambda_mix=lambda_mix,
                          target_mix=target_mix, gradient_units=gradient_units,
                          unlock=unlock, input_targets=input_targets,
                          sg_hidden_layers=sg_hidden_layers, sg_units=4,
                          input_hidden_layers=0, diagnostics=True, seed=3,
                          sg_lr_scale=sg_lr_scale)
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

    Returns ({id(variable): gradient}, [(cosine, norm ratio, update cosine) per point]).
    Units: u = B (per_example) or 1 (batch_mean); a module M predicts u x dL/dh.
    Going down from the loss, a_k is the gradient (loss units) arriving at point
    k from above (a = dL/dh at the last point) and the block below point k is
    driven by c_k = lam * a_k + (1 - lam) * sg_scale * M_k / u (BP(lambda));
    a_{k-1} is c_k backpropagated through that block. The module target is the
    same chain with sg_scale = 1 (unscaled synthetic terms), times u, mixed with
    the true gradient by target_mix. With complete unlock block j > 0 runs on
    I_j(x), and I_j regresses onto the real output of block j - 1 (the real
    chain; or, "chained", block j - 1 applied to I_{j-1}(x)).
    """
    b = float(x.shape[0])
    u = b if model.gradient_units == "per_example" else 1.0
    x = tf.constant(x)
    y = tf.constant(y)
    context = tf.one_hot(y, 10) if model.method == "cdni" else None
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    num_points = len(model.points)
    complete = model.unlock == "complete"
    scale, lam, mix = model.sg_scale, model.lambda_mix, model.target_mix
    grads = {}

    def run(j, h):
        start, stop = model.block_slices[j]
        for layer in model.net_layers[start:stop]:
            h = layer(h, training=True)
        return h

    # Block inputs (constants) and the input models' regression.
    block_in = [x]
    real = x
    for j in range(num_points):
        real = run(j, real)
        if complete:
            target = real if model.input_targets == "real" else run(j, block_in[j])
            imodel = model.input_models[j]
            with tf.GradientTape() as tape:
                pred = imodel(x, training=True)
                loss = tf.reduce_mean(tf.reduce_sum(tf.square(pred - target), axis=-1))
            for v, g in zip(imodel.trainable_variables,
                            tape.gradient(loss, imodel.trainable_variables)):
                grads[id(v)] = g
            block_in.append(tf.constant(pred.numpy()))
        else:
            block_in.append(tf.constant(real.numpy()))
    # One tape per block: its output from its (constant) input.
    blocks = []
    for j in range(num_points + 1):
        start, stop = model.block_slices[j]
        variables = [v for layer in model.net_layers[start:stop] for v in layer.trainable_variables]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(block_in[j])
            out = run(j, block_in[j])
            loss = loss_fn(y, out) if j == num_points else None
        blocks.append((tape, out, block_in[j], variables, loss))
    ms = [module(blocks[k][1], context=context, training=True).numpy()
          for k, module in enumerate(model.sg_modules)]

    def vjp(j, cotangent, wrt):
        tape, out, inp, variables, _ = blocks[j]
        return tape.gradient(out, [inp] if wrt == "input" else variables,
                             output_gradients=cotangent)

    tape, out, inp, variables, loss = blocks[-1]
    for v, g in zip(variables, tape.gradient(loss, variables)):
        grads[id(v)] = g
    top = tape.gradient(loss, inp)                  # dL/dh at the last point
    true = [None] * num_points
    true[-1] = top
    for k in range(num_points - 1, 0, -1):
        true[k - 1] = vjp(k, true[k], "input")[0]
    # The layers below each point.
    a = top
    for k in range(num_points - 1, -1, -1):
        c = lam * a + (1.0 - lam) * scale * ms[k] / u
        for v, g in zip(blocks[k][3], vjp(k, c, "vars")):
            grads[id(v)] = g
        if k > 0:
            a = vjp(k, c, "input")[0]
    # Module targets: the same chain with unscaled synthetic gradients.
    targets = [None] * num_points
    r = top
    for k in range(num_points - 1, -1, -1):
        targets[k] = mix * true[k] * u + (1.0 - mix) * r * u
        if k > 0:
            r = vjp(k, lam * r + (1.0 - lam) * ms[k] / u, "input")[0]
    # Modules: L2 regression onto the (constant) targets, mean over examples.
    diagnostics = []
    for k, module in enumerate(model.sg_modules):
        with tf.GradientTape() as tape:
            m = module(blocks[k][1], context=context, training=True)
            loss = tf.reduce_mean(tf.reduce_sum(tf.square(m - targets[k]), axis=-1))
        for v, g in zip(module.trainable_variables,
                        tape.gradient(loss, module.trainable_variables)):
            grads[id(v)] = g
        sg = np.ravel(scale * m.numpy())
        tg = np.ravel(true[k].numpy() * u)
        used = np.concatenate([np.ravel(grads[id(v)].numpy()) for v in blocks[k][3]])
        ideal = np.concatenate([np.ravel(g.numpy()) for g in vjp(k, true[k], "vars")])
        diagnostics.append((sg @ tg / (np.linalg.norm(sg) * np.linalg.norm(tg)),
                            np.linalg.norm(sg) / np.linalg.norm(tg),
                            used @ ideal / (np.linalg.norm(used) * np.linalg.norm(ideal))))
    return grads, diagnostics


STEP_CASES = [  # method, sg_scale, lambda_mix, target_mix, unlock, hidden, units, point, inputs
    ("dni", 1.0, 0.0, 0.0, "update", 0, "per_example", "post_relu", "real"),
    ("cdni", 0.5, 0.0, 0.0, "update", 0, "batch_mean", "pre_relu", "real"),
    ("dni", 2.0, 0.0, 0.3, "update", 0, "batch_mean", "pre_relu", "real"),
    ("cdni", 0.5, 0.0, 1.0, "update", 0, "per_example", "post_relu", "real"),
    ("cdni", 0.5, 0.0, 0.3, "update", 1, "batch_mean", "pre_relu", "real"),
    ("dni", 0.5, 0.5, 0.0, "update", 0, "batch_mean", "pre_relu", "real"),
    ("cdni", 2.0, 0.3, 0.0, "update", 0, "per_example", "post_relu", "real"),
    ("cdni", 1.0, 0.3, 0.2, "update", 1, "per_example", "pre_relu", "real"),
    ("dni", 0.5, 0.0, 0.0, "complete", 0, "batch_mean", "pre_relu", "real"),
    ("cdni", 1.0, 0.0, 0.5, "complete", 0, "per_example", "pre_relu", "chained"),
]


@pytest.mark.parametrize("method,sg_scale,lambda_mix,target_mix,unlock,hidden,units,point,inputs",
                         STEP_CASES)
def test_one_step_matches_a_hand_computed_dni_step(method, sg_scale, lambda_mix, target_mix,
                                                   unlock, hidden, units, point, inputs):
    """SGD lr 1: every variable (layers, modules, input models) moves by minus its
    reference gradient, and the diagnostics compare the scaled synthetic gradient
    (and the block's gradient) with the TRUE gradient (not the bootstrapped target)."""
    model = _step_model(method, sg_scale, lambda_mix, unlock, sg_hidden_layers=hidden,
                        target_mix=target_mix, gradient_units=units, point=point,
                        input_targets=inputs)
    x, y = X[:STEP_B], Y[:STEP_B]
    expected, diagnostics = _reference_gradients(model, x, y)
    variables = model.trainable_variables
    assert {id(v) for v in variables} == set(expected)
    before = values(variables)
    logs = model.train_on_batch(x, y, return_dict=True)
    for v, b in zip(variables, before):
        np.testing.assert_allclose(v.numpy() - b, -expected[id(v)].numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=v.path)
    for k, (cosine, ratio, update_cosine) in zip(model.points, diagnostics):
        assert logs[f"sg_cosine_{k}"] == pytest.approx(cosine, rel=1e-4, abs=1e-5)
        assert logs[f"sg_norm_ratio_{k}"] == pytest.approx(ratio, rel=1e-4)
        assert logs[f"update_cosine_{k}"] == pytest.approx(update_cosine, rel=1e-4, abs=1e-5)


BF16_CASES = [
    ("dni", 0.5, 0.5, 0.0, "update"),
    ("cdni", 1.0, 0.0, 0.3, "update"),
    ("cdni", 1.0, 0.0, 0.0, "complete"),
]


@pytest.mark.parametrize("method,sg_scale,lambda_mix,target_mix,unlock", BF16_CASES)
def test_bfloat16_step_follows_the_float32_step(method, sg_scale, lambda_mix, target_mix, unlock):
    """Under the mixed_bfloat16 policy the blocks compute in bfloat16 and the modules
    in float32; one SGD step moves every variable as the float32 step does, up to
    bfloat16 rounding (and the diagnostics come out finite)."""
    from mixed_precision_helpers import assert_moves_follow, built_under

    x, y = X[:STEP_B], Y[:STEP_B]

    def make():
        return _step_model(method, sg_scale, lambda_mix, unlock, sg_hidden_layers=1,
                           target_mix=target_mix)

    reference = make()
    model = built_under("bfloat16", make)
    model.set_weights(reference.get_weights())
    assert {layer.compute_dtype for layer in model.net_layers if layer.weights} == {"bfloat16"}
    assert all(m.compute_dtype == "float32" for m in model.sg_modules)
    assert_moves_follow(reference, model, lambda m: m.train_on_batch(x, y, return_dict=True),
                        limit=0.05)


# --------------------------------------------------------------------------- parity options
def test_fcn_input_norm_output_norm_init_and_batch_norm_options():
    x = RNG.random((6, 8, 8, 1)).astype("float32")
    mean, std = 0.2, 0.4
    plain = fcn_layers(3, 10, width=5, seed=4, output_norm=True)
    normed = fcn_layers(3, 10, width=5, seed=4, output_norm=True, input_norm=(mean, std))
    # Same weights (same seeds): the normalised net on x is the plain net on (x - mean) / std.
    h_plain, h_normed = (x - mean) / std, x
    for a, b in zip(plain, normed):
        h_plain, h_normed = a(h_plain, training=False), b(h_normed, training=False)
    np.testing.assert_allclose(h_normed.numpy(), h_plain.numpy(), rtol=1e-4, atol=1e-5)
    # Output batch norm: Dense without bias, then batch norm (training mode: per-class
    # mean 0 over the batch).
    last = plain[-1]
    assert type(last.layers[-1]).__name__ == "BatchNormalization"
    assert not last.layers[-2].use_bias
    h = x
    for layer in plain:
        h = layer(h, training=True)
    np.testing.assert_allclose(h.numpy().mean(axis=0), 0.0, atol=1e-5)
    assert fcn_layers(3, 10, width=5)[-1].layers[-1].use_bias  # default: as before
    # torch init: uniform in +-1/sqrt(fan_in) (He-normal exceeds that bound).
    for init, inside in (("torch", True), ("keras", False)):
        net = fcn_layers(3, 10, width=64, seed=1, init=init, bn_momentum=0.9, bn_epsilon=1e-5)
        net[0].build((None, 28, 28, 1))
        kernel = net[0].layers[1].kernel.numpy()
        bound = 1.0 / np.sqrt(784)
        assert (np.abs(kernel).max() <= bound) == inside
        if inside:
            assert abs(kernel.std() - bound / np.sqrt(3.0)) < 0.05 * bound
        bn = net[0].layers[2]
        assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
    with pytest.raises(ValueError, match="FCN options"):
        build_classifier("cnn", 3, (8, 8, 1), 10, width=4, output_norm=True)
    with pytest.raises(ValueError, match="model=fcn"):
        DNIConfig(model="cnn", input_norm=True).validate()


@pytest.mark.parametrize("update_prob", [1.0, 0.5])
def test_sg_lr_scale_multiplies_only_the_modules_steps(update_prob):
    scale = 0.25
    models = [make(method="cdni", update_prob=update_prob, sg_lr_scale=s) for s in (1.0, scale)]
    for model in models:
        nonzero_module_outputs(model)
    module_vars = [[v for m in model.sg_modules for v in m.trainable_variables] for model in models]
    net_vars = [[v for layer in model.net_layers for v in layer.trainable_variables]
                for model in models]
    for step in range(3):  # with update_prob 0.5 some blocks are skipped (the same in both)
        before_m = [values(vs) for vs in module_vars]
        before_n = [values(vs) for vs in net_vars]
        for model in models:
            model.train_on_batch(*batch(step))
        moved = 0
        for b1, bs, v1, vs in zip(before_m[0], before_m[1], module_vars[0], module_vars[1]):
            np.testing.assert_allclose(b1, bs, rtol=1e-6, atol=1e-7)  # same start: test is valid
            step_1, step_s = v1.numpy() - b1, vs.numpy() - bs
            np.testing.assert_allclose(step_s, scale * step_1, rtol=1e-4, atol=1e-8)
            moved += int(np.abs(step_1).max() > 0)
        assert moved > 0
        if step == 0:  # the network's own first step does not depend on the module's rate
            for v1, vs in zip(net_vars[0], net_vars[1]):
                np.testing.assert_allclose(vs.numpy(), v1.numpy(), rtol=1e-6, atol=1e-7)
        for v1, vs in zip(module_vars[0], module_vars[1]):  # realign for the next step
            vs.assign(v1.numpy())
        for v1, vs in zip(net_vars[0], net_vars[1]):
            vs.assign(v1.numpy())
    with pytest.raises(ValueError, match="sg_lr_scale"):
        DNIClassifier(fcn_layers(3), 10, sg_lr_scale=0.0)


def test_study_config_reaches_the_model():
    from dni_tf.studies.dni_feedforward import PRESETS, build_model, input_stats

    preset = {k: v for k, v in PRESETS["parity"].items() if k not in ("method", "seed")}
    preset.update(method="cdni", seed=1, width=6, sg_units=5, input_norm=True, output_norm=True,
                  init="torch", bn_momentum=0.9, bn_epsilon=1e-5, adam_epsilon=1e-8)
    config = DNIConfig(**preset)
    config.validate()

    class Data:  # input_stats reads the training images only
        train = (np.array([0.0, 1.0, 1.0, 2.0], "float32"), None)

    assert input_stats(config, Data) == (1.0, np.sqrt(0.5))
    assert input_stats(DNIConfig(), Data) is None
    model = build_model(config, (8, 8, 1), 10, input_stats(config, Data))
    assert model.sg_lr_scale == 0.25 and PRESETS["parity"]["sg_lr_scale"] is None  # cdni
    first, last = model.net_layers[0].layers, model.net_layers[-1].layers
    rescale = first[1]
    assert (rescale.scale, rescale.offset) == pytest.approx((1 / np.sqrt(0.5), -1 / np.sqrt(0.5)))
    assert type(last[-1]).__name__ == "BatchNormalization" and not last[-2].use_bias
    assert (last[-1].momentum, last[-1].epsilon) == (0.9, 1e-5)
    assert abs(first[2].kernel.numpy()).max() <= 1 / np.sqrt(64)  # torch init
    assert model.optimizer.epsilon == 1e-8
    with pytest.raises(ValueError, match="input_norm"):
        build_model(config, (8, 8, 1), 10)


@pytest.mark.parametrize("method,sg_lr_scale,hidden", [("dni", None, 1), ("cdni", None, 0),
                                                       ("cdni", 0.3, 1)])
def test_one_step_with_parity_options_matches_the_hand_computed_step(method, sg_lr_scale,
                                                                     hidden):
    """SGD lr 1 on the parity network options (input and output normalisation, PyTorch
    initialisation and batch-norm constants): each layer moves by minus its reference
    gradient and each module by minus sg_lr_scale times its own (None: the per-method
    default, 1/16 for dni, 1/4 for cdni)."""
    model = _step_model(method, 1.0, 0.0, "update", sg_hidden_layers=hidden,
                        sg_lr_scale=sg_lr_scale, input_norm=(0.3, 0.6), output_norm=True,
                        init="torch", bn_momentum=0.9, bn_epsilon=1e-5)
    scale = {None: {"dni": 1 / 16, "cdni": 0.25}[method]}.get(sg_lr_scale, sg_lr_scale)
    assert model.sg_lr_scale == scale
    x, y = X[:STEP_B], Y[:STEP_B]
    expected, _ = _reference_gradients(model, x, y)
    module_ids = {id(v) for m in model.sg_modules for v in m.trainable_variables}
    variables = model.trainable_variables
    assert {id(v) for v in variables} == set(expected)
    before = values(variables)
    model.train_on_batch(x, y)
    for v, b in zip(variables, before):
        step = -expected[id(v)].numpy() * (scale if id(v) in module_ids else 1.0)
        np.testing.assert_allclose(v.numpy() - b, step, rtol=1e-4, atol=1e-6, err_msg=v.path)
    # The options reached the network: the reference ran the same layers.
    first, last = model.net_layers[0].layers, model.net_layers[-1].layers
    assert type(first[1]).__name__ == "Rescaling"
    assert type(last[-1]).__name__ == "BatchNormalization" and last[-1].epsilon == 1e-5


def test_per_method_module_rate_defaults_and_the_preset():
    from dni_tf.studies.dni_feedforward import PRESETS, build_model

    assert [DNIClassifier(fcn_layers(3), 10, method=m, sg_lr_scale=None).sg_lr_scale
            for m in ("dni", "cdni")] == [1 / 16, 0.25]
    assert DNIClassifier(fcn_layers(3), 10, method="dni").sg_lr_scale == 1.0  # API default
    preset = {k: v for k, v in PRESETS["parity"].items() if k not in ("method", "seed")}
    assert preset["sg_lr_scale"] is None  # per method
    for method, explicit, want in (("dni", None, 1 / 16), ("cdni", None, 0.25),
                                   ("dni", 0.25, 0.25), ("backprop", None, 1.0)):
        config = DNIConfig(**{**preset, "sg_lr_scale": explicit, "sg_units": 5}, method=method,
                           seed=1, width=6)
        config.validate()
        assert config.module_lr_scale() == want
        if method != "backprop":
            assert build_model(config, (8, 8, 1), 10).sg_lr_scale == want
    assert DNIConfig().module_lr_scale() == 1.0  # other presets: one learning rate


def test_pipelined_execution_refuses_a_module_rate_it_would_ignore():
    from dni_tf.pipelined_dni import PipelinedDNIClassifier

    with pytest.raises(ValueError, match="sg_lr_scale=0.25 is not supported"):
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni", sg_lr_scale=0.25,
                               execution="pipelined", batch_size=16)
    PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni", execution="pipelined",
                           batch_size=16)
    with pytest.raises(ValueError, match="sg_lr_scale=0.0625"):
        DNIConfig(layers=3, decouple=(2,), method="dni", sg_lr_scale=None,
                  execution="pipelined").validate()
