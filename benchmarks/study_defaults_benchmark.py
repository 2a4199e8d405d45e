r"""The studies' default execution options before and after the fast path became the default.

    python -m benchmarks.study_defaults_benchmark [--studies=gradient_drop,threshold_updates,dni]
                                                   [--rounds=4] [--steps=60]

One process. For each study the model is built by the study's own builder from
its default config (with `--steps`/`--eval_every` chosen so that auto gives
k = `--k`), once with the previous defaults (`--jit_compile=false
--steps_per_execution=1`) and once with today's (auto / auto), on the same
batch. Both are timed in interleaved rounds with `fit` on a repeated batch,
the fastest round kept, on wall time and this process's CPU time; the ratio
old / new is printed (on a shared machine the CPU-time ratio is the steadier).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STUDIES = ("gradient_drop", "threshold_updates", "dni")


def builders(k: int):
    """{study: (config with auto options, build(config) -> compiled model, batch)}."""
    from dni_tf.studies import dni_feedforward, gradient_drop, threshold_updates

    rng = np.random.RandomState(0)

    def images(batch, shape=(28, 28, 1)):
        return (rng.rand(batch, *shape).astype("float32"),
                rng.randint(0, 10, batch).astype("int32"))

    def threshold_build(config):
        config.apply_mixed_precision()
        network = threshold_updates.build_classifier(config, _Data())
        fast = config.resolve(network)
        model = threshold_updates.ThresholdUpdates(network, threshold=1e-3, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], **fast.compile_kwargs())
        return model

    return {
        "gradient_drop": (
            gradient_drop.GradientDropConfig(steps=10 * k, eval_every=k),
            lambda c: gradient_drop.build_model(c, 0.5, (28, 28, 1), 10), images(50)),
        "threshold_updates": (
            threshold_updates.ThresholdSweepConfig(steps=10 * k, eval_every=k),
            threshold_build, images(64)),
        "dni": (
            dni_feedforward.DNIConfig(steps=10 * k, eval_every=k, lr_boundaries=()),
            lambda c: dni_feedforward.build_model(c, (28, 28, 1), 10), images(256)),
    }


class _Data:
    image_shape, num_classes = (28, 28, 1), 10


def time_fit(model, batch, steps: int):
    """(wall s, CPU s) per step of `steps` fit steps on a repeated batch."""
    data = tf.data.Dataset.from_tensors(batch).repeat()
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=",".join(STUDIES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="steps per round (a multiple of k)")
    parser.add_argument("--k", type=int, default=20, help="eval_every, so auto k = min(k, 50)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    table = builders(args.k)
    for study in args.studies.split(","):
        auto_config, build, batch = table[study]
        old_config = dataclasses.replace(auto_config, jit_compile=False, steps_per_execution=1)
        models = {"old defaults": build(old_config), "new defaults": build(auto_config)}
        for model in models.values():
            time_fit(model, batch, args.steps)  # trace / compile
        best = {name: (float("inf"), float("inf")) for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                wall, cpu = time_fit(model, batch, args.steps)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        new = models["new defaults"]
        print(f"== {study}: new defaults jit_compile={new.jit_compile}, "
              f"steps_per_execution={new.steps_per_execution}; best of {args.rounds} x "
              f"{args.steps} steps")
        for name, (wall, cpu) in best.items():
            print(f"  {name:14s} {wall * 1e3:8.2f} ms/step wall {cpu * 1e3:8.2f} ms/step cpu")
        (ow, oc), (nw, nc) = best["old defaults"], best["new defaults"]
        print(f"  old / new: wall {ow / nw:.2f}x, cpu {oc / nc:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
