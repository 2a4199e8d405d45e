r"""Penn Treebank character language model with truncated BPTT, DNI or DNI + Aux.

    python -m experiments.language_model --workdir=/tmp/ptb --method=dni \
        --truncation=5 --hidden_size=128 --steps=2000 --data_dir=/path/with/ptb

The core is stateful over contiguous character streams: each training batch
holds --chunk_length characters per row (--chunk_length / --truncation windows,
one optimizer update per batch), and the state (and, for DNI, the pending
synthetic gradient) carries into the next batch. Validation BPC is measured
every --eval_every steps; the weights with the best validation BPC (early
stopping, --patience) give the reported validation and test BPC (bits =
nats / ln 2). Several --method and/or --truncation values (e.g.
`--method=bptt,dni --truncation=2,5`) run every combination and write
table.csv / table.md / table.png.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.data import text
from dni_tf.studies.recurrent_dni import LanguageModelConfig, run_grid, run_language_model

cli.define_study_flags(LanguageModelConfig)
cli.define_fork_flag()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    run = config.from_flags(LanguageModelConfig)
    grid = config.grid_from_flags(LanguageModelConfig)
    text.ptb_char_paths(run.data_dir)  # DataError (exit 2) before touching the workdir
    workdir = cli.prepare_workdir(FLAGS.workdir)
    cli.fork_if_asked(workdir, grid)
    extra = {"flags": cli.flag_values()}
    with cli.distributed(workdir) as workdir:
        run_grid(run_language_model, run, workdir, grid, "test_bpc", extra,
                 lower_is_better=True, curve="val_bpc")


if __name__ == "__main__":
    cli.run(main)
