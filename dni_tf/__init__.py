"""dni_tf: learning with partial, late, predicted or unsynchronised gradients.

Modules (one concept each):
  data               tf.data pipelines for images, sequence tasks and text
  models             plain Keras building blocks (tutorial CNN, MLPs)
  gradient_dropping  per-variable / layer / element / worker gradient dropping
  training           the shared fit() loop: evaluation, history, TensorBoard,
                     checkpoints and resume
  results, plots     atomic result files and seaborn figures
  cli                absl entry-point helpers (usage errors, exit codes)
"""

__version__ = "0.1.0"

