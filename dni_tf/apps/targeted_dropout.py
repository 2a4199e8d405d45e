"""Targeted dropout and magnitude pruning (Gomez et al. 2019, arXiv:1905.13678).

    python -m experiments.targeted_dropout --workdir=/tmp/td --dataset=fashion_mnist \
        --regimes=none,dropout,targeted_weight,targeted_unit --epochs=20

Trains the 784-1000-1000-500-200-10 ReLU MLP once per regime (each in
`workdir/<regime>/`, resumable), prunes each trained network at every fraction
with weight and unit pruning (no retraining), and writes beside them:
`pruning_accuracy.csv` / `.md` (the table; on Fashion-MNIST with the public
baseline beside it), `pruning_accuracy.png`, `weight_magnitudes.png` and
`results.json`.
"""

from __future__ import annotations

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

import math

from absl import flags

from dni_tf import cli
from dni_tf.data.images import IMAGE_DATASETS

flags.DEFINE_string("workdir", None, "Output directory (a rerun resumes).")
flags.DEFINE_enum("dataset", "fashion_mnist", list(IMAGE_DATASETS), "Image dataset.")
flags.DEFINE_string("data_dir", None, "Dataset directory (default: $DNI_TF_DATA_DIR).")
flags.DEFINE_list("regimes", ["none", "dropout", "targeted_weight", "targeted_unit"],
                  "Training regimes: none, dropout, targeted_weight, targeted_unit.")
flags.DEFINE_float("alpha", 0.5, "Targeted dropout: drop probability inside the target set, [0, 1].")
flags.DEFINE_float("gamma", 0.5, "Targeted dropout: targeted fraction, [0, 1].")
flags.DEFINE_float("dropout_rate", 0.25, "Plain dropout rate, [0, 1) (default alpha*gamma).")
flags.DEFINE_float("ramp_epochs", 0.0, "Ramp alpha and gamma linearly from 0 over this many epochs (0: off).")
flags.DEFINE_integer("rank_every", 50, "targeted_weight: re-rank |w| every this many steps (1: exact).")
flags.DEFINE_float("epochs", 20.0, "Training epochs (ignored when --steps > 0).")
flags.DEFINE_integer("steps", 0, "Training steps (0: use --epochs).")
flags.DEFINE_integer("eval_every", 0, "Steps between evaluations (0: one epoch).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_boolean("use_bias", True, "Dense layers with biases.")
flags.DEFINE_list("hidden", ["1000", "1000", "500", "200"], "Hidden layer widths.")
flags.DEFINE_list("prune_fractions", ["0", "25", "50", "60", "70", "80", "90", "95", "97", "99"],
                  "Pruning fractions in percent, each in [0, 100).")
flags.DEFINE_boolean("prune_logits", False, "Also prune the logits layer.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and dropout masks.")
cli.define_common_flags()
FLAGS = flags.FLAGS

REGIMES = ("none", "dropout", "targeted_weight", "targeted_unit")


def validate(values) -> dict:
    """Checks every flag; returns parsed lists. Raises cli.UsageError (one line)."""
    if not values.workdir:
        raise cli.UsageError("--workdir is required")
    cli.parse_choices("regimes", values.regimes, REGIMES)  # distinct: one folder each
    cli.check_range("alpha", values.alpha, 0.0, 1.0)
    cli.check_range("gamma", values.gamma, 0.0, 1.0)
    cli.check_range("dropout_rate", values.dropout_rate, 0.0, 1.0, high_open=True)
    cli.check_range("ramp_epochs", values.ramp_epochs, 0.0)
    cli.check_range("rank_every", values.rank_every, 1)
    cli.check_range("epochs", values.epochs, 0.0, low_open=True)
    cli.check_range("steps", values.steps, 0)
    cli.check_range("eval_every", values.eval_every, 0)
    cli.check_range("batch_size", values.batch_size, 1)
    cli.check_range("learning_rate", values.learning_rate, 0.0, low_open=True)
    # Finite and distinct (each fraction is one column of the table).
    fractions = cli.parse_floats("prune_fractions", values.prune_fractions, 0.0, 100.0,
                                 high_open=True)
    hidden = []
    for item in values.hidden:
        if not str(item).isdigit() or int(item) < 1:
            raise cli.UsageError(f"--hidden: {item!r} is not a positive integer width")
        hidden.append(int(item))
    if not hidden:
        raise cli.UsageError("--hidden: give at least one width")
    return {"fractions": sorted(fractions), "hidden": hidden}


def schedule(values, train_size: int):
    """(steps, eval_every, steps_per_epoch) for a train split of `train_size`."""
    per_epoch = max(train_size // values.batch_size, 1)
    steps = values.steps or max(int(round(values.epochs * per_epoch)), 1)
    # Evaluations every eval_every steps (default: one epoch) and at the last step.
    eval_every = min(values.eval_every or per_epoch, steps)
    return steps, eval_every, per_epoch


def main(argv):
    del argv
    parsed = validate(FLAGS)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    from dni_tf import data  # heavy imports after validation
    from dni_tf.studies import targeted_dropout

    with cli.distributed(workdir) as workdir:
        images = data.load_image_data(FLAGS.dataset, FLAGS.data_dir)
        count = len(images.train[1])  # batches are full: at most one batch per epoch
        cli.check_batch_size(FLAGS.batch_size, count,
                             f"{FLAGS.dataset} has {count} training examples")
        steps, eval_every, per_epoch = schedule(FLAGS, len(images.train[1]))
        config = dict(cli.flag_values(), workdir=workdir, total_steps=steps,
                      eval_every_steps=eval_every, steps_per_epoch=per_epoch)
        targeted_dropout.run_study(
            images, workdir, config, regimes=list(FLAGS.regimes), fractions=parsed["fractions"],
            hidden=parsed["hidden"], steps=steps, eval_every=eval_every, alpha=FLAGS.alpha,
            gamma=FLAGS.gamma, dropout_rate=FLAGS.dropout_rate, rank_every=FLAGS.rank_every,
            ramp_steps=int(math.ceil(FLAGS.ramp_epochs * per_epoch)), use_bias=FLAGS.use_bias,
            batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
            prune_logits=FLAGS.prune_logits, seed=FLAGS.seed)


if __name__ == "__main__":
    cli.run(main)
