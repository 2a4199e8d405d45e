r"""Two-clock multi-network system (Jaderberg et al. 2016, section 3.3).

    python -m experiments.multi_network --workdir=/tmp/multi --tick_ratio=4 --method=dni

Episodes of k*k MNIST digits (k = --tick_ratio). Network A says odd/even for
every digit and sends a message every step; network B ticks every k steps on
A's last k messages and counts the 3s since the episode began (it needs its
memory). --method=dni: A is updated every step, its gradient from B being the
synthetic gradient at the A-to-B interface; B every k steps. --method=backprop:
the episode is unrolled and both are updated once per episode.
`--compare` runs --compare_methods for each of --compare_tick_ratios and writes
table.csv / table.md / table.png (rerun resumes).
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli
from dni_tf.multi_network import METHODS
from dni_tf.studies.multi_network import MultiNetworkConfig, run_comparison, run_multi_network

_D = MultiNetworkConfig()
flags.DEFINE_integer("tick_ratio", _D.tick_ratio, "k: B ticks once every k steps of A (>= 1).")
flags.DEFINE_string("method", _D.method, f"One of {', '.join(METHODS)}.")
flags.DEFINE_integer("hidden_a", _D.hidden_a, "LSTM units of A.")
flags.DEFINE_integer("hidden_b", _D.hidden_b, "LSTM units of B.")
flags.DEFINE_integer("message_size", _D.message_size, "Width of A's message to B.")
flags.DEFINE_string("sg_context", _D.sg_context,
                    "dni: what M reads besides A's message: none, or count (the one-hot "
                    "target count of B's tick, cDNI).")
flags.DEFINE_integer("steps", _D.steps, "Training batches of episodes.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Episodes per batch.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("sg_learning_rate", _D.sg_learning_rate,
                   "dni: Adam learning rate of M (0: --learning_rate).")
flags.DEFINE_integer("eval_every", _D.eval_every,
                     "Evaluate on test episodes every this many steps.")
flags.DEFINE_integer("digits", _D.digits, "If > 0: train on this many digits (replaces "
                     "--steps: steps = digits // (batch_size * k * k), the same data for every k).")
flags.DEFINE_integer("eval_digits", _D.eval_digits,
                     "If > 0: evaluate every this many training digits (replaces --eval_every).")
flags.DEFINE_string("dataset", _D.dataset, "mnist, fashion_mnist or digits.")
flags.DEFINE_string("data_dir", None, "Directory with mnist/; default $DNI_TF_DATA_DIR.")
flags.DEFINE_integer("seed", _D.seed, "Seed.")
flags.DEFINE_boolean("compare", False, "Run the method x tick-ratio comparison.")
flags.DEFINE_list("compare_methods", list(METHODS), "Methods for --compare.")
flags.DEFINE_list("compare_tick_ratios", ["2", "4", "8"], "Tick ratios for --compare.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = cli.config_from_flags(MultiNetworkConfig)
    methods = cli.parse_choices("compare_methods", FLAGS.compare_methods, METHODS)  # distinct: one folder each
    ratios = cli.parse_ints("compare_tick_ratios", FLAGS.compare_tick_ratios, 1)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        if FLAGS.compare:
            run_comparison(config, workdir, methods, ratios, extra)
        else:
            run_multi_network(config, workdir, extra)


if __name__ == "__main__":
    cli.run(main)
