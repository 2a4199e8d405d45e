"""The experiment harness: everything a study needs around an algorithm.

Algorithms (`dni_tf.gradient_dropping`, `dni_tf.dni_feedforward`, ...) never
import from here; studies and command-line programs do.

  training           the shared fit() loop: evaluation schedule, history,
                     TensorBoard, checkpoints and exact resume
  callbacks          the Keras callbacks behind it (progress, checkpoints,
                     divergence guard, evaluation logging)
  cli                absl entry-point helpers (flag checks, exit codes)
  distribution       --distribution / --deterministic strategies
  results, plots     atomic result files and seaborn figures
  tensorboard_views  custom-scalar layouts and hparams for TensorBoard
  timing             wall time per evaluation period and the machine (timing.csv)
  report             the reproduction report (our runs beside the published results)
"""
