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

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf import data
from dni_tf.harness import cli, config
from dni_tf.studies.targeted_dropout import CellMismatch, TargetedDropoutConfig, run_study

cli.define_study_flags(TargetedDropoutConfig)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    study = config.from_flags(TargetedDropoutConfig)
    workdir = cli.prepare_workdir(FLAGS.workdir)
    with cli.distributed(workdir) as workdir:
        images = data.load_image_data(study.dataset, study.data_dir)
        count = len(images.train[1])  # batches are full: at most one batch per epoch
        cli.check_batch_size(study.batch_size, count,
                             f"{study.dataset} has {count} training examples")
        try:
            run_study(images, workdir, study, extra_config={"flags": cli.flag_values()})
        except CellMismatch as exc:
            raise cli.UsageError(str(exc)) from None


if __name__ == "__main__":
    cli.run(main)
