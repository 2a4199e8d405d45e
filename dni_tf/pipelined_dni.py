"""Pipelined DNI: decoupled blocks that can run concurrently, pinned to devices.

Update unlocking (arXiv 1608.05343) lets a block update without waiting for
the blocks above it, but `DNIClassifier.train_step` still runs every block on
the same batch inside one step, so block j+1 waits for block j's forward pass
and nothing runs in parallel. `PipelinedDNIClassifier` adds:

* `execution="pipelined"`: at step t block j (j >= 1) consumes the activation
  (and the labels) that block j-1 produced at step t-1, held in non-trainable
  buffer variables; block 0 consumes the new batch. So block j works on batch
  t-j. Each block runs forward, computes the synthetic gradient at its output
  (`M_{j+1}(o_j, c)`; the last block: the loss on the delayed labels), updates
  itself from it and writes its output into the next buffer. Within a step the
  blocks share no data: TensorFlow's executor may run them at the same time
  (on different devices, or on different inter-op threads of one device);
  whether it does is up to its scheduling and the free cores (measured in
  docs/pipelined_dni.md).
  The only cross-block message is the module target: block j returns the
  gradient at its input (the same size as the activation) to module `M_j`,
  which regresses onto it at the end of the step on the previous block's
  device, as the backward message of the paper's asynchronous setting.
  During the first n-1 steps block j has no input yet (its buffer is empty):
  it does not update, and the loss/accuracy metrics skip such steps.
  With `unlock="complete"` each block runs on `I_j(x_t)` from the current
  batch instead, so there is no delay and no buffer (see `DNIClassifier`;
  only `input_targets="chained"`, whose targets need no extra sequential pass).
* `execution="sequential"`: the ordinary DNI step (`DNIClassifier`). Without
  `devices` it is `DNIClassifier.train_step` itself; with `devices` it is the
  same computation written block by block (block j consumes block j-1's output
  of the same step, gradient stopped) so that each block's forward, backward
  and update ops are placed on its device.
* `devices`: one device per block (`tf.device` strings such as "/CPU:1",
  "/GPU:0" or "/job:worker/task:1/device:CPU:0"). Each block's layers, the
  synthetic gradient module at its output, its optimizer slots and its input
  buffer are created on its device, and its ops run there. Several logical
  CPU devices come from `tf.config.set_logical_device_configuration`; remote
  devices from `tf.config.experimental_connect_to_cluster`. A bad placement
  raises `PlacementError` (a `UsageError`: exit 2 in the CLI) with one line.
* `method="backprop"` with `devices` is model-parallel backprop (locked): the
  blocks (split at `decouple`) run forward device after device and the
  backward pass returns through them; the same arithmetic as plain backprop.

Per-block optimizers. With `devices` or `execution="pipelined"`, every block
(its layers) and every synthetic gradient module has its own clone of the
compiled optimizer, built on its device: a block's Adam step count counts its
own updates (warm-up steps are skipped, not counted), and no optimizer state
is shared across devices. Each clone's learning rate is set every step to the
compiled optimizer's current rate, whose `iterations` counts global steps
(the schedule follows the global step). With Adam per parameter this equals
one optimizer over all variables whenever the step counts agree (sequential
execution).

Module targets and units are those of `DNIClassifier` with update unlock:
module `M_k` regresses (mean over examples of the squared error) onto the
gradient arriving at block k's input, the bootstrapped target `J_k^T M_{k+1}`
(the loss gradient for the last block), in `gradient_units`. In pipelined
execution the module's prediction is recomputed on the buffered input the
target belongs to (one extra forward pass of the module, cheap for the linear
modules of the paper).

Not supported in pipelined/placed execution (a ValueError says so): BP(lambda)
(`lambda_mix > 0`), `target_mix > 0`, `oracle` and `diagnostics` (all need
the true gradient chain through every block, i.e. a locked backward pass),
`update_prob < 1`, and a distribution strategy with more than one replica.

Checkpoints (`save_weights`, `dni_tf.harness.callbacks.save`) hold the
buffers, their fill flags and every per-block optimizer, so a resumed run
continues the pipeline exactly.

Buffers have a fixed batch dimension, `batch_size` (required for pipelined
execution): every training batch must have exactly that many examples
(drop the remainder); another size is refused when the step is traced (static
batch dimension) or fails at its first op (`tf.ensure_shape`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import keras
import tensorflow as tf

from dni_tf.core import track_loss
from dni_tf.dni_feedforward import (DNIClassifier, SyntheticInput, default_point,
                                    network_layers)
from dni_tf.errors import UsageError
from dni_tf.synthetic_gradients import regression_loss

EXECUTIONS = ("sequential", "pipelined")
MODULE_PLACEMENTS = ("producer", "consumer")


class PlacementError(UsageError):
    """A requested device placement cannot be honoured (one line, names the devices)."""


def _known_devices() -> List[tf.DeviceSpec]:
    return [tf.DeviceSpec.from_string(d.name) for d in tf.config.list_logical_devices()]


def resolve_device(name: str) -> str:
    """The full name of the logical device `name` refers to; PlacementError if none.

    `name` may be partial ("/CPU:1", "GPU:0", "/job:worker/task:1/device:CPU:0");
    every field it gives must match an existing logical device (local, or remote
    after `tf.config.experimental_connect_to_cluster`).
    """
    try:
        spec = tf.DeviceSpec.from_string(name if name.startswith("/") else "/" + name)
    except (ValueError, TypeError) as exc:
        raise PlacementError(f"device {name!r} is not a device name ({exc})") from None
    known = _known_devices()
    for device in known:
        fields = ("job", "replica", "task", "device_type", "device_index")
        if all(getattr(spec, f) is None or getattr(spec, f) == getattr(device, f)
               for f in fields):
            return device.to_string()
    listed = ", ".join(sorted(d.to_string() for d in known))
    raise PlacementError(f"unknown device {name!r}; available: {listed}")


def check_devices(devices: Sequence[str], num_blocks: int) -> List[str]:
    """Resolves one device per block; PlacementError (one line) when that is impossible.

    Returns the full names of the first `num_blocks` devices. More devices than
    blocks are allowed (the rest stay unused); two blocks may share a device if
    the caller lists it twice.
    """
    devices = list(devices)
    if len(devices) < num_blocks:
        raise PlacementError(
            f"{num_blocks} blocks need {num_blocks} devices, got {len(devices)} "
            f"({', '.join(devices) or 'none'}); give more devices or fewer decoupling points")
    return [resolve_device(d) for d in devices[:num_blocks]]


def split_cpu(count: int) -> None:
    """Splits the physical CPU into `count` logical CPU devices ("/CPU:0" ...).

    Must run before TensorFlow initialises its devices (before any op runs);
    afterwards it raises PlacementError unless `count` logical CPUs exist already.
    All logical CPUs share the process's inter-op and intra-op thread pools
    (`tf.config.threading`): they are placement targets, not separate cores.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < count:
            raise PlacementError(
                f"{count} CPU devices requested but TensorFlow is already initialised with "
                f"{have}; split the CPU before any TensorFlow op runs") from None


