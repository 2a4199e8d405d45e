r"""Reproduction report: finished runs beside the published results, in one Markdown file.

    python -m experiments.report --runs=runs/gd_mnist,runs/mnist_fcn --out=REPORT.md \
        [--copy_figures] [--keep_from=REPORT.md]

Each --runs directory is what one experiment command wrote (a sweep root with
results.json, or a table root whose runs have results.json in subdirectories).
Figures are linked relative to --out, or copied beside it with --copy_figures.
See `dni_tf.studies.report`.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli
from dni_tf.studies import report

flags.DEFINE_list("runs", None, "Run directories (comma-separated), each written by one "
                  "experiment command.")
flags.DEFINE_string("out", None, "Markdown file to write (atomically).")
flags.DEFINE_string("keep_from", None, "An earlier report (may be --out itself): its run "
                    "sections whose runs are not among --runs are kept, marked as kept.")
flags.DEFINE_boolean("copy_figures", False, "Copy each run's figures to <out stem>_figures/ "
                     "beside --out instead of linking them where they are.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.runs and not FLAGS.keep_from:
        raise cli.UsageError("--runs is required: give one or more run directories")
    if not FLAGS.out:
        raise cli.UsageError("--out is required: the Markdown file to write")
    try:
        path = report.write_report(FLAGS.runs or [], FLAGS.out, copy_figures=FLAGS.copy_figures,
                                   keep_from=FLAGS.keep_from)
    except report.ReportError as exc:
        raise cli.UsageError(str(exc)) from None
    except OSError as exc:
        raise cli.UsageError(f"--out={FLAGS.out}: cannot write ({exc.strerror})") from None
    print(path)


if __name__ == "__main__":
    cli.run(main)
