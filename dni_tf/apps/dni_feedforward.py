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
with lr 1e-3. --preset=parity runs the known setup of issue 20 (MNIST, FCN
784-256-256-10 decoupled after the second hidden layer, modules with one hidden
layer of 256, batch 64, Adam 1e-3, 10 epochs, backprop/dni/cdni x seeds 1, 2, 3,
XLA) in one line:
    python -m experiments.dni_feedforward --workdir=/tmp/dni_parity --preset=parity
Flags given explicitly override the preset. Several --seed values = grid mode
(a folder per seed, the table holds the mean). Rerunning the same command
resumes.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli
from dni_tf.data import IMAGE_DATASETS
from dni_tf.dni_feedforward import GRADIENT_UNITS, INPUT_TARGETS, METHODS, POINT_CHOICES, UNLOCKS
from dni_tf.studies.dni_feedforward import MODELS, PRESETS, DNIConfig, run_grid, run_single

flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Defaults: the paper's 500k-step "
                  "schedule, a short CPU schedule, or the parity setup of issue 20 (architecture, "
                  "schedule, methods and seeds). Flags given explicitly win.")
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
flags.DEFINE_enum("point", "auto", POINT_CHOICES, "Where a decoupling point reads a layer: "
                  "its batch-norm output before the ReLU, or after the ReLU (and pooling); "
                  "auto = pre_relu for dni, post_relu for cdni (measured).")
flags.DEFINE_integer("sg_hidden_layers", 0, "Hidden layers (0-2) of the synthetic gradient modules.")
flags.DEFINE_integer("sg_units", None, "Hidden width of the modules (default 1024, or 128 filters).")
flags.DEFINE_enum("gradient_units", "auto", GRADIENT_UNITS, "What the modules predict: "
                  "the gradient of the batch-mean loss or per-example gradients (B times "
                  "larger, tracked about B times more slowly under Adam); auto = batch_mean "
                  "for dni, per_example for cdni (measured).")
flags.DEFINE_float("sg_scale", 1.0, "Synthetic gradients are multiplied by this (> 0).")
flags.DEFINE_float("lambda_mix", 0.0, "BP(lambda) in [0, 1]: the gradient sent below each point "
                   "is lambda x the gradient from above + (1 - lambda) x the synthetic one "
                   "(1 = backprop).")
flags.DEFINE_float("target_mix", 0.0, "Weight in [0, 1] of the true gradient in the module "
                   "targets only (layers still follow the synthetic gradient).")
flags.DEFINE_float("update_prob", 1.0, "Probability in (0, 1] that a decoupled layer is updated per step.")
flags.DEFINE_enum("unlock", "update", UNLOCKS, "complete: synthetic inputs too (forward unlock).")
flags.DEFINE_enum("input_targets", "real", INPUT_TARGETS, "Complete unlock: input models "
                  "regress onto the real forward chain (one extra forward pass) or onto the "
                  "chain of synthetic inputs.")
flags.DEFINE_boolean("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("steps", None, "Training steps (preset: paper 500000, cpu 1500).")
flags.DEFINE_integer("batch_size", 256, "Training batch size.")
flags.DEFINE_float("learning_rate", None, "Adam learning rate (preset: paper 3e-5, cpu 1e-3).")
flags.DEFINE_list("lr_boundaries", ["0.6", "0.8"], "Fractions of --steps where the learning "
                  "rate is divided by 10 (paper: 300k and 400k of 500k); empty = constant.")
flags.DEFINE_integer("eval_every", None, "Evaluate on the test set every this many steps.")
flags.DEFINE_boolean("diagnostics", False, "Log cosine similarity and norm ratio between "
                     "synthetic and true gradients (one extra backward pass per step).")
flags.DEFINE_boolean("oracle", False, "Testing aid: update layers from the true gradient.")
flags.DEFINE_list("seed", ["0"], "Seed(s) for initialisation, data order and sparse updates; "
                  "several = grid mode, a run per seed.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def parse_config():
    """Validates every flag; returns (base DNIConfig, methods, depths, seeds). Raises UsageError."""
    preset = PRESETS[FLAGS.preset]

    def pick(name, key=None):
        """The flag's value if given on the command line, else the preset's, else the default."""
        key = key or name
        if FLAGS[name].present or key not in preset:
            return getattr(FLAGS, name)
        return preset[key]

    def as_list(value):
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else value

    # Distinct values: each method x depth x seed trains in its own folder.
    methods = cli.parse_choices("method", as_list(pick("method", "methods")), METHODS)
    depths = cli.parse_ints("layers", as_list(pick("layers")), 2)
    seeds = cli.parse_ints("seed", as_list(pick("seed", "seeds")), 0)
    decouple_value = pick("decouple")
    decouple = (None if str(decouple_value).strip() == "all"
                else cli.parse_ints("decouple", as_list(decouple_value), 1))
    boundaries_value = pick("lr_boundaries")
    boundaries = (cli.parse_floats("lr_boundaries", as_list(boundaries_value), 0.0, 1.0,
                                   low_open=True, high_open=True) if boundaries_value else [])
    config = DNIConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=pick("model"), layers=depths[0],
        width=pick("width"), point=pick("point"),
        method=methods[0], decouple=decouple, sg_hidden_layers=pick("sg_hidden_layers"),
        sg_units=pick("sg_units"), gradient_units=pick("gradient_units"),
        sg_scale=pick("sg_scale"), lambda_mix=pick("lambda_mix"), target_mix=pick("target_mix"),
        update_prob=pick("update_prob"), unlock=pick("unlock"),
        input_targets=pick("input_targets"), steps=pick("steps"), batch_size=pick("batch_size"),
        learning_rate=pick("learning_rate"), lr_boundaries=tuple(boundaries),
        eval_every=pick("eval_every"), diagnostics=pick("diagnostics"), oracle=pick("oracle"),
        jit_compile=pick("jit_compile"), seed=seeds[0])
    for method in methods:
        for depth in depths:
            try:
                DNIConfig(**{**config.__dict__, "method": method, "layers": depth}).validate()
            except ValueError as exc:
                raise cli.UsageError(f"--{exc}") from None
    return config, methods, depths, seeds


def main(argv):
    del argv
    config, methods, depths, seeds = parse_config()
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values(), "preset": FLAGS.preset}
    with cli.distributed(workdir) as workdir:
        if len(methods) * len(depths) * len(seeds) == 1:
            run_single(config, workdir, extra_config=extra)
        else:
            run_grid(config, methods, depths, workdir, extra_config=extra, seeds=seeds)


if __name__ == "__main__":
    cli.run(main)
