r"""Throughput and accuracy of pipelined DNI against its baselines, same placement.

    python -m benchmarks.pipelined_dni_benchmark [--devices=2 --intra_op=1 --inter_op=2]

Emulates `--devices` devices of `--intra_op` core(s) each: the CPU is split
into that many logical devices (`tf.config.set_logical_device_configuration`),
each op may use `--intra_op` threads and up to `--inter_op` ops run at once.
The network is the paper's MNIST FCN (`--layers` layers of `--width` units,
BN, ReLU) split into blocks at `--decouple`, block j on "/CPU:j".

Part 1, throughput: the compiled train step (the `tf.function` fit() uses)
of each execution on one fixed batch of real MNIST images, timed in
interleaved rounds (so load from other processes hits all alike), median
over rounds. Per execution: examples/s, the ratio to model-parallel backprop,
and the process CPU time / wall time while timing (about 1 when the blocks
run one after the other on one core, up to the number of devices when they
run concurrently, if the machine has the cores free), and "ops overlap": the
share of the time any op runs during which ops run on two or more executor
threads at once (from a tf.profiler trace of `--trace_steps` steps; this says
whether TensorFlow scheduled ops concurrently, whatever the load), and
"blocks overlap": the time the layers of blocks 0 and 1 (their forward and
gradient ops, found by the layer names in the trace) are both running, as a
share of the shorter of the two: about 0 for locked blocks, up to 100% when
TensorFlow runs the two blocks at once.
Executions:
  backprop_mp      model-parallel backprop (locked), blocks on the devices
  dni_sequential   sequential (c)DNI, the same placement
  dni_pipelined    pipelined (c)DNI, the same placement
  dni_unplaced     DNIClassifier's own step, no placement (reference)

Part 2 (`--accuracy_epochs > 0`): test accuracy after the same number of
examples (epochs of MNIST, batch `--batch_size`, Adam `--learning_rate`) of
sequential and pipelined (c)DNI, seeds `--seeds`.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("devices", 2, "Logical CPU devices (one block each).")
flags.DEFINE_boolean("cluster", False, "Instead of logical CPU devices: --devices worker "
                     "processes on 127.0.0.1 (this one is task 0, the others are started with "
                     "--intra_op threads), block j on /job:worker/task:j (TF_CONFIG, gRPC).")
flags.DEFINE_integer("intra_op", 1, "Threads one op may use (intra-op parallelism).")
flags.DEFINE_integer("inter_op", 2, "Ops that may run at once (inter-op parallelism).")
flags.DEFINE_integer("layers", 6, "FCN layers (the last is the classifier).")
flags.DEFINE_integer("width", 256, "Units per hidden layer.")
flags.DEFINE_list("decouple", ["2"], "Decoupling points (block boundaries), devices-1 of them.")
flags.DEFINE_enum("method", "cdni", ["dni", "cdni"], "DNI variant.")
flags.DEFINE_enum("module_placement", "consumer", ["producer", "consumer"],
                  "Device of each synthetic gradient module: the block below or above its point.")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_integer("steps", 60, "Timed steps per execution, in --rounds interleaved rounds.")
flags.DEFINE_integer("rounds", 6, "Interleaved timing rounds.")
flags.DEFINE_list("executions", ["backprop_mp", "dni_sequential", "dni_pipelined", "dni_unplaced"],
                  "Executions to time; the first is the baseline of the ratio column.")
flags.DEFINE_integer("trace_steps", 5, "Steps per execution profiled for the overlap column "
                     "(0 = skip).")
flags.DEFINE_integer("accuracy_epochs", 0, "Epochs of MNIST for the accuracy comparison (0 = skip).")
flags.DEFINE_list("seeds", ["1"], "Seeds of the accuracy comparison.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (accuracy comparison).")
flags.DEFINE_string("data_dir", None, "Directory with mnist/; default $DNI_TF_DATA_DIR.")
FLAGS = flags.FLAGS


def start_cluster():
    """Starts tasks 1.. of a local cluster; connects this process as task 0; their devices."""
    import atexit
    import json
    import socket
    import subprocess
    import sys

    from dni_tf import pipelined_cluster

    ports = []
    for _ in range(FLAGS.devices):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    for task in range(1, FLAGS.devices):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": task}})}
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "dni_tf.pipelined_cluster", f"--threads={FLAGS.intra_op}",
             "--exit_with_parent"], env=env))
    atexit.register(lambda: [w.kill() for w in workers])
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                          "task": {"type": "worker", "index": 0}})
    return pipelined_cluster.connect(FLAGS.devices)


def configure_devices():
    """Splits the CPU and sets the thread pools; must run before TensorFlow starts."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op)
    if FLAGS.cluster:
        return start_cluster()
    from dni_tf.pipelined_dni import split_cpu

    split_cpu(FLAGS.devices)
    return [f"/CPU:{i}" for i in range(FLAGS.devices)]


