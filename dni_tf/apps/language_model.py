r"""Penn Treebank character language model with truncated BPTT, DNI or DNI + Aux.

    python -m experiments.language_model --workdir=/tmp/ptb --method=dni \
        --truncation=5 --hidden_size=128 --steps=2000 --data_dir=/path/with/ptb

The core is stateful over contiguous character streams: each training batch
holds --chunk_length characters per row (--chunk_length / --truncation windows,
one optimizer update per batch), and the state (and, for DNI, the pending
synthetic gradient) carries into the next batch. Validation BPC is measured
every --eval_every steps; the weights with the best validation BPC (early
stopping, --patience) give the reported validation and test BPC (bits =
nats / ln 2). `--table` runs --table_methods x
--table_truncations and writes table.csv / table.md / table.png.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli
from dni_tf.data import text
from dni_tf.studies.recurrent_dni import LanguageModelConfig, run_language_model, run_table
from dni_tf.truncated_bptt import METHODS

_D = LanguageModelConfig()
flags.DEFINE_string("method", _D.method, f"One of {', '.join(METHODS)}.")
flags.DEFINE_integer("truncation", _D.truncation, "Truncation window T >= 1 (characters).")
flags.DEFINE_integer("hidden_size", _D.hidden_size, "LSTM units.")
flags.DEFINE_integer("steps", _D.steps, "Training batches.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Contiguous streams per batch.")
flags.DEFINE_integer("chunk_length", _D.chunk_length,
                     "Characters per row per training batch, a multiple of --truncation: "
                     "chunk_length / T windows, one update per batch.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate.")
flags.DEFINE_float("clip_norm", _D.clip_norm, "Gradient-norm clip, applied to the core and "
                   "the synthetic gradient module separately (0 = none).")
flags.DEFINE_integer("eval_every", _D.eval_every, "Validate every this many steps.")
flags.DEFINE_integer("eval_length", _D.eval_length, "Characters per row per evaluation batch.")
flags.DEFINE_integer("eval_batches", _D.eval_batches,
                     "Validation batches used during training (0 = all); the final "
                     "validation and test BPC always use the whole split.")
flags.DEFINE_integer("patience", _D.patience, "Stop after this many evaluations without a "
                     "better validation BPC (0 = never stop early).")
flags.DEFINE_float("sg_scale", _D.sg_scale, "Scale of synthetic gradients entering the core.")
flags.DEFINE_float("aux_weight", _D.aux_weight, "Weight of the dni_aux auxiliary loss.")
flags.DEFINE_float("bootstrap_scale", _D.bootstrap_scale, "Scale of the next synthetic "
                   "gradient inside the module's regression target (1 = the paper's target).")
flags.DEFINE_string("update", _D.update, "per_window (an optimizer step every T characters) "
                    "or per_batch (windows' gradients summed, one step per batch).")
flags.DEFINE_boolean("jit_compile", _D.jit_compile, "Compile the train step with XLA (PTB "
                     "chunks have static lengths; faster on most machines).")
flags.DEFINE_string("data_dir", None,
                    "Directory with ptb/ptb.char.*.txt; default $DNI_TF_DATA_DIR.")
flags.DEFINE_integer("seed", _D.seed, "Seed for initialisation.")
flags.DEFINE_boolean("table", False, "Run the method x T table instead of one run.")
flags.DEFINE_list("table_methods", ["bptt", "dni"], "Methods for --table.")
flags.DEFINE_list("table_truncations", ["2", "5"], "Truncations for --table.")
flags.DEFINE_string("workdir", None, "Output directory (created; reruns resume).")
cli.define_common_flags()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = cli.config_from_flags(LanguageModelConfig)
    methods = cli.parse_choices("table_methods", FLAGS.table_methods, METHODS)  # distinct: one folder each
    truncations = cli.parse_ints("table_truncations", FLAGS.table_truncations, 1)
    for t in truncations:
        if FLAGS.table and config.chunk_length % t:
            raise cli.UsageError(f"--table_truncations: {t} does not divide --chunk_length="
                                 f"{config.chunk_length}")
    text.ptb_char_paths(config.data_dir)  # DataError (exit 2) before touching the workdir
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        if FLAGS.table:
            run_table(run_language_model, config, workdir, methods, truncations,
                      "test_bpc", extra_config=extra, lower_is_better=True, curve="val_bpc")
        else:
            run_language_model(config, workdir, extra_config=extra)


if __name__ == "__main__":
    cli.run(main)
