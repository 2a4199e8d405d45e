r"""Copy / Repeat Copy with truncated BPTT, DNI or DNI + Aux (Jaderberg et al. 2016, 3.2).

    python -m experiments.copy_task --workdir=/tmp/copy --task=copy --method=dni \
        --truncation=3 --hidden_size=64 --steps=3000 --batch_size=32

A curriculum lengthens the sequences by one whenever the mean error over the last
--check_every batches falls below --threshold bits per sequence; results.json
reports `max_length_solved`, history.csv the curriculum position per evaluation.
Several --method and/or --truncation values (the paper's table:
`--method=bptt,dni,dni_aux --truncation=2,3,4,5,8`) run every combination in
`<method>_T<T>/` and write table.csv / table.md / table.png (rerun resumes).
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.studies.recurrent_dni import CopyTaskConfig, run_copy_task, run_grid

cli.define_study_flags(CopyTaskConfig)
cli.define_fork_flag()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    run = config.from_flags(CopyTaskConfig)
    grid = config.grid_from_flags(CopyTaskConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    cli.fork_if_asked(workdir, grid)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        run_grid(run_copy_task, run, workdir, grid, "max_length_solved", extra,
                 curve="train_bit_errors")


if __name__ == "__main__":
    cli.run(main)
