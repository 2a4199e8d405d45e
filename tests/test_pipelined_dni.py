"""Pipelined DNI and device placement (dni_tf.pipelined_dni).

The conftest splits the CPU into two logical devices, "/CPU:0" and "/CPU:1".
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dni_tf.core import build_for_restore
from dni_tf.dni_feedforward import DNIClassifier, fcn_layers
from dni_tf.harness.callbacks import restore, save
from dni_tf.pipelined_dni import PipelinedDNIClassifier, PlacementError

TWO = ["/CPU:0", "/CPU:1"]
THREE = ["/CPU:0", "/CPU:1", "/CPU:0"]


def _data(n=48, dim=6, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.rand(n, dim).astype("float32"), rng.randint(0, classes, n).astype("int32")


def _compile(model, optimizer=None):
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2, epsilon=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _fcn(cls, layers=3, **kwargs):
    model = cls(fcn_layers(layers, 3, width=8, seed=3), 3, seed=3, **kwargs)
    model.build((None, 6))
    return _compile(model)


def _need_two_cpus():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("two logical CPU devices could not be configured")


def _fit(model, data, batch_size=16, epochs=1):
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch_size, drop_remainder=True)
    return model.fit(dataset, epochs=epochs, verbose=0, shuffle=False).history


def _assert_same(a_vars, b_vars, atol):
    a_vars, b_vars = list(a_vars), list(b_vars)
    assert len(a_vars) == len(b_vars)
    for a, b in zip(a_vars, b_vars):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol, rtol=0, err_msg=a.path)


# ----------------------------------------------------------------- equivalences
@pytest.mark.parametrize("method", ["dni", "cdni"])
def test_sequential_on_devices_equals_dniclassifier(method):
    """Block by block on two devices, no delay = the ordinary DNI step (Adam per block)."""
    _need_two_cpus()
    reference = _fcn(DNIClassifier, method=method)
    placed = _fcn(PipelinedDNIClassifier, method=method, execution="sequential", devices=THREE)
    data = _data()
    ref_history = _fit(reference, data, epochs=2)
    placed_history = _fit(placed, data, epochs=2)
    _assert_same(reference.net_layers[0].variables + reference.sg_modules[1].variables,
                 placed.net_layers[0].variables + placed.sg_modules[1].variables, 1e-5)
    _assert_same([v for layer in reference.net_layers for v in layer.variables],
                 [v for layer in placed.net_layers for v in layer.variables], 1e-5)
    _assert_same([v for m in reference.sg_modules for v in m.variables],
                 [v for m in placed.sg_modules for v in m.variables], 1e-5)
    np.testing.assert_allclose(ref_history["loss"], placed_history["loss"], rtol=1e-5)
    np.testing.assert_allclose(ref_history["sg_loss_2"], placed_history["sg_loss_2"], rtol=1e-4)


def test_one_block_pipelined_equals_backprop():
    reference = _fcn(DNIClassifier, method="backprop")
    pipelined = _fcn(PipelinedDNIClassifier, method="backprop", execution="pipelined",
                     batch_size=16)
    data = _data()
    _fit(reference, data)
    _fit(pipelined, data)
    assert len(pipelined.block_slices) == 1
    _assert_same(reference.trainable_variables, pipelined.trainable_variables, 1e-5)


def test_model_parallel_backprop_equals_backprop():
    _need_two_cpus()
    reference = _fcn(DNIClassifier, method="backprop")
    split = _fcn(PipelinedDNIClassifier, method="backprop", execution="sequential", devices=THREE)
    assert len(split.block_slices) == 3
    data = _data()
    ref_history = _fit(reference, data, epochs=2)
    split_history = _fit(split, data, epochs=2)
    _assert_same([v for layer in reference.net_layers for v in layer.variables],
                 [v for layer in split.net_layers for v in layer.variables], 1e-5)
    np.testing.assert_allclose(ref_history["loss"], split_history["loss"], rtol=1e-5)


# ----------------------------------------------------------------- hand reference
def _linear_net(seed=0):
    """Three bias-free linear layers 4 -> 5 -> 4 -> 3 (the last gives logits)."""
    return [keras.layers.Dense(units, use_bias=False, name=f"w{i}",
                               kernel_initializer=keras.initializers.GlorotUniform(seed + i))
            for i, units in enumerate((5, 4, 3))]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference_step(state, x, y, method, sg_scale, lr, classes=3):
    """One pipelined step of 3 blocks (one linear layer each) in numpy, plain SGD.

    state: W[0..2] layer kernels, A[1..2] / b[1..2] module kernel/bias (module
    k reads block k's input), buffers h[1..2], y[1..2], full[1..2].
    """
    n, batch = 3, x.shape[0]
    units = 1.0 if method == "dni" else float(batch)  # batch_mean for dni, per_example for cdni
    eye = np.eye(classes, dtype=np.float64)
    inputs = [x] + [state["h"][k] for k in (1, 2)]
    labels = [y] + [state["y"][k] for k in (1, 2)]
    valid = [True] + [bool(state["full"][k]) for k in (1, 2)]

    def module_input(h, lab):
        return np.concatenate([h, eye[lab]], axis=1) if method == "cdni" else h

    outputs, w_grads, targets = [], [], {}
    for j in range(n):
        out = inputs[j] @ state["W"][j]
        if j < n - 1:
            pred = module_input(out, labels[j]) @ state["A"][j + 1] + state["b"][j + 1]
            g_out = sg_scale * pred / units
            scale = units / sg_scale
        else:
            g_out = (_softmax(out) - eye[labels[j]]) / batch
            scale = units
        w_grads.append(inputs[j].T @ g_out)
        if j > 0:
            targets[j] = (g_out @ state["W"][j].T) * scale
        outputs.append(out)
    new = {key: dict(value) if isinstance(value, dict) else list(value)
           for key, value in state.items()}
    for k in (1, 2):
        inp = module_input(inputs[k], labels[k])
        g_pred = 2.0 * (inp @ state["A"][k] + state["b"][k] - targets[k]) / batch
        if valid[k]:
            new["A"][k] = state["A"][k] - lr * inp.T @ g_pred
            new["b"][k] = state["b"][k] - lr * g_pred.sum(axis=0)
    for j in range(n):
        if valid[j]:
            new["W"][j] = state["W"][j] - lr * w_grads[j]
    for k in (1, 2):
        new["h"][k], new["y"][k], new["full"][k] = outputs[k - 1], labels[k - 1], int(valid[k - 1])
    return new


@pytest.mark.parametrize("method,sg_scale", [("dni", 1.0), ("cdni", 0.5)])
def test_pipeline_delay_matches_hand_reference(method, sg_scale):
    """Block j works on the batch block j-1 saw one step earlier; warm-up steps do not update."""
    lr, batch = 0.5, 4
    model = PipelinedDNIClassifier(_linear_net(), 3, method=method, sg_scale=sg_scale,
                                   execution="pipelined", batch_size=batch, seed=1)
    model.build((None, 4))
    _compile(model, keras.optimizers.SGD(lr))
    state = {"W": [layer.kernel.numpy().astype(np.float64) for layer in model.net_layers],
             "A": {k: m.stack[-1].kernel.numpy().astype(np.float64)
                   for k, m in zip((1, 2), model.sg_modules)},
             "b": {k: m.stack[-1].bias.numpy().astype(np.float64)
                   for k, m in zip((1, 2), model.sg_modules)},
             "h": {1: np.zeros((batch, 5)), 2: np.zeros((batch, 4))},
             "y": {1: np.zeros(batch, int), 2: np.zeros(batch, int)},
             "full": {1: 0, 2: 0}}
    rng = np.random.RandomState(5)
    moved = set()
    for step in range(6):
        x = rng.randn(batch, 4).astype("float32")
        y = rng.randint(0, 3, batch).astype("int32")
        model.train_on_batch(x, y)
        new = _reference_step(state, x.astype(np.float64), y, method, sg_scale, lr)
        for j, layer in enumerate(model.net_layers):
            np.testing.assert_allclose(layer.kernel.numpy(), new["W"][j], atol=2e-5,
                                       err_msg=f"step {step} W{j}")
            if not np.array_equal(new["W"][j], state["W"][j]):
                moved.add(j)
        for k, module in zip((1, 2), model.sg_modules):
            np.testing.assert_allclose(module.stack[-1].kernel.numpy(), new["A"][k], atol=2e-5,
                                       err_msg=f"step {step} A{k}")
            np.testing.assert_allclose(module.stack[-1].bias.numpy(), new["b"][k], atol=2e-5,
                                       err_msg=f"step {step} b{k}")
            np.testing.assert_allclose(model.buffer_h[k - 1].numpy(), new["h"][k], atol=2e-5)
            np.testing.assert_array_equal(model.buffer_y[k - 1].numpy(), new["y"][k])
            assert int(model.buffer_full[k - 1].numpy()) == new["full"][k]
        if step == 0:
            # Only block 0 had an input; its module still predicts zero.
            assert moved == set()
        state = new
    assert moved == {0, 1, 2}  # the modules became non-zero, so every block learned
    assert [int(o.iterations.numpy()) for o in model.block_optimizers] == [6, 5, 4]
    assert int(model.optimizer.iterations.numpy()) == 6


@pytest.mark.parametrize("method,unlock", [("dni", "update"), ("cdni", "update"),
                                           ("cdni", "complete")])
def test_bfloat16_pipeline_follows_the_float32_pipeline(method, unlock):
    """Under mixed_bfloat16 the blocks compute in bfloat16; the modules, their
    targets and the buffers stay float32. Eight delayed SGD steps move every
    variable as the float32 pipeline does, up to bfloat16 rounding (a wrong scale
    or a dropped cast is far outside it)."""
    from mixed_precision_helpers import assert_moves_follow, built_under

    def make():
        targets = {"input_targets": "chained"} if unlock == "complete" else {}
        model = PipelinedDNIClassifier(fcn_layers(3, 3, width=8, seed=3), 3, method=method,
                                       execution="pipelined", batch_size=8, seed=3,
                                       unlock=unlock, **targets)
        model.build((None, 6))
        return _compile(model, keras.optimizers.SGD(0.1 if unlock == "update" else 0.01))

    reference = make()
    model = built_under("bfloat16", make)
    model.set_weights(reference.get_weights())
    assert {l.compute_dtype for l in model.net_layers if l.weights} == {"bfloat16"}
    assert all(m.compute_dtype == "float32" for m in model.sg_modules)
    assert all(b.dtype == "float32" for b in model.buffer_h)
    assert all(layer.compute_dtype == "float32" for m in model.input_models
               for layer in m._flatten_layers())
    x, y = _data(n=64)

    def train(m):
        for i in range(8 if unlock == "update" else 4):
            logs = m.train_on_batch(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8], return_dict=True)
            assert all(np.isfinite(v) for v in logs.values())
        return logs

    # Seen: at most 4.4% (the modules start at zero, so their first moves are small
    # and bfloat16's 0.4% per activation compounds over the delayed steps).
    assert_moves_follow(reference, model, train, limit=0.1, every_variable_moves=True)


# ----------------------------------------------------------------- concurrency in the graph
def _op_ancestors(op, memo):
    if op.name in memo:
        return memo[op.name]
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    memo[op.name] = seen
    return seen


def _cross_device_matmul_dependencies(model, batch, name_part=""):
    """MatMuls on /CPU:1 (with `name_part` in their name) that depend on a MatMul on /CPU:0."""
    spec = (tf.TensorSpec((batch, 6), tf.float32), tf.TensorSpec((batch,), tf.int32))
    graph = tf.function(model.train_step).get_concrete_function(spec).graph
    ops = graph.get_operations()
    cpu0_matmuls = {op.name for op in ops if op.type == "MatMul" and op.device.endswith("CPU:0")}
    assert cpu0_matmuls
    buffer_writes = {op.name for op in ops if op.type == "AssignVariableOp"
                     and "pipeline_" in "".join(t.name for t in op.inputs)}
    memo, bad = {}, []
    for op in ops:
        if op.device.endswith("CPU:1") and op.type == "MatMul" and name_part in op.name:
            if _op_ancestors(op, memo) & cpu0_matmuls:
                bad.append(op.name)
    return bad, buffer_writes


def test_pipelined_blocks_share_no_data_within_a_step():
    """No MatMul of block 1 (on /CPU:1) waits for one of block 0 (on /CPU:0)."""
    _need_two_cpus()
    pipelined = PipelinedDNIClassifier(fcn_layers(2, 3, width=8, seed=3), 3, method="cdni",
                                       execution="pipelined", devices=TWO, batch_size=16)
    pipelined.build((None, 6))
    _compile(pipelined)
    bad, _ = _cross_device_matmul_dependencies(pipelined, 16)
    assert bad == []
    # The same check sees the dependency of the sequential step.
    sequential = PipelinedDNIClassifier(fcn_layers(2, 3, width=8, seed=3), 3, method="cdni",
                                        execution="sequential", devices=TWO)
    sequential.build((None, 6))
    _compile(sequential)
    bad, _ = _cross_device_matmul_dependencies(sequential, 16)
    assert bad


def test_modules_on_the_consumer_device():
    """module_placement='consumer': same arithmetic; M_1 on /CPU:1; block 1's layers still free."""
    _need_two_cpus()
    data = _data()
    producer = _fcn(PipelinedDNIClassifier, layers=2, method="cdni", execution="pipelined",
                    devices=TWO, batch_size=16)
    consumer = _fcn(PipelinedDNIClassifier, layers=2, method="cdni", execution="pipelined",
                    devices=TWO, batch_size=16, module_placement="consumer")
    _fit(producer, data, epochs=2)
    _fit(consumer, data, epochs=2)
    _assert_same(producer.variables, consumer.variables, 1e-6)
    assert all(v.value.device.endswith("CPU:1") for v in consumer.sg_modules[0].variables)
    assert all(v.value.device.endswith("CPU:1") for v in consumer.module_optimizers[0].variables)
    bad, _ = _cross_device_matmul_dependencies(consumer, 16, name_part="layer_2")
    assert bad == []


# ----------------------------------------------------------------- placement
def test_blocks_live_on_their_devices():
    _need_two_cpus()
    model = _fcn(PipelinedDNIClassifier, layers=2, method="dni", execution="pipelined",
                 devices=TWO, batch_size=16)
    _fit(model, _data())
    assert all(v.value.device.endswith("CPU:0") for v in model.net_layers[0].variables)
    assert all(v.value.device.endswith("CPU:1") for v in model.net_layers[1].variables)
    assert all(v.value.device.endswith("CPU:0") for v in model.sg_modules[0].variables)
    assert all(v.value.device.endswith("CPU:1")
               for v in model.buffer_h + model.buffer_y + model.buffer_full)
    assert all(v.value.device.endswith("CPU:1") for v in model.block_optimizers[1].variables)


@pytest.mark.parametrize("devices,message", [
    (["/CPU:0"], "3 blocks need 3 devices, got 1"),
    (["/CPU:0", "/CPU:1", "/CPU:7"], "unknown device '/CPU:7'"),
    (["/CPU:0", "/GPU:3", "/CPU:1"], "unknown device '/GPU:3'"),
    (["/CPU:0", "/job:worker/task:1/device:CPU:0", "/CPU:1"], "unknown device"),
    (["/CPU:0", "not a device", "/CPU:1"], "not a device name"),
])
def test_bad_placement_is_one_clear_error(devices, message):
    _need_two_cpus()
    with pytest.raises(PlacementError, match=message) as info:
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni",
                               execution="pipelined", devices=devices, batch_size=16)
    assert "\n" not in str(info.value)