def build(execution, devices, seed=0):
    import keras

    from dni_tf.dni_feedforward import DNIClassifier, fcn_layers
    from dni_tf.pipelined_dni import PipelinedDNIClassifier

    keras.utils.set_random_seed(seed)
    decouple = [int(k) for k in FLAGS.decouple]
    layers = fcn_layers(FLAGS.layers, 10, width=FLAGS.width, seed=seed,
                        point="pre_relu" if FLAGS.method == "dni" else "post_relu")
    if execution == "dni_unplaced":
        model = DNIClassifier(layers, 10, method=FLAGS.method, decouple=decouple, seed=seed)
    elif execution == "backprop_mp":
        model = PipelinedDNIClassifier(layers, 10, method="backprop", decouple=decouple,
                                       execution="sequential", devices=devices, seed=seed)
    else:
        model = PipelinedDNIClassifier(
            layers, 10, method=FLAGS.method, decouple=decouple, seed=seed, devices=devices,
            execution="pipelined" if execution == "dni_pipelined" else "sequential",
            batch_size=FLAGS.batch_size, module_placement=FLAGS.module_placement)
    model.build((None, 28, 28, 1))
    model.compile(optimizer=keras.optimizers.Adam(FLAGS.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _union(intervals):
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _length(intervals):
    return sum(end - start for start, end in intervals)


def _intersect(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append([start, end])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def op_overlap(step, iterator, steps):
    """Share of the time any TensorFlow op runs during which ops run on 2+ threads at once.

    Profiles `steps` calls of `step` (tf.profiler) and reads the op events of
    the executor threads ("tf_Compute"). Under time-slicing by the OS two ops
    "running at once" may still share one core: this measures whether
    TensorFlow scheduled the blocks concurrently; cpu/wall measures whether
    the machine gave them cores.
    """
    import glob
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="pipelined_trace_")
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        logs = step(iterator)
    float(logs["loss"])
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    import re

    bounds = [int(k) for k in FLAGS.decouple]
    threads, blocks = [], {}
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            ops = []
            for e in line.events:
                name = plane.event_metadata[e.metadata_id].name
                if ":" not in name:
                    continue
                interval = [e.offset_ps, e.offset_ps + e.duration_ps]
                ops.append(interval)
                layer = re.search(r"/layer_(\d+)", name)
                if layer:  # the network's own layers (forward and gradient ops)
                    block = sum(int(layer.group(1)) > b for b in bounds)
                    blocks.setdefault(block, []).append(interval)
            if ops:
                threads.append(_union(ops))
    busy = _union([iv for t in threads for iv in t])
    both = _union([iv for a in range(len(threads)) for b in range(a + 1, len(threads))
                   for iv in _intersect(threads[a], threads[b])])
    block_overlap = float("nan")
    if len(blocks) >= 2:
        first, second = _union(blocks.get(0, [])), _union(blocks.get(1, []))
        block_overlap = _length(_intersect(first, second)) / max(
            1, min(_length(first), _length(second)))
    return _length(both) / max(1, _length(busy)), len(threads), block_overlap


def flops_by_device(model, x, y):
    """{device: FLOPs of one train step placed there}, counted on the traced graph.

    The TensorFlow profiler counts MatMul/Conv2D and their gradients; ops
    without an explicit device count under "".
    """
    import tensorflow as tf

    fn = tf.function(model.train_step).get_concrete_function(
        (tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype)))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(fn.graph, options=options)
    totals = {}

    def visit(node):
        for child in node.children:
            try:
                device = fn.graph.get_operation_by_name(child.name).device
            except (KeyError, ValueError):
                device = "?"
            if device:
                spec = tf.DeviceSpec.from_string(device)
                device = (f"task:{spec.task}/" if spec.job else "") + \
                    f"{spec.device_type}:{spec.device_index}"
            totals[device] = totals.get(device, 0) + child.float_ops
            visit(child)

    visit(profile)
    return totals


def throughput(devices, images):
    import tensorflow as tf

    x = tf.constant(images.train[0][:FLAGS.batch_size])
    y = tf.constant(images.train[1][:FLAGS.batch_size].astype("int32"))
    prepared, flops = {}, {}
    for execution in FLAGS.executions:
        model = build(execution, devices)
        try:
            flops[execution] = flops_by_device(model, x, y)
        except Exception:  # the profiler is optional here
            flops[execution] = {}
        model.make_train_function()
        iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        for _ in range(5):  # trace + warm up (fills the pipeline)
            logs = model.train_function(iterator)
        float(logs["loss"])
        prepared[execution] = (model.train_function, iterator)
    per_round = max(1, FLAGS.steps // FLAGS.rounds)
    times = {e: [] for e in FLAGS.executions}
    usage = {e: [] for e in FLAGS.executions}
    for _ in range(FLAGS.rounds):
        for execution, (step, iterator) in prepared.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                logs = step(iterator)
            float(logs["loss"])  # one host read per round
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[execution].append(wall / per_round)
            usage[execution].append(cpu / wall)
    where = (f"{FLAGS.devices} worker processes on 127.0.0.1" if FLAGS.cluster
             else f"{FLAGS.devices} logical CPU devices")
    print(f"MNIST FCN {FLAGS.layers} layers x {FLAGS.width}, {FLAGS.method}, decouple "
          f"{','.join(FLAGS.decouple)}, modules on the {FLAGS.module_placement}, batch {FLAGS.batch_size}; {where}, intra_op={FLAGS.intra_op}, inter_op={FLAGS.inter_op}; {os.cpu_count()} "
          f"CPUs visible, load average {os.getloadavg()[0]:.2f} at the end; median of "
          f"{FLAGS.rounds} interleaved rounds of {per_round} steps")
    overlap = {e: op_overlap(*prepared[e], FLAGS.trace_steps) if FLAGS.trace_steps else
               (float("nan"), 0, float("nan")) for e in FLAGS.executions}
    print(f"{'execution':>15} {'ms/step':>8} {'examples/s':>11} {'x ' + FLAGS.executions[0]:>16} "
          f"{'cpu/wall':>9} {'ops overlap':>12} {'blocks overlap':>15} {'threads':>8}   "
          f"MFLOP/step by device")
    base = statistics.median(times[FLAGS.executions[0]])
    for execution in FLAGS.executions:
        seconds = statistics.median(times[execution])
        print(f"{execution:>15} {1e3 * seconds:8.2f} {FLAGS.batch_size / seconds:11.0f} "
              f"{base / seconds:16.2f} {statistics.median(usage[execution]):9.2f} "
              f"{100 * overlap[execution][0]:11.0f}% {100 * overlap[execution][2]:14.0f}% "
              f"{overlap[execution][1]:8d}   "
              + ", ".join(f"{d or 'unplaced'}: {f / 1e6:.0f}"
                          for d, f in sorted(flops[execution].items())), flush=True)
    # The bound on the speed-up with one free core per device: the busiest
    # device's arithmetic against the baseline's whole step.
    base_total = sum(flops[FLAGS.executions[0]].values())
    if base_total:
        print(f"arithmetic bound with one free core per device (baseline FLOPs / busiest "
              f"device's FLOPs): " + ", ".join(
                  f"{e} {base_total / max(flops[e].values()):.2f}x" for e in FLAGS.executions
                  if flops[e] and e in ("dni_sequential", "dni_pipelined")))
        print("(backprop_mp and dni_sequential cannot reach their bound: block j+1's forward "
              "waits for block j's; only pipelined blocks are independent)")


def accuracy(devices, images):
    import numpy as np

    steps_per_epoch = len(images.train[1]) // FLAGS.batch_size
    print(f"\nTest accuracy after {FLAGS.accuracy_epochs} epochs ({steps_per_epoch} steps of "
          f"{FLAGS.batch_size} each), {FLAGS.method}, Adam {FLAGS.learning_rate}")
    print(f"{'seed':>5} {'sequential':>11} {'pipelined':>10} {'difference':>11}")
    rows = []
    for seed in [int(s) for s in FLAGS.seeds]:
        result = []
        for execution in ("dni_sequential", "dni_pipelined"):
            model = build(execution, devices, seed)
            model.fit(images.train_dataset(FLAGS.batch_size, seed=seed, repeat=False),
                      epochs=FLAGS.accuracy_epochs, verbose=0)
            logs = model.evaluate(images.test_dataset(1000), verbose=0, return_dict=True)
            result.append(100.0 * logs["accuracy"])
        rows.append(result)
        print(f"{seed:>5} {result[0]:11.2f} {result[1]:10.2f} {result[1] - result[0]:11.2f}",
              flush=True)
    mean = np.mean(rows, axis=0)
    print(f"{'mean':>5} {mean[0]:11.2f} {mean[1]:10.2f} {mean[1] - mean[0]:11.2f}")


def main(argv):
    del argv
    devices = configure_devices()
    if len(FLAGS.decouple) != FLAGS.devices - 1:
        raise app.UsageError(f"--decouple needs {FLAGS.devices - 1} points for --devices="
                             f"{FLAGS.devices}, got {len(FLAGS.decouple)}")
    from dni_tf import data as data_lib

    images = data_lib.load_image_data("mnist", FLAGS.data_dir)
    throughput(devices, images)
    if FLAGS.accuracy_epochs > 0:
        accuracy(devices, images)


if __name__ == "__main__":
    app.run(main)
