r"""Gradient dropping sweep: one training run per keep_prob.

Source: the write-up *Effective learning while misplacing gradient updates*.

    python -m experiments.gradient_drop --workdir=/tmp/gd \
        --keep_probs=1.0,0.8,0.5,0.2 --steps=20000 --dataset=mnist

Writes `keep_prob_<p>/` run directories (results.json, history.csv, TensorBoard,
checkpoints), and beside them the combined history.csv, summary.csv/.md,
results.json and the figures results_raw.png / results_prorated.png. Rerunning
the same command resumes.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.studies.gradient_drop import GradientDropConfig, run_sweep

cli.define_study_flags(GradientDropConfig)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    sweep = config.from_flags(GradientDropConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    with cli.distributed(workdir) as workdir:
        run_sweep(sweep, workdir, extra_config={"flags": cli.flag_values()})


if __name__ == "__main__":
    cli.run(main)
