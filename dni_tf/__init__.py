"""dni_tf: learning with partial, late, predicted or unsynchronised gradients.

Modules (one concept each):
  data               tf.data pipelines for images, sequence tasks and text
  models             plain Keras building blocks (tutorial CNN, MLPs)
  gradient_dropping  per-variable / layer / element / worker gradient dropping
  threshold_updates  accumulate-and-fire per-weight updates
  synthetic_gradients  the synthetic gradient module M(h, c)
  dni_feedforward    DNI / cDNI for feed-forward networks (Jaderberg et al. 2016)
  truncated_bptt     truncated BPTT with synthetic gradients for RNNs (Jaderberg et al. 2016)
  multi_network      two RNNs on two clocks joined by a synthetic gradient
  targeted_dropout   targeted weight / unit dropout (Gomez et al. 2019)
  pruning            weight and unit magnitude pruning without retraining
  studies            whole studies (sweeps, tables, figures) for CLIs and notebooks
  harness            the experiment harness (training loop, checkpoints, CLI
                     helpers, results, plots, TensorBoard views, report);
                     algorithms never import it
  apps               the `dni-tf` command-line programs
  core, errors, random_streams
                     the small base every algorithm stands on
"""

__version__ = "0.1.0"

