r"""Copy / Repeat Copy with truncated BPTT, DNI or DNI + Aux (Jaderberg et al. 2016, 3.2).

    python -m experiments.copy_task --workdir=/tmp/copy --task=copy --method=dni \
        --truncation=3 --hidden_size=64 --steps=3000 --batch_size=32

A curriculum lengthens the sequences by one whenever the mean error over the last
--check_every batches falls below --threshold bits per sequence; results.json
reports `max_length_solved`, history.csv the curriculum position per evaluation.
`--table` runs every --table_methods x --table_truncations configuration in
`<method>_T<T>/` and writes table.csv / table.md / table.png (rerun resumes).
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli
from dni_tf.data.sequence_tasks import TASKS
from dni_tf.studies.recurrent_dni import CopyTaskConfig, run_copy_task, run_table
from dni_tf.truncated_bptt import METHODS

_D = CopyTaskConfig()
flags.DEFINE_string("task", _D.task, f"One of {', '.join(TASKS)}.")
flags.DEFINE_string("method", _D.method, f"One of {', '.join(METHODS)}.")
flags.DEFINE_integer("truncation", _D.truncation, "Truncation window T >= 1 (time steps).")
flags.DEFINE_integer("hidden_size", _D.hidden_size, "LSTM units.")
flags.DEFINE_integer("steps", _D.steps, "Training batches.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Sequences per batch.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("clip_norm", _D.clip_norm, "Gradient-norm clip, applied to the core and "
                   "the synthetic gradient module separately (0 = none).")
flags.DEFINE_integer("num_bits", _D.num_bits, "Bits per vector.")
flags.DEFINE_integer("min_length", _D.min_length, "First curriculum length.")
flags.DEFINE_integer("max_length", _D.max_length, "Longest curriculum length.")
flags.DEFINE_integer("max_repeats", _D.max_repeats, "Repeat Copy: the repeats curriculum's cap.")
flags.DEFINE_float("threshold", _D.threshold, "Solved when mean bit errors per sequence < this.")
flags.DEFINE_integer("check_every", _D.check_every, "Curriculum check period (batches).")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every this many steps.")
flags.DEFINE_integer("eval_batches", _D.eval_batches, "Held-out batches per evaluation.")
flags.DEFINE_float("sg_scale", _D.sg_scale, "Scale of synthetic gradients entering the core.")
flags.DEFINE_float("aux_weight", _D.aux_weight, "Weight of the dni_aux auxiliary loss.")
flags.DEFINE_float("bootstrap_scale", _D.bootstrap_scale, "Scale of the next synthetic "
                   "gradient inside the module's regression target (1 = the paper's target).")
flags.DEFINE_string("update", _D.update, "per_window (an optimizer step every T steps) or "
                    "per_batch (windows' gradients summed, one step per batch).")
flags.DEFINE_string("episodes", _D.episodes, "stream (state carried from episode to episode, "
                    "the paper's setting) or reset (every episode from a zero state).")
flags.DEFINE_string("sampling", _D.sampling, "uniform (each batch's length, and repeats, drawn "
                    "up to the curriculum's) or current (always the curriculum's).")
flags.DEFINE_boolean("diagnostics", _D.diagnostics, "Log per-window cosine and norm ratio of "
                     "the synthetic gradient vs full BPTT's future gradient (dni, dni_aux).")
flags.DEFINE_integer("seed", _D.seed, "Seed for initialisation and data.")
flags.DEFINE_boolean("table", False, "Run the method x T table instead of one run.")
flags.DEFINE_list("table_methods", list(METHODS), "Methods for --table.")
flags.DEFINE_list("table_truncations", ["2", "3", "4", "5", "8"], "Truncations for --table.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = cli.config_from_flags(CopyTaskConfig)
    methods = cli.parse_choices("table_methods", FLAGS.table_methods, METHODS)  # distinct: one folder each
    truncations = cli.parse_ints("table_truncations", FLAGS.table_truncations, 1)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        if FLAGS.table:
            run_table(run_copy_task, config, workdir, methods, truncations,
                      "max_length_solved", extra_config=extra, curve="train_bit_errors")
        else:
            run_copy_task(config, workdir, extra_config=extra)


if __name__ == "__main__":
    cli.run(main)
