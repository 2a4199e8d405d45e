r"""Every study's training step against a plain Keras step, and this machine's peak.

    python -m benchmarks.all [--quick] [--studies=gradient_dropping,threshold_updates,dni,
                                                  dni_parity_epoch] [--steps_per_execution=K]

One process. For each study: the step time of the algorithm with the package's
defaults (`dni_tf.harness.fast_path`: XLA where it pays off), a plain Keras `fit` step
of the same network on the same batch with Keras' defaults, and with the
same execution options as the algorithm; their ratios; the achieved GFLOP/s
of the algorithm's network FLOPs (forward + backward, 3x the forward's
multiply-adds x 2) and the fraction of this machine's fp32 matmul peak
(2048x2048, measured in the same run; bf16 peak printed too).

Contenders are timed in interleaved rounds and the fastest round is kept, on
wall time and on this process's CPU time; on a machine shared with other
work the CPU-time ratio is the steadier one. Targets (issue "fast by
default"): gradient dropping every configuration <= 1.05x the plain step,
threshold updates with XLA <= 1.3x, and the parity MLP's epoch (dni_parity_epoch)
<= 0.4x a public PyTorch implementation's on the same machine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dni_tf import models  # noqa: E402
from dni_tf.harness import fast_path, timing  # noqa: E402

STUDIES = ("gradient_dropping", "threshold_updates", "dni", "dni_parity_epoch")
# Seconds per 938-step epoch of the parity MLP (issue "fast by default"), measured
# on the same 2-core machine with a public PyTorch implementation, and the target.
PYTORCH_EPOCH_SECONDS = {"dni": 5.3, "cdni": 6.4}
EPOCH_TARGET = 0.4


def matmul_peak(dtype, n=2048, seconds=1.0) -> float:
    """GFLOP/s of an n x n matmul in `dtype` (best of repeated timed batches)."""
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    mm = tf.function(lambda a: tf.reduce_sum(tf.cast(tf.matmul(a, a)[0, :1], tf.float32)))
    mm(a).numpy()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        for _ in range(3):
            out = mm(a)
        out.numpy()
        took = (time.perf_counter() - start) / 3
        best, spent = min(best, took), spent + 3 * took
    return 2 * n**3 / best / 1e9


def train_flops_per_example(network) -> float:
    """3 x (2 x multiply-adds) of the forward pass of Dense/Conv2D layers."""
    flops = 0
    for layer in network._flatten_layers():
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            k_h, k_w, c_in, _ = layer.kernel.shape
            flops += 2 * h * w * c_out * k_h * k_w * c_in
        elif isinstance(layer, keras.layers.Dense):
            flops += 2 * int(np.prod(layer.kernel.shape))
    return 3 * flops


class Contender:
    """A compiled model, its train function and a repeating one-batch iterator."""

    def __init__(self, model, batch, optimizer, jit_compile, steps_per_execution):
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        self.model, self.spe = model, steps_per_execution
        model.make_train_function()
        self.iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
        self.wall = self.cpu = float("inf")

    def run(self, steps):
        calls = max(1, steps // self.spe)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            logs = self.model.train_function(self.iterator)
        float(logs["loss"])
        n = calls * self.spe
        return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def race(contenders, steps, rounds):
    for c in contenders.values():  # trace, compile, warm up
        c.run(2 * c.spe)
    for _ in range(rounds):
        for c in contenders.values():
            wall, cpu = c.run(steps)
            c.wall, c.cpu = min(c.wall, wall), min(c.cpu, cpu)


def judged_clock() -> str:
    """The clock ratios are judged on: process CPU time on a CPU-only machine (steadier
    when other work shares it), wall time where a GPU runs the steps (the host's CPU
    time does not see the kernels)."""
    return "wall" if tf.config.list_physical_devices("GPU") else "cpu"


def report(title, contenders, flops_per_step, peak, targets):
    """Prints one table; `targets`: {name: (baseline name, max ratio)}."""
    keras_plain = contenders["plain Keras fit"]
    clock = judged_clock()
    print(f"\n== {title}", flush=True)
    print(f"{'contender':34s} {'ms/step':>8s} {'cpu ms':>8s} {'x Keras':>8s} "
          f"{'x same-opt':>10s} {'GFLOP/s':>8s} {'of peak':>7s}  target ({clock} time)")
    for name, c in contenders.items():
        base_name, limit = targets.get(name, (None, None))
        time_of = lambda contender: getattr(contender, clock)  # noqa: E731
        same = time_of(c) / time_of(contenders[base_name]) if base_name else float("nan")
        gflops = flops_per_step / c.wall / 1e9
        verdict = "" if limit is None else (
            f"<= {limit}x {'met' if same <= limit else 'NOT met'} ({clock})")
        print(f"{name:34s} {1e3 * c.wall:8.2f} {1e3 * c.cpu:8.2f} "
              f"{time_of(c) / time_of(keras_plain):8.2f} {same:10.2f} {gflops:8.1f} "
              f"{gflops / peak:7.1%}  {verdict}")


def gradient_dropping(args, peak):
    from dni_tf.gradient_dropping import GradientDropping
    rng = np.random.RandomState(0)
    batch = (rng.rand(50, 28, 28, 1).astype("float32"), rng.randint(0, 10, 50).astype("int32"))
    jit, _ = fast_path.resolve_jit_compile(None, models.tutorial_cnn())
    spe = args.steps_per_execution

    def adam():
        return keras.optimizers.Adam(1e-4)

    contenders = {
        "plain Keras fit": Contender(models.tutorial_cnn(), batch, adam(), "auto", 1),
        f"plain, jit={jit} spe={spe}": Contender(models.tutorial_cnn(), batch, adam(), jit, spe)}
    configs = [("variable", "zero_gradient"), ("variable", "freeze"), ("layer", "freeze"),
               ("worker", "freeze"), ("element", "zero_gradient"), ("element", "freeze")]
    if args.quick:
        configs = [("variable", "zero_gradient"), ("element", "freeze")]
    for granularity, state in configs:
        contenders[f"{granularity}, {state}"] = Contender(
            GradientDropping(models.tutorial_cnn(), 0.5, granularity, dropped_state=state, seed=0),
            batch, adam(), jit, spe)
    race(contenders, args.steps, args.rounds)
    flops = train_flops_per_example(contenders["plain Keras fit"].model) * 50
    report(f"gradient dropping: tutorial CNN, batch 50, Adam, keep_prob 0.5; "
           f"default jit_compile={jit}, steps_per_execution={spe}", contenders, flops, peak,
           {name: ("plain Keras fit", 1.05) for name in list(contenders)[2:]})


def threshold_updates(args, peak):
    from dni_tf.threshold_updates import ThresholdUpdates
    hidden = (1000, 1000, 500, 200)
    rng = np.random.default_rng(0)
    batch = (rng.random((128, 28, 28, 1)).astype("float32"),
             rng.integers(0, 10, 128).astype("int32"))
    jit, _ = fast_path.resolve_jit_compile(None, models.mlp(hidden=hidden))
    spe = args.steps_per_execution
    plain_same = f"plain, jit={jit} spe={spe}"
    contenders = {
        "plain Keras fit": Contender(models.mlp(hidden=hidden), batch,
                                     keras.optimizers.SGD(0.01), "auto", 1),
        plain_same: Contender(models.mlp(hidden=hidden), batch, keras.optimizers.SGD(0.01),
                              jit, spe),
        "sum, statistics every step": Contender(
            ThresholdUpdates(models.mlp(hidden=hidden), threshold=1e-3), batch,
            keras.optimizers.SGD(0.01), jit, spe),
        "sum, statistics every 10": Contender(
            ThresholdUpdates(models.mlp(hidden=hidden), threshold=1e-3, statistics_every=10),
            batch, keras.optimizers.SGD(0.01), jit, spe)}
    race(contenders, args.steps, args.rounds)
    flops = train_flops_per_example(contenders["plain Keras fit"].model) * 128
    report(f"threshold updates: MLP 784-1000-1000-500-200-10, batch 128, SGD; "
           f"default jit_compile={jit}, steps_per_execution={spe}", contenders, flops, peak,
           {name: (plain_same, 1.3) for name in list(contenders)[2:]})


def _method_contenders(make, batch, learning_rate, jit, spe, suffix=""):
    """Plain Keras fit (the backprop model, Keras' defaults), then backprop, dni and
    cdni with the given execution options; `make(method)` builds each model."""
    contenders = {"plain Keras fit": Contender(make("backprop"), batch,
                                               keras.optimizers.Adam(learning_rate), "auto", 1)}
    for method in ("backprop", "dni", "cdni"):
        contenders[method + suffix] = Contender(
            make(method), batch, keras.optimizers.Adam(learning_rate), jit, spe)
    return contenders


def dni(args, peak):
    from dni_tf.dni_feedforward import build_classifier
    rng = np.random.default_rng(0)
    batch = (rng.random((256, 28, 28, 1)).astype("float32"),
             rng.integers(0, 10, 256).astype("int32"))
    spe = args.steps_per_execution

    def make(method):
        return build_classifier("fcn", 4, (28, 28, 1), 10, method=method)

    jit, _ = fast_path.resolve_jit_compile(None, make("backprop"))
    contenders = _method_contenders(make, batch, 1e-4, jit, spe, f", jit={jit} spe={spe}")
    race(contenders, args.steps, args.rounds)
    flops = train_flops_per_example(contenders["cdni, jit=%s spe=%d" % (jit, spe)].model) * 256
    report(f"feed-forward DNI: FCN 4 x 256, every layer decoupled, batch 256, Adam; "
           f"'plain Keras fit' is the backprop DNIClassifier with Keras' defaults; "
           f"GFLOP/s count every Dense layer, modules included", contenders, flops, peak,
           {f"{m}, jit={jit} spe={spe}": (f"backprop, jit={jit} spe={spe}", None)
            for m in ("dni", "cdni")})


def dni_parity_epoch(args, peak):
    """The parity MLP of docs/dni_feedforward.md: seconds per 938-step epoch of batch
    64 with the package's defaults (XLA, several steps per call, no diagnostics),
    against the public PyTorch implementation's times on the same machine."""
    from dni_tf.dni_feedforward import build_classifier
    rng = np.random.default_rng(0)
    batch = (rng.random((64, 28, 28, 1)).astype("float32"),
             rng.integers(0, 10, 64).astype("int32"))
    spe = args.steps_per_execution

    def make(method):
        return build_classifier("fcn", 3, (28, 28, 1), 10, method=method, decouple=[2],
                                sg_hidden_layers=1, sg_units=256)

    jit, _ = fast_path.resolve_jit_compile(None, make("backprop"))
    contenders = _method_contenders(make, batch, 1e-3, jit, spe)
    race(contenders, args.steps, args.rounds)
    flops = train_flops_per_example(contenders["cdni"].model) * 64
    report(f"parity MLP 784-256-256-10, one decoupling point, batch 64, Adam; "
           f"jit_compile={jit}, steps_per_execution={spe}", contenders, flops, peak,
           {m: ("backprop", None) for m in ("dni", "cdni")})
    for method, torch_seconds in PYTORCH_EPOCH_SECONDS.items():
        c = contenders[method]
        for clock, per_step in (("wall", c.wall), ("cpu", c.cpu)):
            seconds = 938 * per_step
            verdict = "met" if seconds <= EPOCH_TARGET * torch_seconds else "NOT met"
            print(f"{method} epoch (938 steps, {clock}): {seconds:.2f} s = "
                  f"{seconds / torch_seconds:.2f}x PyTorch's {torch_seconds} s; "
                  f"target <= {EPOCH_TARGET}x: {verdict}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, steps and configurations (about a minute)")
    parser.add_argument("--studies", default=",".join(STUDIES))
    parser.add_argument("--steps_per_execution", type=int, default=0,
                        help="steps per call; 0: the package's default (auto: 50 here)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds")
    args = parser.parse_args()
    args.steps_per_execution = (args.steps_per_execution
                                or fast_path.default_steps_per_execution(()))
    args.steps = args.steps or (1 if args.quick else 2) * args.steps_per_execution
    args.rounds = args.rounds or (3 if args.quick else 6)
    studies = args.studies.split(",")
    unknown = set(studies) - set(STUDIES)
    if unknown:
        parser.error(f"--studies: unknown {sorted(unknown)}; choose from {', '.join(STUDIES)}")
    tf.get_logger().setLevel("ERROR")
    start = time.perf_counter()
    peak32 = matmul_peak(tf.float32)
    peak16 = matmul_peak(tf.bfloat16)
    print(f"machine: {timing.machine_description()}; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}")
    print(f"matmul peak (2048^2): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s; "
          f"best of {args.rounds} interleaved rounds x {args.steps} steps")
    for study in studies:
        # Re-measured before each study, best kept: on a shared machine a
        # single measurement can catch a busy moment.
        peak32 = max(peak32, matmul_peak(tf.float32, seconds=0.5))
        globals()[study](args, peak32)
    print(f"\nfp32 matmul peak, best of the run: {peak32:.0f} GFLOP/s "
          f"(fractions above use the best known when each study ran); "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
