r"""Decoupled Neural Interfaces on feed-forward networks (arXiv 1608.05343, Sec. 3.1).

One run:
    python -m experiments.dni_feedforward --workdir=/tmp/dni --method=cdni --layers=4

Grid mode (several --method and/or --layers values): each configuration in
`<workdir>/<model><layers>_<method>/`, then the test error table (table.csv,
table.md) and figures (test_error.png, sg_loss.png) beside them:
    python -m experiments.dni_feedforward --workdir=/tmp/dni_grid --preset=cpu \
        --method=backprop,dni,cdni --layers=3,4,5,6

Defaults follow the paper (Adam, batch 256, lr 3e-5 divided by 10 at 60% and
80% of 500k steps); --preset=cpu gives a 1.5k-step schedule of the same shape
with lr 1e-3. Flags given explicitly override the preset. Rerunning the same
command resumes.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf import cli
from dni_tf.data import IMAGE_DATASETS
from dni_tf.dni_feedforward import METHODS, UNLOCKS
from dni_tf.studies.dni_feedforward import MODELS, PRESETS, DNIConfig, run_grid, run_single

flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Schedule defaults: the paper's 500k "
                  "steps, or a short CPU schedule. Explicit --steps/--learning_rate/--eval_every win.")
flags.DEFINE_enum("dataset", "mnist", IMAGE_DATASETS, "Image dataset.")
flags.DEFINE_string("data_dir", None, "Directory with mnist/ etc.; default $DNI_TF_DATA_DIR.")
flags.DEFINE_enum("model", "fcn", MODELS, "fcn: layers of 256 units (BN, ReLU); cnn: 128 5x5 "
                  "filters (BN, ReLU, pooling). The last layer is a linear classifier.")
flags.DEFINE_integer("width", None, "Units per FCN layer (default 256) or filters per CNN "
                     "layer (default 128), as in the paper.")
flags.DEFINE_list("layers", ["4"], "Number of layers (>= 2); several values = grid mode.")
flags.DEFINE_list("method", ["cdni"], f"One or more of {', '.join(METHODS)}; several = grid mode.")
flags.DEFINE_string("decouple", "all", "Decoupling points: 'all' (every layer) or a comma "
                    "list of layer indices in [1, layers-1] (point k = output of layer k).")
flags.DEFINE_integer("sg_hidden_layers", 0, "Hidden layers (0-2) of the synthetic gradient modules.")
flags.DEFINE_integer("sg_units", None, "Hidden width of the modules (default 1024, or 128 filters).")
flags.DEFINE_float("sg_scale", 1.0, "Synthetic gradients are multiplied by this (> 0).")
flags.DEFINE_float("lambda_mix", 0.0, "BP(lambda): weight in [0, 1] of the true gradient in "
                   "the module targets (0 = bootstrapped targets only).")
flags.DEFINE_float("update_prob", 1.0, "Probability in (0, 1] that a decoupled layer is updated per step.")
flags.DEFINE_enum("unlock", "update", UNLOCKS, "complete: synthetic inputs too (forward unlock).")
flags.DEFINE_integer("steps", None, "Training steps (preset: paper 500000, cpu 1500).")
flags.DEFINE_integer("batch_size", 256, "Training batch size.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate (preset: paper 3e-5, cpu 1e-3).")
flags.DEFINE_list("lr_boundaries", ["0.6", "0.8"], "Fractions of --steps where the learning "
                  "rate is divided by 10 (paper: 300k and 400k of 500k); empty = constant.")
flags.DEFINE_integer("eval_every", None, "Evaluate on the test set every this many steps.")
flags.DEFINE_boolean("diagnostics", False, "Log cosine similarity and norm ratio between "
                     "synthetic and true gradients (one extra backward pass per step).")
flags.DEFINE_boolean("oracle", False, "Testing aid: update layers from the true gradient.")
flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and sparse updates.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def parse_config():
    """Validates every flag; returns (base DNIConfig, methods, depths). Raises UsageError."""
    preset = PRESETS[FLAGS.preset]
    # Distinct values: each method x depth trains in its own folder.
    methods = cli.parse_choices("method", FLAGS.method, METHODS)
    depths = cli.parse_ints("layers", FLAGS.layers, 2)
    decouple = (None if FLAGS.decouple.strip() == "all"
                else cli.parse_ints("decouple", FLAGS.decouple, 1))
    boundaries = (cli.parse_floats("lr_boundaries", FLAGS.lr_boundaries, 0.0, 1.0, low_open=True,
                                   high_open=True) if FLAGS.lr_boundaries else [])
    config = DNIConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=FLAGS.model, layers=depths[0],
        width=FLAGS.width,
        method=methods[0], decouple=decouple, sg_hidden_layers=FLAGS.sg_hidden_layers,
        sg_units=FLAGS.sg_units, sg_scale=FLAGS.sg_scale, lambda_mix=FLAGS.lambda_mix,
        update_prob=FLAGS.update_prob, unlock=FLAGS.unlock,
        steps=FLAGS.steps if FLAGS.steps is not None else preset["steps"],
        batch_size=FLAGS.batch_size,
        learning_rate=(FLAGS.learning_rate if FLAGS.learning_rate is not None
                       else preset["learning_rate"]),
        lr_boundaries=tuple(boundaries),
        eval_every=FLAGS.eval_every if FLAGS.eval_every is not None else preset["eval_every"],
        diagnostics=FLAGS.diagnostics, oracle=FLAGS.oracle, seed=FLAGS.seed)
    for method in methods:
        for depth in depths:
            try:
                DNIConfig(**{**config.__dict__, "method": method, "layers": depth}).validate()
            except ValueError as exc:
                raise cli.UsageError(f"--{exc}") from None
    return config, methods, depths


def main(argv):
    del argv
    config, methods, depths = parse_config()
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        if len(methods) * len(depths) == 1:
            run_single(config, workdir, extra_config=extra)
        else:
            run_grid(config, methods, depths, workdir, extra_config=extra)


if __name__ == "__main__":
    cli.run(main)
