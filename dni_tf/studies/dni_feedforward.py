"""The feed-forward DNI study (arXiv 1608.05343, Sec. 3.1) as importable code.

`run_single(config, workdir)` trains one network (backprop, DNI or cDNI) and
writes results.json / history.csv / TensorBoard / checkpoints (resumable).
`run_grid(config, methods, depths, workdir)` runs method x depth, each in
`workdir/<model><layers>_<method>/`, then writes beside them the paper-style
test error table (`table.csv`, `table.md`: one row per method, one column per
depth), the combined `history.csv`, `results.json` and the learning-curve
figures `test_error.png` (test error against step, a panel per depth) and
`sg_loss.png` (mean synthetic-gradient loss against step). With several
seeds each run is in `<model><layers>_<method>_seed<seed>/`, the table holds
the mean over seeds and `table_seeds.csv` every run. The CLI
`python -m experiments.dni_feedforward` calls these.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Optional, Sequence, Tuple

import keras
import pandas as pd
import tensorflow as tf
from absl import logging

from dni_tf.harness import cli
from dni_tf import data as data_lib
from dni_tf.harness import plots, results, tensorboard_views
from dni_tf.dni_feedforward import (GRADIENT_UNITS, INITS, INPUT_TARGETS, METHODS,
                                    POINT_CHOICES, UNLOCKS, build_classifier,
                                    default_sg_lr_scale)
from dni_tf.errors import WorkerLost
from dni_tf.harness.fast_path import FastPathOptions, evaluation_periods
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.callbacks import ResumableCheckpoint, checkpoint_step
from dni_tf.harness.training import SweepProgress, train_and_evaluate

STUDY = "dni_feedforward"  # written into results.json: the reproduction report reads it
DNI_PAPER = ("Jaderberg et al. 2016, *Decoupled Neural Interfaces using Synthetic Gradients*, "
             "arXiv 1608.05343")
PUBLISHED = results.Published(
    title="Synthetic gradients for feed-forward networks",
    source=f"{DNI_PAPER}, section 3.1 and supplementary "
           "(compared qualitatively, so no numbers are compared)",
    claims=("Every-layer cDNI trains MNIST FCNs of 3-6 layers to within a few tenths of a "
            "percent of backprop.",
            "Unconditioned DNI degrades with depth.",
            "Sparse updates (update_prob < 1) and complete unlock still train."),
    setup={"model": "fcn", "width": 256, "batch_size": 256, "steps": 500_000,
           "learning_rate": 3e-5, "lr_boundaries": [0.6, 0.8]})
MODELS = ("fcn", "cnn")
# The paper's schedule: Adam, batch 256, lr 3e-5 divided by 10 at 300k and 400k of 500k.
# "cpu": a schedule of the same shape that fits a shared CPU (lr raised for the short run).
# "parity": the known setup of issue 20 (MNIST, MLP 784-256-256-10, one decoupling
# point after the second hidden layer, modules with one hidden layer of 256, batch
# 64, Adam 1e-3, 10 epochs = 10 x 937 steps, seeds 1, 2, 3; XLA), with the modules'
# learning rate per method (sg_lr_scale=None: 1/16 of the network's for dni, 1/4 for
# cdni; measured: docs/dni_feedforward.md).
# A preset sets DNIConfig fields (a list for a grid field: method, layers, seed);
# flags given explicitly win.
PRESETS = {
    "paper": dict(steps=500_000, learning_rate=3e-5, eval_every=5_000),
    "cpu": dict(steps=1_500, learning_rate=1e-3, eval_every=250),
    "parity": dict(model="fcn", layers=3, decouple=(2,), sg_hidden_layers=1, sg_units=256,
                   batch_size=64, learning_rate=1e-3, lr_boundaries=(), steps=9_370,
                   eval_every=937, jit_compile=True, diagnostics=True, sg_lr_scale=None,
                   method=("backprop", "dni", "cdni"),
                   seed=(1, 2, 3)),
}


@dataclasses.dataclass
class DNIConfig(FastPathOptions):
    """One run's settings; the defaults are the paper's (`PRESETS["paper"]`).

    On the command line `method`, `layers` and `seed` take comma lists: one run
    per combination (grid mode, `run_grid`).
    """

    dataset: str = option("mnist", "Image dataset.", choices=data_lib.IMAGE_DATASETS)
    data_dir: Optional[str] = option(None, "Directory with mnist/ etc.; default "
                                     "$DNI_TF_DATA_DIR.")
    model: str = option("fcn", "fcn: layers of 256 units (BN, ReLU); cnn: 128 5x5 filters "
                        "(BN, ReLU, pooling). The last layer is a linear classifier.",
                        choices=MODELS)
    layers: int = option(4, "Number of layers (>= 2: a decoupling point needs 2 layers); "
                         "several values = grid mode.", low=2, grid=True)
    width: Optional[int] = option(None, "Units per FCN layer (default 256) or filters per CNN "
                                  "layer (default 128), as in the paper.", low=1)
    method: str = option("cdni", "Training method; several = grid mode.", choices=METHODS,
                         grid=True)
    decouple: Optional[Sequence[int]] = option(
        None, "Decoupling points: 'all' (every layer) or a comma list of layer indices in "
        "[1, layers-1] (point k = output of layer k).", low=1, none_text="all")
    point: str = option("auto", "Where a decoupling point reads a layer: its batch-norm output "
                        "before the ReLU, or after the ReLU (and pooling); auto = pre_relu for "
                        "dni, post_relu for cdni (measured).", choices=POINT_CHOICES)
    sg_hidden_layers: int = option(0, "Hidden layers of the synthetic gradient modules.",
                                   low=0, high=2)
    sg_units: Optional[int] = option(None, "Hidden width of the modules (default 1024, or 128 "
                                     "filters).", low=1)
    gradient_units: str = option(
        "auto", "What the modules predict: the gradient of the batch-mean loss or per-example "
        "gradients (B times larger, tracked about B times more slowly under Adam); auto = "
        "batch_mean for dni, per_example for cdni (measured).", choices=GRADIENT_UNITS)
    sg_scale: float = option(1.0, "Synthetic gradients are multiplied by this.", low=0.0,
                             low_open=True)
    sg_lr_scale: Optional[float] = option(
        1.0, "The modules' learning rate is the network's times this (1 = one learning rate "
        "for everything); preset parity: per method, 1/16 for dni and 1/4 for cdni (measured; "
        "the earlier preset used 0.25 for both).", low=0.0, low_open=True)
    input_norm: bool = option(False, "FCN: normalise the inputs with the mean and std of the "
                              "training images (MNIST: 0.1307, 0.3081).")
    output_norm: bool = option(False, "FCN: batch norm on the logits (Dense without bias, then "
                               "batch norm).")
    init: str = option("keras", "FCN weights: keras = He-normal hidden, Glorot-uniform output; "
                       "torch = uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear default).",
                       choices=INITS)
    bn_momentum: float = option(0.99, "FCN batch-norm momentum of the moving statistics (Keras "
                                "0.99; PyTorch's default is 0.9 here).", low=0.0, high=1.0,
                                high_open=True)
    bn_epsilon: float = option(1e-3, "FCN batch-norm epsilon (Keras 1e-3, PyTorch 1e-5).",
                               low=0.0, low_open=True)
    adam_epsilon: float = option(1e-7, "Adam's epsilon (Keras 1e-7, PyTorch 1e-8).", low=0.0,
                                 low_open=True)
    lambda_mix: float = option(
        0.0, "BP(lambda): the gradient sent below each point is lambda x the gradient from "
        "above + (1 - lambda) x the synthetic one (1 = backprop).", low=0.0, high=1.0)
    target_mix: float = option(
        0.0, "Weight of the true gradient in the module targets only (layers still follow "
        "the synthetic gradient).", low=0.0, high=1.0)
    update_prob: float = option(1.0, "Probability that a decoupled layer is updated per step.",
                                low=0.0, high=1.0, low_open=True)
    unlock: str = option("update", "complete: synthetic inputs too (forward unlock).",
                         choices=UNLOCKS)
    input_targets: str = option(
        "real", "Complete unlock: input models regress onto the real forward chain (one extra "
        "forward pass) or onto the chain of synthetic inputs.", choices=INPUT_TARGETS)
    steps: int = option(500_000, "Training steps (preset: paper 500000, cpu 1500).", low=1)
    batch_size: int = option(256, "Training batch size.", low=1)
    learning_rate: float = option(3e-5, "Adam learning rate (preset: paper 3e-5, cpu 1e-3).",
                                  low=0.0, low_open=True)
    lr_boundaries: Sequence[float] = option(
        (0.6, 0.8), "Increasing fractions of --steps where the learning rate is divided by 10 "
        "(paper: 300k and 400k of 500k); empty = constant.", low=0.0, high=1.0,
        low_open=True, high_open=True, allow_empty=True)
    eval_every: int = option(5_000, "Evaluate on the test set every this many steps.", low=1)
    eval_batch_size: int = option(1000, "Test batch size.", low=1)
    diagnostics: bool = option(False, "Log cosine similarity and norm ratio between synthetic "
                               "and true gradients (one extra backward pass per step).")
    oracle: bool = option(False, "Testing aid: update layers from the true gradient.")
    seed: int = option(0, "Seed for initialisation, data order and sparse updates; several = "
                       "grid mode, a run per seed.", low=0, grid=True)
    # Pipelined DNI (dni_tf.pipelined_dni): block-wise execution and placement.
    execution: str = option("sequential", "pipelined: block j trains on the activation block "
                            "j-1 produced one step earlier, so the blocks can run at once "
                            "(dni/cdni; docs/pipelined_dni.md).",
                            choices=("sequential", "pipelined"))
    devices: Optional[Sequence[str]] = option(
        None, "One TensorFlow device per block, e.g. /CPU:0,/CPU:1 or /GPU:0,/GPU:1 (CPU "
        "devices beyond /CPU:0 are made by splitting the CPU); 'none' = no pinning.",
        none_text="none", distinct=False)
    # Blocks on the tasks of a TensorFlow cluster, surviving a lost worker
    # (dni_tf.pipelined_cluster, dni_tf.harness.lost_workers).
    cluster: bool = option(False, "Block j on task j of the TensorFlow cluster in TF_CONFIG ('worker' "
                           "job; task 0 is this process, every other task runs python -m "
                           "dni_tf.pipelined_cluster). A lost worker's block is dropped while the "
                           "others train and rejoins from the last checkpoint when it is back.")
    cluster_checkpoint_every: int = option(50, "With --cluster: steps between the checkpoints a "
                                           "returning block restarts from.", low=1)
    cluster_probe_seconds: float = option(2.0, "With --cluster: seconds between probes of a lost "
                                          "worker.", low=0.0, low_open=True)
    cluster_wait_seconds: float = option(600.0, "With --cluster: how long an evaluation (which "
                                         "needs every block) waits for a lost worker before the "
                                         "run stops (exit 1; rerun resumes).", low=0.0)
    cluster_restarts: int = option(3, "With --cluster: how many times a worker failure that "
                                   "escapes the lost-worker handler (outside a step, e.g. while "
                                   "Keras reads metrics) is survived by waiting for every worker "
                                   "and resuming from the last checkpoint in this process.",
                                   low=0)

    def num_blocks(self, layers: Optional[int] = None) -> int:
        """Blocks of the network (decoupling points + 1) for `layers` (default: `self.layers`)."""
        layers = self.layers if layers is None else layers
        return (len(self.decouple) if self.decouple else layers - 1) + 1

    def validate(self) -> None:
        """Raises UsageError / ValueError("<field>...") naming the field and the allowed values."""
        check_fields(self)
        if self.decouple is not None:
            bad = [k for k in self.decouple if not 1 <= k <= self.layers - 1]
            if bad:
                raise ValueError(f"decouple={','.join(map(str, self.decouple))}: decoupling points "
                                 f"must be 'all' or integers in [1, {self.layers - 1}] (layers={self.layers})")
        if self.lambda_mix > 0.0 and (self.unlock != "update" or self.oracle):
            raise ValueError("lambda_mix > 0 (BP(lambda)) needs --unlock=update and no --oracle")
        if self.method == "backprop" and (self.update_prob < 1 or self.unlock != "update"
                                          or self.oracle):
            raise ValueError("method=backprop: --update_prob < 1, --unlock=complete and --oracle "
                             "need --method=dni or cdni")
        if self.model != "fcn" and (self.input_norm or self.output_norm or self.init != "keras"
                                    or self.bn_momentum != 0.99 or self.bn_epsilon != 1e-3):
            raise ValueError("input_norm, output_norm, init, bn_momentum and bn_epsilon need "
                             "--model=fcn")
        if list(self.lr_boundaries) != sorted(self.lr_boundaries):
            raise ValueError(f"lr_boundaries={self.lr_boundaries}: increasing fractions in (0, 1)")
        self._validate_pipeline()
        self.check_fast_path()

    def fast_path_periods(self):
        return evaluation_periods(self.steps, self.eval_every)

    def jit_unsupported(self):
        if self.devices or self.cluster:
            return ("jit_compile with --devices or --cluster: XLA compiles the step for one "
                    "device (it fails on blocks pinned to several)")
        return None

    def steps_per_execution_unsupported(self):
        if self.cluster:
            return ("--cluster: the lost-worker handler must see every step (it drops a dead "
                    "worker's block between steps)")
        return None

    def _validate_pipeline(self) -> None:
        from dni_tf.pipelined_dni import EXECUTIONS, check_options

        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution={self.execution!r}: choose from {', '.join(EXECUTIONS)}")
        if self.execution == "pipelined" and self.method == "backprop":
            raise ValueError("execution=pipelined: backprop is locked and cannot be pipelined; "
                             "use --execution=sequential (with --devices: model-parallel backprop)")
        if ((self.execution == "pipelined" or self.devices or self.cluster)
                and self.method != "backprop" and self.module_lr_scale() != 1.0):
            raise ValueError(f"sg_lr_scale={self.module_lr_scale():g} (preset parity: per "
                             "method) is not supported with execution=pipelined, devices or "
                             "cluster: use --sg_lr_scale=1")
        if self.cluster and self.devices:
            raise ValueError("cluster and --devices: --cluster places the blocks on the tasks of "
                             "TF_CONFIG itself; give one of them")
        try:
            check_options(self.execution, self.devices or self.cluster, self.method, self.lambda_mix,
                          self.target_mix, self.oracle, self.diagnostics, self.update_prob,
                          self.unlock, self.input_targets)
        except ValueError as exc:
            raise ValueError(f"execution={self.execution} / devices: {exc}") from None

    def module_lr_scale(self) -> float:
        """`sg_lr_scale`, or the per-method default when it is None (the parity preset)."""
        if self.sg_lr_scale is None:
            return default_sg_lr_scale(self.method)
        return self.sg_lr_scale


def learning_rate_schedule(config: DNIConfig):
    """Piecewise constant: lr, lr/10, lr/100 ... at `lr_boundaries` x steps."""
    if not config.lr_boundaries:
        return config.learning_rate
    boundaries = [int(round(b * config.steps)) for b in config.lr_boundaries]
    values = [config.learning_rate * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def input_stats(config: DNIConfig, image_data) -> Optional[Tuple[float, float]]:
    """(mean, std) of every training pixel when `config.input_norm`, else None."""
    if not config.input_norm:
        return None
    images = image_data.train[0]
    return float(images.mean(dtype="float64")), float(images.std(dtype="float64"))


def build_model(config: DNIConfig, image_shape, num_classes,
                input_norm: Optional[Tuple[float, float]] = None,
                devices: Optional[Sequence[str]] = None):
    """The compiled `DNIClassifier` for `config` (Adam, cross-entropy on logits).

    `input_norm`: (mean, std) of the inputs (`input_stats`); needed when
    `config.input_norm`. `devices`: one device per block, instead of
    `config.devices` (the cluster's, `connect_cluster`).
    """
    if config.input_norm and input_norm is None:
        raise ValueError("config.input_norm needs input_norm=(mean, std) (see input_stats)")
    keras.utils.set_random_seed(config.seed)
    config.apply_mixed_precision()
    build = build_classifier
    extra = {}
    devices = devices or config.devices
    if config.execution != "sequential" or devices:
        from dni_tf.pipelined_dni import build_classifier as build

        extra = dict(execution=config.execution, batch_size=config.batch_size,
                     devices=list(devices) if devices else None)
    model = build(
        config.model, config.layers, image_shape, num_classes, seed=config.seed,
        width=config.width, point=config.point,
        input_norm=input_norm if config.input_norm else None, output_norm=config.output_norm,
        init=config.init, bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon,
        sg_lr_scale=config.module_lr_scale(), method=config.method, decouple=config.decouple,
        sg_hidden_layers=config.sg_hidden_layers, sg_units=config.sg_units,
        gradient_units=config.gradient_units, sg_scale=config.sg_scale,
        lambda_mix=config.lambda_mix, target_mix=config.target_mix,
        update_prob=config.update_prob, unlock=config.unlock, input_targets=config.input_targets,
        oracle=config.oracle, diagnostics=config.diagnostics, **extra)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate_schedule(config),
                                                  epsilon=config.adam_epsilon),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  **config.resolve(model).compile_kwargs())
    return model


def check_cluster(config: DNIConfig, depths: Optional[Sequence[int]] = None) -> None:
    """`--cluster`: this process is task 0 of TF_CONFIG's "worker" job and the job has a task
    per block (for each of `depths`, default `config.layers`); else PlacementError (exit 2).

    Reads TF_CONFIG only: nothing connects, so the CLI checks this before training.
    """
    from dni_tf import pipelined_cluster

    try:
        resolver = pipelined_cluster.resolver_from_env()
    except cli.UsageError as exc:
        raise type(exc)(f"--cluster: {exc}") from None
    if resolver.task_type not in (None, pipelined_cluster.JOB) or resolver.task_id not in (None, 0):
        raise pipelined_cluster.PlacementError(
            f"--cluster: this process must be task 0 of the '{pipelined_cluster.JOB}' job in "
            f"TF_CONFIG, it is {resolver.task_type} {resolver.task_id} (the other tasks run "
            "python -m dni_tf.pipelined_cluster)")
    for depth in depths or [config.layers]:
        try:
            pipelined_cluster.task_devices(resolver, config.num_blocks(depth))
        except cli.UsageError as exc:
            raise type(exc)(f"--cluster: {exc} ({depth} layers)") from None


def connect_cluster(config: DNIConfig):
    """`--cluster`: connects to the cluster in TF_CONFIG; one device per block.

    Raises PlacementError (a UsageError: exit 2, one line) for a missing or bad
    TF_CONFIG or too few "worker" tasks.
    """
    from dni_tf import pipelined_cluster

    check_cluster(config)
    return pipelined_cluster.connect(config.num_blocks())


def run_single(config: DNIConfig, workdir: str, image_data=None,
               extra_config: Optional[dict] = None,
               sweep: Optional[SweepProgress] = None,
               callbacks: Sequence[keras.callbacks.Callback] = ()) -> Tuple[dict, pd.DataFrame]:
    """Trains one configuration in `workdir` (resumes).

    With `config.cluster` the blocks run on the cluster's tasks and a
    `LostWorkerHandler` drops and rejoins the blocks of lost workers (its
    events go into the metrics: `worker_losses`, `rejoins`, `cluster_events`).
    A lost-worker error that escapes the handler (outside a step) is survived
    up to `cluster_restarts` times: once every worker listens, training
    resumes in this process from the last checkpoint (metric `restarts`; a
    "restarted" event).
    `callbacks`: extra Keras callbacks (after the harness's, before the handler).
    Returns (final metrics, the run's history: one row per evaluation).
    """
    config.validate()
    image_data = image_data or data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)
    devices = connect_cluster(config) if config.cluster else None
    stats = input_stats(config, image_data)
    train_data = image_data.train_dataset(config.batch_size, seed=config.seed)
    user_callbacks = list(callbacks)
    handler, events, restarts = None, [], 0
    if config.cluster:
        # Keras trims its frames from tracebacks; keep them for worker_lost_traceback.txt.
        keras.config.disable_traceback_filtering()
    start = time.time()
    while True:
        model = build_model(config, image_data.image_shape, image_data.num_classes, stats,
                            devices)
        if config.cluster:
            handler = _lost_worker_handler(config, image_data, stats, devices, train_data,
                                           workdir)
            callbacks = [*user_callbacks, handler]
        try:
            outcome = train_and_evaluate(
                model, train_data, image_data.test_dataset(config.eval_batch_size),
                steps=config.steps, eval_every=config.eval_every, workdir=workdir,
                label=f"{config.model}{config.layers} {config.method}", sweep=sweep,
                callbacks=callbacks, settings=dataclasses.asdict(config),
                checkpoint_guard=None if handler is None else handler.retry_after_rejoin)
            break
        except tf.errors.OpError as exc:
            from dni_tf.pipelined_cluster import LOST_WORKER_ERRORS

            if handler is None or not isinstance(exc, LOST_WORKER_ERRORS):
                raise
            events += handler.events
            devices = _resume_after_worker_failure(config, workdir, exc, restarts)
            restarts += 1
            newest = ResumableCheckpoint.checkpoints(os.path.join(workdir, "checkpoints"))[:1]
            events.append({"event": "restarted", "error": type(exc).__name__,
                           "step": handler.step,
                           "resumed_from": checkpoint_step(newest[0][1]) if newest else 0})
    final = outcome.final
    metrics = {k: v for k, v in final.items() if k != "step"}
    metrics.update(test_error=1.0 - final["test_accuracy"], steps=final["step"],
                   wall_seconds_this_call=round(time.time() - start, 1),
                   data_source=image_data.source)
    if handler is not None:
        events += handler.events
        metrics.update(devices=list(devices), cluster_events=events,
                       worker_losses=sum(e["event"] == "lost" for e in events),
                       rejoins=sum(e["event"] == "rejoined" for e in events),
                       restarts=restarts)
    # The module rate actually used is a setting (sg_lr_scale=None: per method), not a metric.
    record = {**dataclasses.asdict(config), "sg_lr_scale_used": config.module_lr_scale(),
              **(extra_config or {})}
    results.save_results(workdir, record, metrics, study=STUDY)
    return metrics, outcome.history


def _lost_worker_handler(config: DNIConfig, image_data, stats, devices, train_data,
                         workdir: str):
    """A `LostWorkerHandler` for a run on the cluster; it rebuilds the model to rejoin."""
    from dni_tf.core import build_for_restore
    from dni_tf.harness.lost_workers import LostWorkerHandler

    zeros = tf.nest.map_structure(lambda spec: tf.zeros([d or 1 for d in spec.shape],
                                                        spec.dtype), train_data.element_spec)

    def make_model():
        fresh = build_model(config, image_data.image_shape, image_data.num_classes, stats,
                            devices)
        build_for_restore(fresh, zeros)
        return fresh

    return LostWorkerHandler(
        make_model, os.path.join(workdir, "checkpoints"),
        checkpoint_every=config.cluster_checkpoint_every,
        probe_seconds=config.cluster_probe_seconds, wait_seconds=config.cluster_wait_seconds,
        log_dir=workdir)


def _resume_after_worker_failure(config: DNIConfig, workdir: str, exc: BaseException,
                                 restarts: int):
    """After a lost-worker error that escaped the handler: writes its traceback, waits
    (probing) for every task to listen, reconnects; returns the devices. WorkerLost
    (one line, exit 1; a rerun resumes) when out of restarts or a task stays away."""
    from dni_tf import pipelined_cluster

    first = (str(exc).strip().splitlines() or [""])[0]
    # Where it surfaced, for a bug report (the console gets one line).
    trace = os.path.join(workdir, "worker_lost_traceback.txt")
    with open(trace, "w") as f:
        f.write("".join(traceback.format_exception(exc)))
    what = (f"a cluster worker failed outside the step the handler watches "
            f"({type(exc).__name__}: {first}; where: {trace})")
    if restarts >= config.cluster_restarts:
        raise WorkerLost(f"{what}, after {restarts} restarts (--cluster_restarts); rerun the "
                         f"same command to resume from the last checkpoint") from exc
    logging.warning("%s: resuming from the last checkpoint once every worker listens "
                    "(restart %d of %d)", what, restarts + 1, config.cluster_restarts)
    tf.experimental.async_clear_error()
    addresses = pipelined_cluster.task_addresses()
    deadline = time.monotonic() + config.cluster_wait_seconds
    while not all(pipelined_cluster.worker_alive(a) for a in addresses.values()):
        if time.monotonic() >= deadline:
            raise WorkerLost(f"{what}; not every worker listened again within "
                             f"{config.cluster_wait_seconds:g} s; rerun the same command to "
                             f"resume from the last checkpoint") from exc
        time.sleep(config.cluster_probe_seconds)
    return connect_cluster(config)


def check_batch_size(config: DNIConfig, image_data) -> None:
    """UsageError unless --batch_size fits the training split (batches are full)."""
    count = len(image_data.train[1])
    cli.check_batch_size(config.batch_size, count,
                         f"{image_data.name} has {count} training examples")


def run_dir(workdir: str, config: DNIConfig, with_seed: bool = False) -> str:
    name = f"{config.model}{config.layers}_{config.method}"
    return os.path.join(workdir, f"{name}_seed{config.seed}" if with_seed else name)


def run_grid(config: DNIConfig, methods: Sequence[str], depths: Sequence[int], workdir: str,
             extra_config: Optional[dict] = None,
             seeds: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Runs every method x depth (x seed), then writes the table and figures; returns the table.

    `seeds`: None (or one seed) = `config.seed`, one folder per method x depth;
    several = a folder per method x depth x seed and the table holds the mean.
    Runs are trained in order; rerunning resumes and skips finished ones.
    """
    with_seed = seeds is not None and len(seeds) > 1
    seeds = list(seeds) if seeds else [config.seed]
    configs = [dataclasses.replace(config, method=m, layers=d, seed=s)
               for d in depths for m in methods for s in seeds]
    if len({run_dir(workdir, c, with_seed) for c in configs}) != len(configs):
        raise ValueError(f"methods {list(methods)}, depths {list(depths)} and seeds {seeds} "
                         "must each be distinct: two configurations would share one run folder")
    for c in configs:
        c.validate()
    image_data = data_lib.load_image_data(config.dataset, config.data_dir)
    check_batch_size(config, image_data)  # before the first configuration trains
    logging.info("data: %s from %s", config.dataset, image_data.source)
    finals, frames = [], []
    sweep = SweepProgress(configs, lambda c: f"{c.method}, {c.layers} layers, seed {c.seed}")
    for c in sweep:
        metrics, run_history = run_single(c, run_dir(workdir, c, with_seed), image_data,
                                          extra_config, sweep)
        finals.append({"method": c.method, "layers": c.layers, "seed": c.seed, **metrics})
        frame = run_history.copy()
        frame.insert(0, "seed", c.seed)
        frame.insert(0, "layers", c.layers)
        frame.insert(0, "method", c.method)
        frames.append(frame)
    tensorboard_views.log_sweep(workdir, [
        (run_dir(workdir, c, with_seed), {"method": c.method, "layers": c.layers, "seed": c.seed},
         f, h) for c, f, h in zip(configs, finals, frames)])
    history = pd.concat(frames, ignore_index=True)
    history["test_error"] = 1.0 - history["test_accuracy"]
    sg_cols = [col for col in history.columns if col.startswith("train_sg_loss_")]
    if sg_cols:
        history["train_sg_loss_mean"] = history[sg_cols].mean(axis=1)
    results.write_csv(os.path.join(workdir, results.HISTORY_FILE), history)
    table = error_table(pd.DataFrame(finals), config.model)
    results.write_csv(os.path.join(workdir, "table.csv"), table)
    per_seed = pd.DataFrame(finals)[["method", "layers", "seed", "test_error", "test_accuracy",
                                     "train_accuracy"]]
    results.write_csv(os.path.join(workdir, "table_seeds.csv"), per_seed)
    seed_note = (f", mean of seeds {', '.join(map(str, seeds))}" if with_seed else "")
    results.atomic_write_text(
        os.path.join(workdir, "table.md"),
        f"Test error (%) on {config.dataset}, {config.model.upper()}, after {config.steps} steps "
        f"of batch {config.batch_size}{seed_note}\n\n" + results.markdown_table(table, "{:.2f}"))
    title = f"{config.dataset} {config.model.upper()}"
    curves(history, "test_error", os.path.join(workdir, "test_error.png"), "test error",
           f"{title}: test error", log=True)
    if sg_cols:
        curves(history.dropna(subset=["train_sg_loss_mean"]), "train_sg_loss_mean",
               os.path.join(workdir, "sg_loss.png"), "mean synthetic-gradient loss",
               f"{title}: synthetic-gradient regression loss (train)", log=True)
    results.save_results(workdir, {**dataclasses.asdict(config), "methods": list(methods),
                                   "depths": list(depths), "seeds": seeds, **(extra_config or {})},
                         {"runs": finals}, study=STUDY)
    return table


def curves(history: pd.DataFrame, y: str, path: str, ylabel: str, title: str,
           log: bool = False) -> str:
    """Learning curves: `y` against step, a line per method, a panel per depth (2 a row)."""
    import seaborn as sns  # plotting only

    frame = history.copy()
    frame["layers"] = frame["layers"].astype(str)
    grid = sns.relplot(data=frame, x="step", y=y, hue="method", col="layers", kind="line",
                       marker="o", markersize=3, height=2.6, aspect=1.4,
                       col_wrap=min(2, frame["layers"].nunique()),
                       hue_order=[m for m in METHODS if m in set(frame["method"])],
                       palette={m: f"C{i}" for i, m in enumerate(METHODS)})
    grid.set_axis_labels("training step", ylabel)
    grid.set_titles("{col_name} layers")
    for ax in grid.axes.flat:
        ax.grid(alpha=0.3, which="both")
        if log:
            ax.set_yscale("log")
    grid.figure.suptitle(title, y=1.02)
    return plots.save_figure(grid.figure, path, dpi=100)


def error_table(finals: pd.DataFrame, model: str) -> pd.DataFrame:
    """Paper-style table: a row per method, a column per depth, test error in % (seed mean)."""
    table = finals.pivot_table(index="method", columns="layers", values="test_error",
                               aggfunc="mean") * 100.0
    order = [m for m in METHODS if m in table.index]
    table = table.loc[order]
    table.columns = [f"{model.upper()} {d} layers" for d in table.columns]
    return table.reset_index()
