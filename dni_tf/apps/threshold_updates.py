"""Threshold-triggered, unsynchronised updates (*Backprop without synchronization*, 2016): a sweep over T.

    python -m experiments.threshold_updates --workdir=/tmp/tu \\
        --thresholds=0,1e-4,1e-3,1e-2 --accumulation=sum [--sparse_backward] \\
        [--max_delay=4] --dataset=mnist --model=mlp --steps=3000

Each threshold trains in `workdir/threshold_<T>/` (history.csv, TensorBoard,
checkpoints, results.json; a rerun resumes). Beside them: `summary.csv/.md`
(one row per T), `curves.csv` (accuracy against steps and against weight
updates applied), `curves.png` and `accuracy_vs_sparsity.png`, and
`results.json` with every flag and the per-threshold metrics.
"""

from __future__ import annotations

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

import os

from absl import flags

from dni_tf.harness import cli
from dni_tf.data import IMAGE_DATASETS
from dni_tf.studies.threshold_updates import (MODELS, OPTIMIZERS, ThresholdSweepConfig,
                                              run_sweep)
from dni_tf.threshold_updates import ACCUMULATIONS

cli.define_common_flags()
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory (sweep root).")
flags.DEFINE_list("thresholds", ["0", "1e-4", "1e-3", "1e-2"], "Thresholds T >= 0.")
flags.DEFINE_enum("accumulation", "sum", ACCUMULATIONS, "Accumulation strategy.")
flags.DEFINE_float("decay", 0.9, "Accumulator decay per step (accumulation=decay).")
flags.DEFINE_float("clip", 0.0, "Bound on a fired element's emitted value; 0 = no clipping.")
flags.DEFINE_float("noise_stddev", 0.0, "Std of Gaussian noise added to each gradient element.")
flags.DEFINE_bool("sparse_backward", False,
                  "Only units with a fired incoming weight pass their error down.")
flags.DEFINE_integer("max_delay", 0, "Per-layer random delay d in [0, max_delay] steps.")
flags.DEFINE_integer("statistics_every", 1, "Compute notify_fraction, acc_norm and cancelled_fraction on every k-th step only (faster; update counts stay exact).")
flags.DEFINE_enum("dataset", "mnist", IMAGE_DATASETS, "Image dataset.")
flags.DEFINE_enum("model", "mlp", MODELS, "mlp, or cnn (the tutorial CNN).")
flags.DEFINE_list("hidden", ["256", "256"], "MLP hidden layer widths.")
flags.DEFINE_enum("optimizer", "sgd", OPTIMIZERS, "Base optimizer (momentum: SGD with 0.9).")
flags.DEFINE_float("learning_rate", 0.1, "Base optimizer learning rate.")
flags.DEFINE_integer("steps", 3000, "Training steps per threshold.")
flags.DEFINE_integer("eval_every", 500, "Evaluate every this many steps and at the last step.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order, noise and delays.")
flags.DEFINE_float("target_accuracy", 0.9, "Report the weight updates needed to reach this.")
flags.DEFINE_string("data_dir", None, "Dataset files (default: $DNI_TF_DATA_DIR).")


def main(argv):
    del argv
    config = cli.config_from_flags(ThresholdSweepConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    with cli.distributed(workdir) as workdir:
        run_sweep(config, workdir, extra_config={"flags": cli.flag_values()})


if __name__ == "__main__":
    cli.run(main)
