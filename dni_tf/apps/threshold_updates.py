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

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.studies.threshold_updates import ThresholdSweepConfig, run_sweep

cli.define_study_flags(ThresholdSweepConfig)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    sweep = config.from_flags(ThresholdSweepConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    with cli.distributed(workdir) as workdir:
        run_sweep(sweep, workdir, extra_config={"flags": cli.flag_values()})


if __name__ == "__main__":
    cli.run(main)