def check_options(execution: str, devices, method: str, lambda_mix: float = 0.0,
                  target_mix: float = 0.0, oracle: bool = False, diagnostics: bool = False,
                  update_prob: float = 1.0, unlock: str = "update",
                  input_targets: str = "real") -> None:
    """ValueError (one line) for DNIClassifier options the block-wise step does not support.

    Applies when `execution == "pipelined"` or `devices` is given; for the CLI
    and study configs, which check every flag before training.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution != "pipelined" and not devices:
        return
    if method == "backprop":
        return  # model-parallel backprop; pipelining a split backprop is refused by the model
    unsupported = [name for name, bad in (
        ("lambda_mix > 0", lambda_mix > 0.0), ("target_mix > 0", target_mix > 0.0),
        ("oracle", oracle), ("diagnostics", diagnostics),
        ("update_prob < 1", update_prob < 1.0)) if bad]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} not supported with execution={execution!r} "
                         "or devices: each needs the locked true-gradient chain or a shared step")
    if unlock == "complete" and input_targets != "chained":
        raise ValueError("complete unlock with execution='pipelined' or devices needs "
                         "input_targets='chained' ('real' runs the whole real chain, one "
                         "block after another, every step)")


class PipelinedDNIClassifier(DNIClassifier):
    """`DNIClassifier` with pipelined execution and/or blocks pinned to devices.

    Args (besides those of `DNIClassifier`):
      execution: "sequential" or "pipelined" (see the module docstring).
      devices: None (no pinning) or one `tf.device` name per block; blocks are
        the layers between decoupling points (for backprop: between the
        `decouple` points, which then only say where the model is split).
      batch_size: the fixed training batch size; required for "pipelined"
        (the buffers hold one batch each).
      module_placement: where module M_k (at the point between blocks k-1 and
        k) lives and runs. "producer" (default): on block k-1's device, so the
        blocks share no data within a step (the target of M_k comes back from
        block k at the end of the step). "consumer": on block k's device, which
        moves the module's arithmetic (about one hidden layer's worth) off
        block k-1 to balance the devices; block k-1's backward pass then waits
        for block k's device to evaluate M_k on its new output (a small
        forward pass, not block k's work), a round trip within the step.

    Shapes: inputs [B, ...] as for the wrapped layers; buffer k holds block
    k-1's output [batch_size, *point_shape] and labels [batch_size] int32.
    Metrics: `loss`, compiled metrics (on the last block's output and the
    labels of the batch it processed) and `sg_loss_k` per point.
    """

    def __init__(self, layers, num_classes: int, execution: str = "pipelined",
                 devices: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                 module_placement: str = "producer", **kwargs):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if module_placement not in MODULE_PLACEMENTS:
            raise ValueError(f"module_placement must be one of {MODULE_PLACEMENTS}, got "
                             f"{module_placement!r}")
        method = kwargs.get("method", "dni")
        decouple = kwargs.get("decouple")
        n = len(layers)
        if method == "backprop":
            # The split only places the model; backprop itself stays locked.
            stage_points = (sorted(set(int(k) for k in decouple)) if decouple is not None
                            else (list(range(1, n)) if devices else []))
            if any(not 1 <= k <= n - 1 for k in stage_points):
                raise ValueError(f"decoupling points must be in 1..{n - 1}, got {stage_points}")
            if execution == "pipelined" and stage_points:
                raise ValueError("backprop cannot be pipelined: its blocks are locked (each waits "
                                 "for the backward pass from above); use execution='sequential'")
        super().__init__(layers, num_classes, **kwargs)
        if method == "backprop":
            bounds = [0, *stage_points, n]
            self.block_slices = [(bounds[j], bounds[j + 1]) for j in range(len(bounds) - 1)]
        self.execution = execution
        self.module_placement = module_placement
        self.pipelined = execution == "pipelined"
        self.own_step = self.pipelined or devices is not None
        num_blocks = len(self.block_slices)
        check_options(execution, devices, method=self.method, lambda_mix=self.lambda_mix,
                      target_mix=self.target_mix, oracle=self.oracle,
                      diagnostics=self.diagnostics, update_prob=self.update_prob,
                      unlock=self.unlock, input_targets=self.input_targets)
        if self.own_step and self.points and self.sg_lr_scale != 1.0:
            # The block-wise step has its own module optimizers at the network's rate.
            raise ValueError(f"sg_lr_scale={self.sg_lr_scale:g} is not supported with "
                             "execution='pipelined' or devices; use sg_lr_scale=1")
        self.devices = check_devices(devices, num_blocks) if devices is not None else None
        if self.pipelined:
            if batch_size is None or int(batch_size) <= 0:
                raise ValueError("execution='pipelined' needs batch_size (> 0): each buffer holds "
                                 "one batch")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.buffer_h: List[keras.Variable] = []
        self.buffer_y: List[keras.Variable] = []
        self.buffer_full: List[keras.Variable] = []
        self.module_optimizers: List[keras.optimizers.Optimizer] = []
        # Blocks whose device was lost (dni_tf.pipelined_cluster.lose_block): skipped.
        self.lost_blocks: List[int] = []

    # ----------------------------------------------------------------- placement
    def device_of(self, j: int):
        """Context manager placing block j's variables/ops (a no-op without devices)."""
        if self.devices is None:
            return tf.device(None)
        return tf.device(self.devices[j])

    def module_device(self, j: int):
        """Device scope of module `sg_modules[j]` (the point after block j)."""
        return self.device_of(j + 1 if self.module_placement == "consumer" else j)

    def build(self, input_shape):
        if not self.own_step:
            return super().build(input_shape)
        # Create each block's weights (and the module at its output) on its device.
        shape = tuple(input_shape)
        point_shapes = {}
        for j, (start, stop) in enumerate(self.block_slices):
            with self.device_of(j):
                for i in range(start, stop):
                    layer = self.net_layers[i]
                    if not layer.built:
                        layer.build(shape)
                    shape = tuple(layer.compute_output_shape(shape))
                    point_shapes[i + 1] = shape
            if j < len(self.sg_modules) and not self.sg_modules[j].built:
                with self.module_device(j):
                    self.sg_modules[j].build(shape)
        if self.unlock == "complete" and not self.input_models:
            for j, k in enumerate(self.points):
                with self.device_of(j + 1):
                    model = SyntheticInput(point_shapes[k][1:], seed=self._seed + 2000 + 10 * k,
                                           name=f"input_model_{k}", **self._input_config)
                    model.build(tuple(input_shape))
                    self.input_models.append(model)
        if self.pipelined and self.unlock == "update" and not self.buffer_h:
            for j, k in enumerate(self.points):
                with self.device_of(j + 1):  # buffer k feeds block k = j + 1
                    self.buffer_h.append(self.add_weight(
                        name=f"pipeline_h_{k}", shape=(self.batch_size, *point_shapes[k][1:]),
                        initializer="zeros", trainable=False))
                    self.buffer_y.append(self.add_weight(
                        name=f"pipeline_y_{k}", shape=(self.batch_size,), dtype="int32",
                        initializer="zeros", trainable=False))
                    self.buffer_full.append(self.add_weight(
                        name=f"pipeline_full_{k}", shape=(), dtype="int32",
                        initializer="zeros", trainable=False))
        self._build_rng_state()
        self.built = True
        self._build_optimizers()

    def _block_gradients(self, tape, j: int, top: bool, out, a, pred, loss, units):
        """(block j's weight gradients, the bootstrapped target of module M_j or None).

        A block below the top follows `sg_scale` x its output module's
        prediction `pred`; the top block follows its `loss`. The target is the
        gradient arriving at the block's input `a`, in module units with
        `sg_scale` undone (None for block 0, which has no input module).
        """
        variables = self._layer_vars(j)
        if top:
            grads = tape.gradient(loss, variables + [a],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            scale = units
        else:
            # The float32 prediction enters a 16-bit block's backward pass in its dtype.
            cotangent = tf.cast(self.sg_scale * tf.stop_gradient(pred) / units, out.dtype)
            grads = tape.gradient(out, variables + [a], output_gradients=cotangent,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            scale = units / self.sg_scale
        target = tf.stop_gradient(tf.cast(grads[-1], tf.float32) * scale) if j > 0 else None
        return grads[:-1], target

    def _build_optimizers(self):
        if not self.own_step:
            return super()._build_optimizers()
        if getattr(self, "optimizer", None) is None:
            return
        if not self.block_optimizers:
            config = dict(self.optimizer.get_config())
            config["learning_rate"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

            def clone(variables, j, scope=None):
                with scope or self.device_of(j):
                    opt = self.optimizer.__class__.from_config(dict(config))
                    opt.build(variables)
                return opt

            self.block_optimizers = [clone(self._layer_vars(j), j)
                                     for j in range(len(self.block_slices))]
            # Module M_k at the output of block k-1, on its device (module_placement).
            self.module_optimizers = [clone(m.trainable_variables, j, self.module_device(j))
                                      for j, m in enumerate(self.sg_modules)]
            if self.input_models:
                self.module_optimizers += [clone(m.trainable_variables, j + 1)
                                           for j, m in enumerate(self.input_models)]
        if not self.optimizer.built:
            # Holds the global step and the learning-rate schedule only.
            self.optimizer.build([])

    # ----------------------------------------------------------------- training
    def train_step(self, data):
        if not self.own_step:
            return super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError("PipelinedDNIClassifier does not support sample_weight or "
                             "class_weight")
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError("PipelinedDNIClassifier places blocks on devices itself; it does not "
                             "run under a distribution strategy with several replicas")
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        learning_rate = tf.identity(self.optimizer.learning_rate)  # before this step's increment
        if self.method == "backprop":
            logs = self._model_parallel_backprop(x, y, learning_rate)
        elif self.unlock == "complete":
            logs = self._complete_unlock_step(x, y, learning_rate)
        else:
            logs = self._blockwise_step(x, y, learning_rate)
        self.optimizer.iterations.assign_add(1)
        return logs

    def _units(self, batch):
        if self.gradient_units == "per_example":
            return tf.cast(batch, tf.float32)
        return tf.constant(1.0)

    def _context(self, labels):
        return tf.one_hot(labels, self.num_classes) if self.method == "cdni" else None

    def _blockwise_step(self, x, y, learning_rate):
        """One DNI step, block by block; pipelined (buffered inputs) or sequential."""
        n = len(self.block_slices)
        if self.pipelined:
            if x.shape[0] is not None and x.shape[0] != self.batch_size:
                raise ValueError(f"pipelined execution needs batches of exactly batch_size="
                                 f"{self.batch_size} examples, got {x.shape[0]}")
            # Static batch dimension from here on; a batch of another size fails here.
            x = tf.ensure_shape(x, [self.batch_size, *x.shape[1:]])
            y = tf.ensure_shape(y, [self.batch_size])
        batch = tf.shape(x)[0]
        units = self._units(batch)
        examples = tf.cast(batch, tf.float32)
        # Every block's input: read all buffers before anything is written.
        lost = set(self.lost_blocks)
        if lost and not self.pipelined:
            lost = set(range(min(lost), n))  # the blocks above a lost one have no input
        inputs, labels, valid = [x], [y], [tf.constant(True)]
        if self.pipelined:
            for k in range(1, n):
                if k in lost:  # its buffer was on the lost device
                    inputs.append(None), labels.append(None), valid.append(tf.constant(False))
                    continue
                with self.device_of(k):
                    inputs.append(tf.identity(self.buffer_h[k - 1].value))
                    labels.append(tf.identity(self.buffer_y[k - 1].value))
                    valid.append(self.buffer_full[k - 1].value > 0)
        outputs, layer_grads, targets, sg_tapes, sg_preds = [], [], [None] * n, [], []
        loss = logits = pred = None
        for j in range(n):
            if j in lost:
                outputs.append(None), layer_grads.append(None)
                if j < n - 1:
                    sg_tapes.append(None), sg_preds.append(None)
                continue
            with self.device_of(j):
                if j > 0 and not self.pipelined:
                    # Sequential: this step's output of block j-1, gradient stopped.
                    inputs.append(tf.stop_gradient(outputs[j - 1]))
                    labels.append(y)
                    valid.append(tf.constant(True))
                a = inputs[j]
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(a)
                    out = self._run_block(j, a, training=True)
                    if j < n - 1:
                        with self.module_device(j):
                            pred = self.sg_modules[j](tf.stop_gradient(out),
                                                      context=self._context(labels[j]),
                                                      training=True)
                    else:
                        logits = out
                        loss = self.compute_loss(x=a, y=labels[j], y_pred=out, training=True)
                grads, targets[j] = self._block_gradients(tape, j, j == n - 1, out, a, pred,
                                                          loss, units)
                layer_grads.append(grads)
                outputs.append(out)
                if j < n - 1:
                    sg_tapes.append(tape)
                    sg_preds.append(pred)
                else:
                    del tape
        # Module M_k (k = j + 1) regresses onto the target from block k, on its device.
        module_updates, sg_losses = [], []
        for j, module in enumerate(self.sg_modules):
            k = j + 1
            if j in lost or k in lost:  # the module, or its target, is gone
                module_updates.append(None)
                continue
            with self.module_device(j):
                if self.pipelined:
                    # The prediction on the input the target belongs to (block j's output
                    # of the previous step), with the module's current weights.
                    with tf.GradientTape() as tape:
                        pred = module(inputs[k], context=self._context(labels[k]), training=True)
                    module_tape = tape
                else:
                    pred, module_tape = sg_preds[j], sg_tapes[j]
                target = targets[k]
                sg_losses.append(regression_loss(pred, target))
                grads = module_tape.gradient(pred, module.trainable_variables,
                                             output_gradients=2.0 * (pred - target) / examples,
                                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
                module_updates.append((self.module_optimizers[j], grads,
                                       module.trainable_variables, valid[k], sg_losses[-1]))
        del sg_tapes
        # Updates. No explicit barrier across blocks (it would make block j's update
        # wait for the other blocks): TensorFlow's automatic control dependencies
        # order every read of a variable above before the write to it below (same
        # resource, program order), which is all the step needs.
        for j in range(n):
            if j in lost:
                continue
            with self.device_of(j):
                self._apply_if(self.block_optimizers[j], layer_grads[j], self._layer_vars(j),
                               valid[j], learning_rate)
        for j, update in enumerate(module_updates):
            if update is None:
                continue
            opt, grads, variables, ok, _ = update
            with self.module_device(j):
                self._apply_if(opt, grads, variables, ok, learning_rate)
        if self.pipelined:
            for k in range(1, n):
                if k in lost:
                    continue
                if k - 1 in lost:  # no new input: block k idles once its buffer is used
                    with self.device_of(k):
                        self.buffer_full[k - 1].assign(0)
                    continue
                with self.device_of(k):
                    self.buffer_h[k - 1].assign(outputs[k - 1])
                    self.buffer_y[k - 1].assign(labels[k - 1])
                    self.buffer_full[k - 1].assign(tf.cast(valid[k - 1], tf.int32))
        for tracker, update in zip(self.sg_loss_trackers, module_updates):
            if update is not None:
                tracker.update_state(update[4], sample_weight=tf.cast(update[3], tf.float32))
        if n - 1 in lost:
            return {m.name: m.result() for m in self.metrics}
        return self._last_block_metrics(loss, logits, labels[-1], valid[-1])

    def _last_block_metrics(self, loss, logits, labels, valid):
        """Loss and compiled metrics of the last block; steps where it had no input count 0."""
        weight = tf.cast(valid, tf.float32)
        count = tf.cast(weight * tf.cast(tf.shape(labels)[0], tf.float32), tf.int32)
        track_loss(self, loss, tf.zeros([count]))  # weighted by the examples it really saw
        return self.compute_metrics(None, labels, logits,
                                    sample_weight=weight * tf.ones_like(labels, tf.float32))

    def _apply_if(self, opt, grads, variables, condition, learning_rate):
        """`opt.apply(grads, variables)` when `condition` (a bool tensor); else nothing."""
        opt.learning_rate = learning_rate
        if isinstance(condition, bool) or tf.get_static_value(condition) is not None:
            if bool(tf.get_static_value(condition)):
                opt.apply(grads, variables)
            return

        def update():
            opt.apply(grads, variables)
            return tf.constant(True)

        tf.cond(condition, update, lambda: tf.constant(False))

    def _complete_unlock_step(self, x, y, learning_rate):
        """Complete unlock, block by block: block j runs on I_j(x_t); no delay, no buffer.

        Input model I_k (on block k's device) regresses onto block k-1's output
        of this step on its own (synthetic) input ("chained" targets).
        """
        n = len(self.block_slices)
        batch = tf.shape(x)[0]
        units = self._units(batch)
        examples = tf.cast(batch, tf.float32)
        context = self._context(y)
        outputs, layer_grads, targets, preds, tapes = [], [], [None] * n, [], []
        input_preds, input_tapes = [None] * n, [None] * n
        loss = logits = pred = None
        for j in range(n):
            with self.device_of(j):
                if j == 0:
                    a = x
                else:
                    with tf.GradientTape() as in_tape:
                        input_preds[j] = self.input_models[j - 1](x, training=True)
                    input_tapes[j] = in_tape
                    a = tf.stop_gradient(input_preds[j])
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(a)
                    out = self._run_block(j, a, training=True)
                    if j < n - 1:
                        with self.module_device(j):
                            pred = self.sg_modules[j](tf.stop_gradient(out), context=context,
                                                      training=True)
                    else:
                        logits = out
                        loss = self.compute_loss(x=x, y=y, y_pred=out, training=True)
                grads, targets[j] = self._block_gradients(tape, j, j == n - 1, out, a, pred,
                                                          loss, units)
                layer_grads.append(grads)
                outputs.append(out)
                if j < n - 1:
                    preds.append(pred)
                    tapes.append(tape)
        updates, sg_losses = [], []
        for j, module in enumerate(self.sg_modules):
            with self.module_device(j):
                target = targets[j + 1]
                sg_losses.append(regression_loss(preds[j], target))
                updates.append((self.module_optimizers[j], tapes[j].gradient(
                    preds[j], module.trainable_variables,
                    output_gradients=2.0 * (preds[j] - target) / examples,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO), module.trainable_variables))
        input_losses = []
        offset = len(self.sg_modules)
        for k in range(1, n):
            model = self.input_models[k - 1]
            with self.device_of(k):
                # The input model is float32; the block's output may be 16-bit.
                real = tf.cast(tf.stop_gradient(outputs[k - 1]), input_preds[k].dtype)
                input_losses.append(regression_loss(input_preds[k], real))
                updates.append((self.module_optimizers[offset + k - 1], input_tapes[k].gradient(
                    input_preds[k], model.trainable_variables,
                    output_gradients=2.0 * (input_preds[k] - real) / examples,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO), model.trainable_variables))
        del tapes
        for j in range(n):
            with self.device_of(j):
                self._apply_if(self.block_optimizers[j], layer_grads[j], self._layer_vars(j),
                               True, learning_rate)
        for i, (opt, grads, variables) in enumerate(updates):
            with self.module_device(i) if i < offset else self.device_of(i - offset + 1):
                self._apply_if(opt, grads, variables, True, learning_rate)
        for tracker, value in zip(self.sg_loss_trackers, sg_losses):
            tracker.update_state(value)
        for tracker, value in zip(self.input_loss_trackers, input_losses):
            tracker.update_state(value)
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits)

    def _model_parallel_backprop(self, x, y, learning_rate):
        """Backprop with block j's forward, backward and update on device j (locked)."""
        n = len(self.block_slices)
        tapes, inputs, outputs, h = [], [], [], x
        for j in range(n):
            with self.device_of(j):
                a = h if j == 0 else tf.identity(h)
                tape = tf.GradientTape()
                with tape:
                    tape.watch(a)
                    h = self._run_block(j, a, training=True)
                    if j == n - 1:
                        loss = self.compute_loss(x=x, y=y, y_pred=h, training=True)
                tapes.append(tape)
                inputs.append(a)
                outputs.append(h)
        logits = h
        grads_of = [None] * n
        upstream = None
        for j in range(n - 1, -1, -1):
            with self.device_of(j):
                variables = self._layer_vars(j)
                sources = variables + ([inputs[j]] if j > 0 else [])
                if j == n - 1:
                    grads = tapes[j].gradient(loss, sources,
                                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
                else:
                    grads = tapes[j].gradient(outputs[j], sources,
                                              output_gradients=upstream,
                                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
                grads_of[j] = grads[:len(variables)]
                if j > 0:
                    upstream = grads[-1]
        for j in range(n):
            with self.device_of(j):
                self._apply_if(self.block_optimizers[j], grads_of[j], self._layer_vars(j), True,
                               learning_rate)
        track_loss(self, loss, x)
        return self.compute_metrics(x, y, logits)


def build_classifier(model: str, num_layers: int, input_shape, num_classes: int, seed: int = 0,
                     width: Optional[int] = None, point: str = "auto",
                     input_norm=None, output_norm: bool = False, init: str = "keras",
                     bn_momentum: float = 0.99, bn_epsilon: float = 1e-3,
                     **kwargs) -> PipelinedDNIClassifier:
    """`dni_feedforward.build_classifier` for `PipelinedDNIClassifier` (built, not compiled).

    The network options are those of `dni_feedforward.network_layers`; `kwargs`
    go to `PipelinedDNIClassifier` (execution, devices, batch_size,
    module_placement and every `DNIClassifier` option).
    """
    layers = network_layers(model, num_layers, num_classes, seed=seed, width=width,
                            point=default_point(kwargs.get("method", "dni")) if point == "auto"
                            else point, input_norm=input_norm, output_norm=output_norm,
                            init=init, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon)
    classifier = PipelinedDNIClassifier(layers, num_classes, seed=seed,
                                        name=f"{model}{num_layers}", **kwargs)
    classifier.build((None, *input_shape))
    return classifier
