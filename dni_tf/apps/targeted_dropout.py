"""Targeted dropout and magnitude pruning (Gomez et al. 2019; the write-up *targeted-dropout*).

    python -m experiments.targeted_dropout --workdir=/tmp/td --dataset=fashion_mnist \
        --regimes=none,dropout,targeted_weight,targeted_unit --epochs=20 --seeds=1,2,3

Trains the write-up's 784-1000-1000-500-200-10 ReLU MLP once per (regime, seed)
cell (each in `workdir/<regime>/seed_<seed>/`, resumable; seeds are the outer
loop), prunes each trained network at every fraction with weight and unit
pruning (no retraining), and after every cell writes, from the finished cells:
`pruning_accuracy.csv` / `.md` (the table, mean over seeds; on Fashion-MNIST
with the public baseline beside it), `pruning_accuracy.png`,
`weight_magnitudes.png` and `results.json` (status "partial" with the missing
cells until all are done). Rerunning the same command resumes.
"""

from __future__ import annotations

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

import math

from absl import flags

from dni_tf.harness import cli
from dni_tf.data.images import IMAGE_DATASETS

REGIMES = ("none", "dropout", "targeted_weight", "targeted_unit", "targeted_weight_ramp",
           "targeted_unit_ramp")

flags.DEFINE_string("workdir", None, "Output directory (a rerun resumes).")
flags.DEFINE_enum("dataset", "fashion_mnist", list(IMAGE_DATASETS), "Image dataset.")
flags.DEFINE_string("data_dir", None, "Dataset directory (default: $DNI_TF_DATA_DIR).")
flags.DEFINE_list("regimes", ["none", "dropout", "targeted_weight", "targeted_unit"],
                  "Training regimes: " + ", ".join(REGIMES) + " (*_ramp: the paper's ramp).")
flags.DEFINE_float("alpha", 0.5, "Targeted dropout: drop probability inside the target set, [0, 1].")
flags.DEFINE_float("gamma", 0.5, "Targeted dropout: targeted fraction, [0, 1].")
flags.DEFINE_float("dropout_rate", 0.25, "Plain dropout rate, [0, 1) (default alpha*gamma).")
flags.DEFINE_float("ramp_epochs", 0.0,
                   "*_ramp regimes: ramp length in epochs (0: the whole run). gamma reaches "
                   "0.95*gamma half-way and gamma at the end.")
flags.DEFINE_enum("ramp_schedule", "paper", ["paper", "official"],
                  "*_ramp regimes: paper (ramp gamma only) or official (also ramp alpha "
                  "linearly, as for-ai/TD's targeted_*_piecewise).")
flags.DEFINE_enum("evaluation", "dense", ["dense", "remove_targets"],
                  "How targeted layers are evaluated: dense (every weight) or remove_targets "
                  "(the whole target set removed, as the official code).")
flags.DEFINE_boolean("drop_bias", False,
                     "targeted_unit: a dropped unit also loses its bias (the official code "
                     "keeps it).")
flags.DEFINE_integer("rank_every", 1, "targeted_weight: re-rank |w| every this many steps "
                     "(1: exact, every step).")
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
flags.DEFINE_list("seeds", [], "Seeds, one cell per regime and seed (default: --seed).")
flags.DEFINE_list("xla_regimes", [],
                  "Regimes whose train and test steps are compiled with XLA, one step per call "
                  "(faster for targeted_weight on CPU; changes float rounding, not the masks).")
flags.DEFINE_integer("steps_per_execution", 1,
                     "Other regimes: training steps per compiled call (bit-identical results); "
                     "must divide every evaluation period.")
cli.define_common_flags()
FLAGS = flags.FLAGS


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
    cli.check_range("steps_per_execution", values.steps_per_execution, 1)
    # Finite and distinct (each fraction is one column of the table).
    fractions = cli.parse_floats("prune_fractions", values.prune_fractions, 0.0, 100.0,
                                 high_open=True)
    if values.xla_regimes:
        cli.parse_choices("xla_regimes", values.xla_regimes, REGIMES)
    seeds = (cli.parse_ints("seeds", values.seeds, 0, 2**31 - 2) if values.seeds
             else [values.seed])
    hidden = []
    for item in values.hidden:
        if not str(item).isdigit() or int(item) < 1:
            raise cli.UsageError(f"--hidden: {item!r} is not a positive integer width")
        hidden.append(int(item))
    if not hidden:
        raise cli.UsageError("--hidden: give at least one width")
    return {"fractions": sorted(fractions), "hidden": hidden, "seeds": seeds}


def schedule(values, train_size: int):
    """(steps, eval_every, steps_per_epoch) for a train split of `train_size`."""
    per_epoch = max(train_size // values.batch_size, 1)
    steps = values.steps or max(int(round(values.epochs * per_epoch)), 1)
    # Evaluations every eval_every steps (default: one epoch) and at the last step.
    eval_every = min(values.eval_every or per_epoch, steps)
    return steps, eval_every, per_epoch


def check_steps_per_execution(values, steps: int, eval_every: int) -> None:
    """UsageError unless --steps_per_execution divides every evaluation period."""
    k = values.steps_per_execution
    last = steps % eval_every or eval_every
    if eval_every % k or last % k:
        raise cli.UsageError(
            f"--steps_per_execution={k} must divide every evaluation period ({eval_every} "
            f"steps" + (f", and the last one, {last}" if last != eval_every else "") + ")")


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
        check_steps_per_execution(FLAGS, steps, eval_every)
        config = dict(cli.flag_values(), workdir=workdir, total_steps=steps,
                      eval_every_steps=eval_every, steps_per_epoch=per_epoch)
        try:
            targeted_dropout.run_study(
                images, workdir, config, regimes=list(FLAGS.regimes),
                fractions=parsed["fractions"], hidden=parsed["hidden"], steps=steps,
                eval_every=eval_every, alpha=FLAGS.alpha, gamma=FLAGS.gamma,
                dropout_rate=FLAGS.dropout_rate, rank_every=FLAGS.rank_every,
                ramp_steps=int(math.ceil(FLAGS.ramp_epochs * per_epoch)),
                ramp=FLAGS.ramp_schedule, use_bias=FLAGS.use_bias, drop_bias=FLAGS.drop_bias,
                evaluation=FLAGS.evaluation, batch_size=FLAGS.batch_size,
                learning_rate=FLAGS.learning_rate, prune_logits=FLAGS.prune_logits,
                seeds=parsed["seeds"], xla_regimes=list(FLAGS.xla_regimes),
                steps_per_execution=FLAGS.steps_per_execution)
        except targeted_dropout.CellMismatch as exc:
            raise cli.UsageError(str(exc)) from None


if __name__ == "__main__":
    cli.run(main)