def test_refused_options():
    with pytest.raises(ValueError, match="needs batch_size"):
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni", execution="pipelined")
    with pytest.raises(ValueError, match="backprop cannot be pipelined"):
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="backprop", decouple=[1],
                               execution="pipelined", batch_size=16)
    with pytest.raises(ValueError, match="lambda_mix > 0"):
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni", lambda_mix=0.5,
                               execution="pipelined", batch_size=16)
    with pytest.raises(ValueError, match="input_targets='chained'"):
        PipelinedDNIClassifier(fcn_layers(3, 3, width=8), 3, method="dni", unlock="complete",
                               execution="pipelined", batch_size=16)


def test_study_config_checks():
    from dni_tf.studies.dni_feedforward import DNIConfig

    base = dict(layers=3, decouple=(2,), execution="pipelined")
    for kwargs, match in [(dict(method="backprop"), "backprop is locked"),
                          (dict(method="dni", diagnostics=True), "diagnostics not supported"),
                          (dict(method="dni", devices=("/CPU:0", "/CPU:1"), jit_compile=True),
                           "jit_compile with --devices"),
                          (dict(method="dni", execution="parallel"), "execution='parallel'"),
                          (dict(method="dni", cluster=True, devices=("/CPU:0", "/CPU:1")),
                           "cluster and --devices"),
                          (dict(method="dni", cluster=True, jit_compile=True),
                           "jit_compile with --devices")]:
        with pytest.raises(ValueError, match=match):
            DNIConfig(**{**base, **kwargs}).validate()
    DNIConfig(**base, method="cdni", devices=("/CPU:0", "/CPU:1")).validate()


