"""Start-up cost: the first `fit()` call (trace + one step), traced once against twice.

    python -m benchmarks.first_fit_benchmark [--rounds=3]

Without a distribution strategy Keras 3.15 creates optimizer slots and compiled
metrics inside the first trace of the train step, and tf.function then traces
the whole step a second time. The package's models build that state first
(`dni_tf.core.BuildsBeforeTracing`). This times, in one process, the first
`fit()` of a fresh model of two study-sized setups with the package's behaviour
and with Keras' own (the mixin's hook switched back to `keras.Model`'s), in
interleaved rounds, fastest kept:

  copy dni_aux   TruncatedBPTT, LSTM 256, T=3, 21-step Copy batch of 32 (graph mode)
  mnist cdni     the feed-forward DNI study's FCN 4x256 cDNI, batch 256, XLA
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dni_tf import core  # noqa: E402
from dni_tf.dni_feedforward import build_classifier  # noqa: E402
from dni_tf.truncated_bptt import TruncatedBPTT  # noqa: E402


def copy_dni_aux():
    model = TruncatedBPTT(8, 3, method="dni_aux", hidden_size=256, seed=0)
    model.build((None, None, 9))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.RandomState(0)
    batch = (rng.rand(32, 21, 9).astype("float32"),
             (rng.rand(32, 21, 8) > 0.5).astype("float32"), np.ones((32, 21), "float32"))
    return model, tf.data.Dataset.from_tensors(batch)


def mnist_cdni():
    model = build_classifier("fcn", 4, (28, 28, 1), 10, seed=0, width=256, method="cdni")
    model.compile(optimizer=keras.optimizers.Adam(3e-5), metrics=["accuracy"], jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.RandomState(0)
    batch = (rng.rand(256, 28, 28, 1).astype("float32"), rng.randint(0, 10, 256))
    return model, tf.data.Dataset.from_tensors(batch)


SETUPS = {"copy dni_aux": copy_dni_aux, "mnist cdni": mnist_cdni}


def first_fit_seconds(make) -> float:
    keras.utils.set_random_seed(0)
    model, data = make()
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    package_hook = core.BuildsBeforeTracing._maybe_symbolic_build
    hooks = {"once": package_hook, "twice": keras.Model._maybe_symbolic_build}
    for name, make in SETUPS.items():
        times = {mode: [] for mode in hooks}
        try:
            for i in range(args.rounds):
                for mode in (("once", "twice") if i % 2 == 0 else ("twice", "once")):
                    core.BuildsBeforeTracing._maybe_symbolic_build = hooks[mode]
                    times[mode].append(first_fit_seconds(make))
        finally:
            core.BuildsBeforeTracing._maybe_symbolic_build = package_hook
        once, twice = min(times["once"]), min(times["twice"])
        print(f"{name:14s} first fit(): traced once {once:6.2f} s, twice {twice:6.2f} s, "
              f"ratio {once / twice:.2f}", flush=True)


if __name__ == "__main__":
    main()
