"""The small shared core the training algorithms build on.

Every algorithm module imports this and nothing above it (no experiment
harness, no absl, no pandas), so `import dni_tf.gradient_dropping` costs only
Keras and TensorFlow. Each use of private Keras API in the package lives here,
with the reason and the Keras version it was written against (3.15).

* `track_loss`: record a custom train step's loss in the model's `loss` metric.
* `replica_mean`: gradients of per-replica losses -> what `optimizer.apply`
  needs for the global mean.
* `build_for_restore`: create every variable `fit()` would, so a checkpoint can
  be loaded before training.
* `BuildsBeforeTracing`: a model mixin that builds that state before `fit()` and
  `evaluate()` trace their step, so the step is traced once, not twice.
* `prepare_for_multi_worker`: the two workarounds `fit()` needs under
  `MultiWorkerMirroredStrategy`.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def _num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def track_loss(model: keras.Model, loss, x) -> None:
    """Records `loss` in the model's `loss` metric, as Keras' own train_step does.

    Keras 3's `compute_loss` does not update the `loss` tracker; a custom
    `train_step`/`test_step` must call this (before `compute_metrics`). Under a
    distribution strategy `compute_loss` has scaled the loss by 1 / replicas;
    that scaling is undone first so the metric shows the batch mean.
    """
    batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
    replicas = _num_replicas()
    unscaled = loss * tf.cast(replicas, loss.dtype) if replicas > 1 else loss
    # Private: Keras 3.15 has no public handle on the model's own `loss` metric,
    # and a second Mean named "loss" would clash with it in the logs.
    model._loss_tracker.update_state(unscaled, sample_weight=batch_size)


def replica_mean(grads):
    """Gradients of per-replica batch means -> what `optimizer.apply` needs for the global mean.

    For train steps that compute their own losses (not `compute_loss`, which
    Keras already scales by 1 / replicas): the optimizer sums the replicas'
    gradients, so each replica's share is divided by the replica count.
    """
    replicas = _num_replicas()
    return [g / replicas for g in grads]


def build_for_restore(model: keras.Model, batch) -> None:
    """Creates every variable `fit()` would (layers, metrics, optimizer slots).

    Without a distribution strategy Keras builds lazily at the first traced
    step, which is too late to load a checkpoint; this is the build it performs
    under a strategy. Models with extra optimizers must build them in `build()`.
    """
    if hasattr(model, "_symbolic_build"):
        # Private: Keras 3.15's own pre-fit build (model, compiled metrics and
        # optimizer variables from one batch); no public equivalent.
        model._symbolic_build(data_batch=batch)
    else:  # Keras versions without the hook: build the layers by calling the model
        model(keras.utils.unpack_x_y_sample_weight(batch)[0])
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def zeros_of_spec(spec):
    """A batch of zeros with the structure, shapes and dtypes of `spec` (a dataset's
    `element_spec`), or None when a part of it cannot be made that way.

    Unknown dimensions become 1; an absent element (`NoneTensorSpec`, e.g. no
    sample weights) stays None. None is returned for a shape of unknown rank or
    a ragged or sparse part: the caller then leaves the building to Keras.
    Enough to build a model without drawing a batch: a new iterator over a
    shuffled dataset would advance its seed and change the order training sees.
    """
    parts = tf.nest.flatten(spec)
    if not all(type(s).__name__ == "NoneTensorSpec"
               or (isinstance(s, tf.TensorSpec) and s.shape.rank is not None) for s in parts):
        return None

    def zeros(s):
        if not isinstance(s, tf.TensorSpec):
            return None
        return tf.zeros([1 if d is None else d for d in s.shape], s.dtype)

    return tf.nest.map_structure(zeros, spec)


class BuildsBeforeTracing:
    """keras.Model mixin: optimizer slots and compiled metrics exist before the first trace.

    Without a distribution strategy Keras 3.15 creates them inside the first
    trace of the train (or test) step, and tf.function then traces the whole
    step a second time, now forbidding variable creation: every `fit()` and
    `evaluate()` paid its tracing twice (1-5 s per model in the test suite, more
    for the larger steps). Keras builds them up front only under a strategy;
    this does so always, from zeros of the data's spec (`build_for_restore`).
    As under a strategy, `evaluate()` on a fresh model also creates the
    optimizer's slots. Data it cannot make zeros of (`zeros_of_spec`) is left to
    Keras' own lazy build. List the mixin before `keras.Model`.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Private (Keras 3.15): the hook fit()/evaluate()/train_on_batch() call
        # before tracing; without a strategy it returns without building.
        if self._distribute_strategy is not None or not hasattr(self, "_symbolic_build"):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if data_batch is None:
            # Private: the epoch iterator's dataset (no batch is drawn from it).
            dataset = getattr(iterator, "_distributed_dataset", None)
            if isinstance(dataset, tf.data.Dataset):
                data_batch = zeros_of_spec(dataset.element_spec)
            if data_batch is None:  # another Keras, or data zeros cannot stand in for
                return super()._maybe_symbolic_build(iterator=iterator, data_batch=None)
        build_for_restore(self, data_batch)


def prepare_for_multi_worker(model: keras.Model) -> None:
    """Lets an already built `model` train with `fit()` under MultiWorkerMirroredStrategy.

    Two Keras 3.15 workarounds:
    * `fit()` builds a distributed model from a batch averaged over the
      replicas, and that average fails under MultiWorkerMirroredStrategy (a
      PerReplica batch cannot be reduced); the model is already built
      (`build_for_restore`), so the private build hook is switched off.
    * Keras reduces each step's logs with `strategy.reduce("MEAN", value,
      axis=0)`, which fails on scalars; the steps return one-element vectors,
      which reduce to the same mean.
    """
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    for name in ("train_step", "test_step"):
        step = getattr(model, name)

        def vector_logs(data, step=step):
            return {k: tf.reshape(v, [1]) for k, v in step(data).items()}

        setattr(model, name, vector_logs)