def test_wrong_batch_size_fails():
    model = _fcn(PipelinedDNIClassifier, layers=2, method="dni", execution="pipelined",
                 batch_size=16)
    with pytest.raises(ValueError, match="batch_size=16"):
        _fit(model, _data(n=24), batch_size=8)  # static batch shape: refused when traced
    dataset = tf.data.Dataset.from_tensor_slices(_data(n=24)).batch(8)  # unknown batch size
    model = _fcn(PipelinedDNIClassifier, layers=2, method="dni", execution="pipelined",
                 batch_size=16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected shape"):
        model.fit(dataset, epochs=1, verbose=0)


# ----------------------------------------------------------------- checkpoints
def _all_state(model):
    optimizers = [model.optimizer, *model.block_optimizers, *model.module_optimizers]
    variables = list(model.variables) + [v for o in optimizers for v in o.variables]
    return {f"{i}:{v.path}": np.array(v.numpy()) for i, v in enumerate(variables)}


@pytest.mark.parametrize("options", [
    dict(method="cdni", execution="pipelined", batch_size=8, devices=THREE),
    dict(method="dni", execution="pipelined", batch_size=8, unlock="complete",
         input_targets="chained"),
])
def test_checkpoint_round_trip_mid_pipeline(options, tmp_path):
    """Save after 3 steps (buffers full), restore into a fresh model, 3 more = 6 uninterrupted."""
    _need_two_cpus()
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    data = _data(n=48)
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(8, drop_remainder=True)
    uninterrupted = _fcn(PipelinedDNIClassifier, **options)
    uninterrupted.fit(dataset, epochs=1, verbose=0)

    interrupted = _fcn(PipelinedDNIClassifier, **options)
    interrupted.fit(dataset.take(3), epochs=1, verbose=0)
    if "unlock" not in options:
        assert int(interrupted.buffer_full[-1].numpy()) == 1
        assert np.abs(interrupted.buffer_h[-1].numpy()).sum() > 0
    save(interrupted, path)
    keras.utils.set_random_seed(99)
    restored = PipelinedDNIClassifier(fcn_layers(3, 3, width=8, seed=11), 3, seed=11, **options)
    restored.build((None, 6))
    _compile(restored)
    build_for_restore(restored, next(iter(dataset)))
    restore(restored, path)
    state, restored_state = _all_state(interrupted), _all_state(restored)
    assert len(state) == len(restored_state)
    for (ka, va), (kb, vb) in zip(state.items(), restored_state.items()):
        np.testing.assert_array_equal(va, vb, err_msg=f"{ka} vs {kb}")
    restored.fit(dataset.skip(3), epochs=1, verbose=0)
    for (ka, va), (kb, vb) in zip(_all_state(uninterrupted).items(),
                                  _all_state(restored).items()):
        np.testing.assert_allclose(va, vb, atol=1e-6, rtol=0, err_msg=ka)


# ----------------------------------------------------------------- command line
def _cli(*args, workdir):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "experiments.dni_feedforward",
                           f"--workdir={workdir}", "--dataset=digits", "--layers=3",
                           "--decouple=2", "--steps=4", "--eval_every=2", "--batch_size=32",
                           *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_pipelined_on_two_cpu_devices(tmp_path):
    import json

    proc = _cli("--method=cdni", "--execution=pipelined", "--devices=/CPU:0,/CPU:1",
                workdir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run["config"]["execution"] == "pipelined"
    assert run["config"]["devices"] == ["/CPU:0", "/CPU:1"]
    assert run["metrics"]["steps"] == 4


# ----------------------------------------------------------------- a lost block
def _two_block_model(seed=3):
    return _fcn(PipelinedDNIClassifier, layers=2, method="cdni", execution="pipelined",
                devices=TWO, batch_size=8)


def test_lost_block_stops_while_the_others_train_and_rejoins_from_its_checkpoint(tmp_path):
    """Block 1 lost: block 0 trains on (frozen M_1); rejoin = block 1 from the checkpoint."""
    from dni_tf.pipelined_cluster import all_variables, lose_block, rejoin

    _need_two_cpus()
    path = os.path.join(tmp_path, "ckpt.weights.h5")
    dataset = tf.data.Dataset.from_tensor_slices(_data(n=48)).batch(8, drop_remainder=True)
    model = _two_block_model()
    model.fit(dataset.take(3), epochs=1, verbose=0)
    save(model, path)
    checkpoint = [v.numpy() for v in all_variables(model)]
    model.fit(dataset.skip(3).take(1), epochs=1, verbose=0)
    block1 = [v.numpy() for v in model.net_layers[1].variables]
    module = [v.numpy() for v in model.sg_modules[0].variables]
    block0 = [v.numpy() for v in model.net_layers[0].trainable_variables]

    lose_block(model, 1)
    model.fit(dataset.skip(4), epochs=1, verbose=0)
    for before, v in zip(block1, model.net_layers[1].variables):
        np.testing.assert_array_equal(before, v.numpy())  # no update from the lost block
    for before, v in zip(module, model.sg_modules[0].variables):
        np.testing.assert_array_equal(before, v.numpy())  # no targets, module unchanged
    assert all(np.abs(before - v.numpy()).max() > 0  # block 0 kept training
               for before, v in zip(block0, model.net_layers[0].trainable_variables))

    current = [v.numpy() for v in all_variables(model)]
    lost = {id(v) for v in model.net_layers[1].variables + model.block_optimizers[1].variables
            + model.buffer_h + model.buffer_y + model.buffer_full}
    back = rejoin(model, _two_block_model, path, reconnect=False)
    assert back.lost_blocks == []
    for old, value_now, value_ckpt, new in zip(all_variables(model), current, checkpoint,
                                               all_variables(back)):
        expected = value_ckpt if id(old) in lost else value_now
        np.testing.assert_array_equal(new.numpy(), expected, err_msg=old.path)
    back.fit(dataset, epochs=1, verbose=0)  # both blocks train again
    assert np.abs(back.net_layers[1].variables[0].numpy() - block1[0]).max() > 0


# ----------------------------------------------------------------- two processes
def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tests reading the one cluster run share an xdist group, so the run (two
# processes, about 45 s) happens once, not once per worker.
CLUSTER_GROUP = pytest.mark.xdist_group("pipelined_cluster")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """Runs tests/pipelined_cluster_chief.py once (it starts, kills, restarts worker task 1;
    then the study's run on that worker, killed and restarted inside fit())."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT

    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO_ROOT,
           "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})}
    out = str(tmp_path / "chief.npz")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests",
                                                        "pipelined_cluster_chief.py"), out],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".stderr", "w") as f:
        f.write(proc.stderr)
    return out


@CLUSTER_GROUP
def test_two_worker_processes_train_like_two_devices_in_one_process(cluster_run):
    """Block 1 on task 1 of a local cluster = block 1 on /CPU:1 here (TensorFlow's transport)."""
    import pipelined_cluster_chief as chief

    _need_two_cpus()
    out = cluster_run
    model = chief.make_model(TWO)
    for x, y in chief.data()[:6]:
        model.train_on_batch(x, y)
    remote = np.load(out)
    local = [v.numpy() for v in __import__("dni_tf.pipelined_cluster", fromlist=["x"])
             .all_variables(model)]
    assert len(remote.files) == len(local)
    for i, value in enumerate(local):
        np.testing.assert_allclose(remote[f"arr_{i}"], value, atol=1e-6, rtol=0)


@CLUSTER_GROUP
def test_two_worker_processes_train_like_two_devices_under_bfloat16(cluster_run):
    """The same under mixed_bfloat16: 16-bit blocks on both tasks, float32 modules."""
    import pipelined_cluster_chief as chief

    _need_two_cpus()
    local = chief.train_under_bfloat16(TWO, chief.data()[:6])
    assert "bfloat16" in {layer.compute_dtype for layer in local.net_layers[1]._flatten_layers()}
    remote = np.load(cluster_run + ".bf16.npz")
    values = chief.state(local)
    assert len(remote.files) == len(values)
    for i, value in enumerate(values):
        np.testing.assert_allclose(remote[f"arr_{i}"], value, atol=1e-6, rtol=0)
    float32 = np.load(cluster_run)  # and bfloat16 is not float32 in disguise
    assert max(np.abs(remote[f"arr_{i}"] - float32[f"arr_{i}"]).max()
               for i in range(len(values))) > 1e-4


@CLUSTER_GROUP
def test_killed_worker_others_keep_training_and_it_rejoins(cluster_run):
    import json

    out = cluster_run
    log = json.loads(open(out + ".json").read())
    assert log["step_after_kill"] != "succeeded"
    assert log["block0_trained_while_lost"] and log["module_frozen_while_lost"]
    assert log["lost_restored_from_checkpoint"] and log["survivors_kept"]
    assert log["lost_variables"] > 0 and log["block1_trains_after_rejoin"]


@CLUSTER_GROUP
def test_study_run_drops_a_killed_worker_and_rejoins_it_from_the_checkpoint(cluster_run):
    """run_single with cluster=True: LostWorkerHandler drops block 1, probes, rejoins in fit()."""
    import json

    log = json.loads(open(cluster_run + ".study.json").read())
    stderr = open(cluster_run + ".stderr").read()
    # Killed after step 6: step 7 fails, block 1 is dropped at step 6; block 0 trains on;
    # restarted two steps later, the probe brings it back from the step-4 checkpoint.
    assert [(e["event"], e["step"], e["blocks"]) for e in log["events"]] == [
        ("lost", 6, [1]), ("rejoined", log["restarted_at"], [1])]
    assert log["killed_after_step"] == 6 and log["block0_trained_while_lost"]
    assert log["rejoined_at"] == log["restarted_at"] and log["checkpoint_step"] == 4
    assert log["events"][1]["checkpoint_step"] == 4
    assert log["lost_variables"] == 11  # block 1's layer, its optimizer slots, the buffers
    assert log["lost_restored_from_checkpoint"] and log["survivors_kept"]
    assert log["block1_trains_after_rejoin"]
    assert log["steps"] == 30 and log["worker_losses"] == 1 and log["rejoins"] == 1
    assert log["blocks_alive"] == [[0, 2.0], [6, 1.0], [log["restarted_at"], 2.0]]
    assert "worker task 1 lost at step 6 (UnavailableError" in stderr
    assert "block 1 rejoined at step" in stderr and "(step 4)" in stderr


@CLUSTER_GROUP
def test_a_worker_failure_outside_the_step_resumes_from_the_checkpoint_in_process(cluster_run):
    """An error the handler cannot see (here: a callback reading block 1 after its worker
    died) ends fit(); run_single waits for the worker, reconnects and resumes from the
    step-15 checkpoint in the same process, with every variable as checkpointed."""
    import json

    log = json.loads(open(cluster_run + ".restart.json").read())
    assert log["read_after_kill"] != "succeeded" and log["traceback_written"]
    assert log["restarts"] == 1 and log["steps"] == 30 and log["history_steps"] == [15, 30]
    restarted = [e for e in log["events"] if e["event"] == "restarted"]
    assert len(restarted) == 1 and restarted[0]["resumed_from"] == 15
    assert log["restored_equals_checkpoint"]


def test_an_error_surfacing_when_the_step_logs_are_read_reaches_the_handler(tmp_path):
    """A step that failed midway can leave an op pending on the dead worker; its error
    surfaces at the next read once the worker is back. The handler reads each step's
    logs itself, so that error is handled (rejoin, retry) instead of ending fit()."""
    import types

    from dni_tf.harness.lost_workers import LostWorkerHandler

    class PendingOnDeadWorker:
        def numpy(self):
            raise tf.errors.AbortedError(None, None, "Unable to find a context_id matching "
                                         "the specified one (7). Perhaps the worker was restarted")

    calls, rejoins = [], []
    tf.zeros(())  # the eager context exists in any real run

    def inner(batches):
        calls.append(batches)
        return {"loss": PendingOnDeadWorker() if len(calls) == 1 else tf.constant(0.5)}

    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    handler.set_model(types.SimpleNamespace(lost_blocks=[1]))  # block 1 already lost
    handler._inner = inner
    handler._lose = lambda exc, seconds: False  # no further block to drop
    handler._try_rejoin = lambda: rejoins.append(len(calls)) or True
    logs = handler._guarded_step(iter(tf.data.Dataset.range(5)))
    assert logs == {"loss": np.float32(0.5)} and len(calls) == 2 and rejoins == [1]
    # The retry trains on the next batch (the failed step's batch is skipped).
    assert [[int(b) for b in batches] for batches in calls] == [[0], [1]]


def test_a_step_cancelled_by_a_lost_worker_does_not_end_the_epochs_input(tmp_path):
    """A step cancelled while it waits on the input cancels a tf.data iterator it reads
    from: the prefetch thread stops and, once the buffer is drained, the input ends
    (OutOfRangeError, which Keras takes for the end of the data, so fit() went on to
    evaluate without the lost block). The handler reads each batch itself and hands the
    step the batch, so the step it retries and those after it get the next batches.

    `inner` behaves like Keras' train function: given an iterator it reads the batch in
    the (compiled) step, given a list it runs the step on the batch. The first call is
    cancelled mid-step, as a worker dying during the step cancels it."""
    import threading
    import time
    import types

    from tensorflow.python.eager import cancellation

    from dni_tf.harness.lost_workers import LostWorkerHandler

    def slow(x):
        time.sleep(0.5 if x == 0 else 0.05)  # the first step waits on its input for sure
        return x

    data = tf.data.Dataset.range(100).map(
        lambda x: tf.py_function(slow, [x], tf.int64)).prefetch(2)
    on_iterator = tf.function(lambda iterator: iterator.get_next())
    on_batch = tf.function(lambda batch: tf.identity(batch))
    # Traced before the input starts, so the cancellation comes while the read waits.
    on_iterator.get_concrete_function(tf.data.IteratorSpec(data.element_spec))
    on_batch.get_concrete_function(tf.TensorSpec([], tf.int64))
    calls = []

    def inner(arg):
        step, args = ((on_iterator, arg) if isinstance(arg, tf.data.Iterator)
                      else (on_batch, arg[0]))
        calls.append(arg)
        if len(calls) > 1:
            return {"x": step(args)}
        manager = cancellation.CancellationManager()
        cancelable = manager.get_cancelable_function(step.get_concrete_function(args))
        threading.Timer(0.02, manager.start_cancel).start()
        cancelable(args)
        raise tf.errors.CancelledError(None, None, "the worker died during the step")

    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    handler.set_model(types.SimpleNamespace(lost_blocks=[]))
    handler._inner = inner
    handler._lose = lambda exc, seconds: handler.model.lost_blocks.append(1) or True
    iterator = iter(data)
    first = handler._guarded_step(iterator)  # the cancelled step, retried
    later = [handler._guarded_step(iterator) for _ in range(4)]
    assert [int(logs["x"]) for logs in [first, *later]] == [1, 2, 3, 4, 5]


def test_the_guarded_step_trains_like_keras_own_step_on_the_iterator(tmp_path):
    """Handed one batch at a time, Keras' compiled train step trains exactly as it does
    reading the iterator itself: same losses, same weights (a Keras change to how its
    train function treats a list would show here, not only in the cluster tests)."""
    import types

    from dni_tf.harness.lost_workers import LostWorkerHandler

    rng = np.random.RandomState(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.rand(40, 5).astype("float32"), rng.randint(0, 3, 40))).batch(8)

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        net.compile(optimizer=keras.optimizers.Adam(0.1),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        net.make_train_function()
        return net

    plain, guarded = model(), model()
    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    handler.set_model(types.SimpleNamespace(lost_blocks=[]))
    handler._inner = guarded.train_function
    plain_iterator, guarded_iterator = iter(data), iter(data)
    for _ in range(5):
        expected = plain.train_function(plain_iterator)
        logs = handler._guarded_step(guarded_iterator)
        np.testing.assert_allclose(logs["loss"], expected["loss"].numpy(), rtol=0, atol=0)
    for a, b in zip(plain.weights, guarded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(StopIteration):  # the end of the data ends the epoch, as in Keras
        handler._guarded_step(guarded_iterator)
def test_the_handler_refuses_several_steps_per_call(tmp_path):
    """It drops a dead worker's block between steps, so it must see every step."""
    import types

    from dni_tf.harness.lost_workers import LostWorkerHandler

    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    handler.set_model(types.SimpleNamespace(devices=["/job:worker/task:0"], lost_blocks=[],
                                            steps_per_execution=2))
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        handler.on_train_begin()


def test_a_worker_lost_during_a_checkpoint_save_is_waited_for_and_the_save_redone(
        tmp_path, monkeypatch):
    """ResumableCheckpoint guarded by LostWorkerHandler.retry_after_rejoin: a save that
    fails because a worker died drops its block, waits for the rejoin and saves again
    (a whole checkpoint, no temporary left); an error naming no lost task still ends it."""
    import types

    from dni_tf.harness import callbacks as callbacks_lib
    from dni_tf.harness.lost_workers import LostWorkerHandler

    real_save, saves, waits = callbacks_lib.save, [], []

    def save_failing_once(model, path, step=None):
        saves.append(path)
        if len(saves) == 1:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise tf.errors.UnavailableError(None, None, "Socket closed")
        real_save(model, path, step=step)

    monkeypatch.setattr(callbacks_lib, "save", save_failing_once)
    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    handler.set_model(types.SimpleNamespace(lost_blocks=[]))
    handler._lose = lambda exc, seconds: handler.model.lost_blocks.append(1) or True
    handler._wait_for_rejoin = lambda what: waits.append(what) or handler.model.lost_blocks.clear()
    checkpoint = callbacks_lib.ResumableCheckpoint(str(tmp_path / "ckpt"),
                                                   guard=handler.retry_after_rejoin)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0)
    assert len(saves) == 2 and waits == ["the checkpoint save"]
    ((epochs, path),) = callbacks_lib.ResumableCheckpoint.checkpoints(str(tmp_path / "ckpt"))
    assert epochs == 1 and callbacks_lib.verify(path) is None
    assert os.listdir(tmp_path / "ckpt") == [os.path.basename(path)]

    handler._lose = lambda exc, seconds: False  # the error names no task of the cluster
    saves.clear()
    with pytest.raises(tf.errors.UnavailableError):
        checkpoint.on_epoch_end(1)
    assert len(saves) == 1 and waits == ["the checkpoint save"]
    assert os.listdir(tmp_path / "ckpt") == [os.path.basename(path)]


def test_the_train_begin_rejoin_checkpoint_counts_as_step_0(tmp_path):
    """A rejoin from the checkpoint written at train begin reports step 0 (not -1)."""
    from dni_tf.harness.lost_workers import REJOIN_CHECKPOINT, LostWorkerHandler

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    save(model, str(tmp_path / REJOIN_CHECKPOINT), step=0)
    handler = LostWorkerHandler(lambda: None, str(tmp_path))
    assert handler.newest_checkpoint() == (str(tmp_path / REJOIN_CHECKPOINT), 0)


@pytest.mark.parametrize("tf_config,message", [
    (None, "--cluster: TF_CONFIG is not set"),
    ("{not json", "--cluster: TF_CONFIG cannot be read"),
    ({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}},
     "--cluster: the cluster has 1 'worker' tasks (127.0.0.1:1), 2 blocks need 2 (3 layers)"),
    ({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}},
     "--cluster: this process must be task 0 of the 'worker' job"),
])
def test_cluster_config_checks(tf_config, message, monkeypatch):
    """--cluster: TF_CONFIG is read (not connected to) and refused in one line (PlacementError)."""
    import json

    from dni_tf.studies.dni_feedforward import DNIConfig, check_cluster

    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config if isinstance(tf_config, str)
                           else json.dumps(tf_config))
    config = DNIConfig(layers=3, decouple=(2,), method="cdni", execution="pipelined", cluster=True)
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        check_cluster(config, [3])
    assert "\n" not in str(info.value)


def test_cli_cluster_without_the_needed_tasks_exits_2(tmp_path, monkeypatch):
    """--cluster checks TF_CONFIG before training: one line, exit 2, nothing written."""
    import json

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    proc = _cli("--execution=pipelined", "--cluster", workdir=tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert "--cluster: the cluster has 1 'worker' tasks" in line
    assert proc.stderr.strip().endswith(line)
    assert not (tmp_path / "run").exists()
