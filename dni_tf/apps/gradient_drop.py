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

from dni_tf.harness import cli
from dni_tf.data import IMAGE_DATASETS
from dni_tf.gradient_dropping import DROPPED_STATES, GRANULARITIES
from dni_tf.studies.gradient_drop import GradientDropConfig, run_sweep

flags.DEFINE_list("keep_probs", ["1.0", "0.8", "0.5", "0.2"],
                  "Probabilities in [0, 1] of keeping each gradient part; one run per value.")
flags.DEFINE_enum("granularity", "variable", GRANULARITIES,
                  "What is kept or dropped together: a variable (the write-up), a layer, "
                  "each element, or a simulated worker's share.")
flags.DEFINE_integer("num_workers", 4, "Simulated machines for --granularity=worker.")
flags.DEFINE_boolean("rescale", False, "Multiply kept gradients by 1/keep_prob.")
flags.DEFINE_enum("dropped_state", "zero_gradient", DROPPED_STATES,
                  "zero_gradient: the optimizer gets a zero gradient (the write-up's method); "
                  "freeze: a dropped variable and its optimizer slots are untouched.")
flags.DEFINE_enum("dataset", "mnist", IMAGE_DATASETS, "Image dataset.")
flags.DEFINE_string("data_dir", None, "Directory with mnist/ etc.; default $DNI_TF_DATA_DIR.")
flags.DEFINE_integer("steps", 20000, "Training batches per run.")
flags.DEFINE_integer("batch_size", 50, "Training batch size.")
flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate.")
flags.DEFINE_integer("eval_every", 500, "Evaluate on the test set every this many steps.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and masks.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    keep_probs = cli.parse_floats("keep_probs", FLAGS.keep_probs, 0.0, 1.0)
    config = GradientDropConfig(
        keep_probs=keep_probs, granularity=FLAGS.granularity, num_workers=FLAGS.num_workers,
        rescale=FLAGS.rescale, dropped_state=FLAGS.dropped_state, dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, eval_every=FLAGS.eval_every, seed=FLAGS.seed)
    try:
        config.validate()
    except ValueError as exc:
        raise cli.UsageError(f"--{exc}") from None
    workdir = cli.prepare_workdir(FLAGS.workdir)
    with cli.distributed(workdir) as workdir:
        run_sweep(config, workdir, extra_config={"flags": cli.flag_values()})


if __name__ == "__main__":
    cli.run(main)
