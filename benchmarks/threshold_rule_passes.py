"""Why the threshold rule costs what it costs: the elementwise work alone, under XLA.

    python -m benchmarks.threshold_rule_passes [--rounds=5] [--calls=100] [--dump=DIR]

Times, in one process (interleaved rounds, fastest kept; process CPU time on a
CPU-only machine, wall time on a GPU), the
update part of a step on the weights of the threshold benchmark's MLP
(784-1000-1000-500-200-10, 2.4M weights), each compiled with XLA:

  plain SGD         w <- w - lr g                                     (reads g, w; writes w)
  rule, no count    total = acc + g; fire where |total| > T; w and acc updated
  rule + count      the same and the fired count (one reduction), as ThresholdUpdates does

On a memory-bound CPU the ratios count passes over the weights. With `--dump`
XLA's optimised HLO is written there (`*after_optimizations.txt`), which shows
how the compiler split the rule into fusions (docs/performance.md, "Threshold
updates").
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHAPES = [(784, 1000), (1000,), (1000, 1000), (1000,), (1000, 500), (500,), (500, 200),
          (200,), (200, 10), (10,)]
THRESHOLD, LEARNING_RATE = 1e-3, 0.01


def contenders(tf):
    """name -> XLA-compiled function of no arguments doing one update on fixed tensors."""
    weights = [tf.Variable(tf.random.normal(s, seed=1) * 0.01) for s in SHAPES]
    accumulators = [tf.Variable(tf.zeros(s)) for s in SHAPES]
    gradients = [tf.random.normal(s, seed=2) * 1e-3 for s in SHAPES]

    def plain():
        for w, g in zip(weights, gradients):
            w.assign_sub(LEARNING_RATE * g)
        return tf.constant(0.0)

    def rule(count):
        counts = []
        for w, acc, g in zip(weights, accumulators, gradients):
            total = acc + g
            fired = tf.abs(total) > THRESHOLD
            if count:  # as ThresholdUpdates._fired_sum: 0 * total makes a NaN visible
                counts.append(tf.reduce_sum(tf.cast(fired, tf.float32) + 0.0 * total))
            w.assign_sub(tf.where(fired, LEARNING_RATE * total, 0.0))
            acc.assign(tf.where(fired, 0.0, total))
        return tf.add_n(counts) if counts else tf.constant(0.0)

    return {"plain SGD": tf.function(plain, jit_compile=True),
            "rule, no count": tf.function(lambda: rule(False), jit_compile=True),
            "rule + count": tf.function(lambda: rule(True), jit_compile=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--dump", default="", help="write XLA's optimised HLO to this folder")
    args = parser.parse_args()
    if args.dump:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text")
    import tensorflow as tf

    functions = contenders(tf)
    for function in functions.values():
        function().numpy()  # compile
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    best = {name: [float("inf"), float("inf")] for name in functions}  # wall, CPU
    for _ in range(args.rounds):
        for name, function in functions.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.calls):
                result = function()
            result.numpy()  # waits for the device
            times = (time.perf_counter() - wall, time.process_time() - cpu)
            best[name] = [min(b, t / args.calls) for b, t in zip(best[name], times)]
    # On a GPU the host's CPU time says nothing about the kernels: judge wall time there.
    judged = 0 if on_gpu else 1
    base = best["plain SGD"][judged]
    print(f"{sum(math.prod(s) for s in SHAPES):,} weights on {'GPU' if on_gpu else 'CPU'}; "
          f"ms per update (wall, process CPU), fastest of {args.rounds} rounds x {args.calls}; "
          f"ratio on {'wall' if on_gpu else 'CPU'} time")
    for name, (wall, cpu) in best.items():
        print(f"{name:16s} {1000 * wall:7.2f} {1000 * cpu:7.2f} ms  "
              f"{(wall, cpu)[judged] / base:5.2f}x plain SGD")

if __name__ == "__main__":
    main()
