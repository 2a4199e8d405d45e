"""Step time of ThresholdUpdates against the base optimizer's plain fit() step.

    python benchmarks/threshold_updates_benchmark.py [--steps=100] [--repeats=3] [--variants=dense]

Both run in this process on the same synthetic MNIST-shaped batches through
`fit()`; the printed ratio is ThresholdUpdates / plain (target for the dense
accumulator rule, `accumulation=sum`, no sparse backward, no delay: <= 1.3x).
The other rows (statistics on every 10th step, normalized, sparse backward,
delays) are informational; `--variants=dense` keeps the two plain `sum` rows.
Repeats are interleaved and the fastest of each is kept, which makes the ratio
robust to other load on the machine.
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from dni_tf import models
from dni_tf.threshold_updates import ThresholdUpdates

VARIANTS = {
    "sum (dense accumulators)": dict(threshold=1e-3),
    "sum, statistics every 10": dict(threshold=1e-3, statistics_every=10),
    "normalized + clip + noise": dict(threshold=1e-3, accumulation="normalized", clip=0.1,
                                      noise_stddev=1e-4),
    "sum + sparse backward": dict(threshold=1e-3, sparse_backward=True),
    "sum + max_delay=4": dict(threshold=1e-3, max_delay=4),
}

DENSE_RULE = ("sum (dense accumulators)", "sum, statistics every 10")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--hidden", default="1000,1000,500,200")
    parser.add_argument("--variants", choices=("all", "dense"), default="all",
                        help="dense: only the dense-accumulator rule against plain fit")
    parser.add_argument("--jit_compile", action="store_true",
                        help="compile every contender with XLA (fuses the elementwise rule)")
    args = parser.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size * 8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, len(x)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size).repeat().prefetch(2)

    def compiled(model):
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=args.jit_compile)
        model.fit(data, steps_per_epoch=10, epochs=1, verbose=0)  # trace + warm up
        return model

    contenders = {"plain fit (base SGD)": compiled(models.mlp(hidden=hidden))}
    for name, kwargs in VARIANTS.items():
        if args.variants == "dense" and name not in DENSE_RULE:
            continue
        contenders[name] = compiled(ThresholdUpdates(models.mlp(hidden=hidden), **kwargs))
    best = {name: float("inf") for name in contenders}
    for _ in range(args.repeats):
        for name, model in contenders.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    base = best["plain fit (base SGD)"]
    print(f"MLP 784-{'-'.join(map(str, hidden))}-10, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats (fastest kept), "
          f"jit_compile={args.jit_compile}")
    for name, seconds in best.items():
        print(f"{name:28s} {1000 * seconds:8.2f} ms/step  ratio {seconds / base:5.2f}x")
    for name in DENSE_RULE:
        ratio = best[name] / base
        print(f"{name}: {ratio:.2f}x the base fit step "
              f"(target <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
