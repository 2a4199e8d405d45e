r"""Two-clock multi-network system (Jaderberg et al. 2016, section 3.3).

    python -m experiments.multi_network --workdir=/tmp/multi --tick_ratio=4 --method=dni

Episodes of k*k MNIST digits (k = --tick_ratio). Network A says odd/even for
every digit and sends a message every step; network B ticks every k steps on
A's last k messages and counts the 3s since the episode began (it needs its
memory). --method=dni: A is updated every step, its gradient from B being the
synthetic gradient at the A-to-B interface; B every k steps. --method=backprop:
the episode is unrolled and both are updated once per episode.
Several --method and/or --tick_ratio values (e.g. `--method=backprop,dni
--tick_ratio=2,4,8`) run every combination, each in `<method>_k<k>/`, and write
table.csv / table.md / table.png (rerun resumes).
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.studies.multi_network import MultiNetworkConfig, run_comparison, run_multi_network

cli.define_study_flags(MultiNetworkConfig)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    run = config.from_flags(MultiNetworkConfig)
    grid = config.grid_from_flags(MultiNetworkConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        if len(grid["method"]) * len(grid["tick_ratio"]) > 1:
            run_comparison(run, workdir, grid["method"], grid["tick_ratio"], extra)
        else:
            run_multi_network(run, workdir, extra)


if __name__ == "__main__":
    cli.run(main)
