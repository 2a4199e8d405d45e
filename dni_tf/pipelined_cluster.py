"""Blocks of a pipelined DNI network on the tasks of a TensorFlow cluster.

TensorFlow's own runtime carries the activations and module targets between
processes: every task runs a `tf.distribute.Server`, the chief (task 0, the
process that runs `fit()`) connects to the cluster with
`tf.config.experimental_connect_to_cluster`, and then the remote devices
"/job:worker/replica:0/task:k/device:CPU:0" are ordinary `tf.device` targets
for `PipelinedDNIClassifier(devices=...)`. The cluster is described by
`TF_CONFIG` (`TFConfigClusterResolver`) or any other cluster resolver.

    # each worker k >= 1 (TF_CONFIG task index k):
    python -m dni_tf.pipelined_cluster [--threads=1]
    # the chief (TF_CONFIG task index 0):
    devices = pipelined_cluster.connect(num_blocks=2)
    model = PipelinedDNIClassifier(..., devices=devices)

A lost worker. When a worker dies, steps fail (`tf.errors.UnavailableError`
and similar). `lose_block(model, j)` marks block j lost: the step is retraced
without it (no forward, no update; the module at its input gets no targets
and stays as it is; blocks above it have no new input and idle), and the
blocks below it keep training: that block's updates are dropped, gradient
dropping at block granularity. When the worker is back, `rejoin(model,
make_model, checkpoint)` reconnects, builds a fresh model, loads the last
checkpoint and then copies back every variable that lives on a surviving
device (their current values, optimizer slots and buffers included), so the
returning block resumes from its checkpoint and nothing else is lost.
`rejoin_in_place` does the same inside the running model (no new model
object), so `fit()` can go on; `dni_tf.harness.lost_workers.LostWorkerHandler`
drives the whole cycle from a Keras callback (detect, drop, probe, rejoin).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf

from dni_tf.pipelined_dni import PlacementError, PipelinedDNIClassifier

JOB = "worker"


def resolver_from_env():
    """The `TF_CONFIG` cluster resolver; PlacementError when TF_CONFIG is missing or bad."""
    if not os.environ.get("TF_CONFIG"):
        raise PlacementError("TF_CONFIG is not set: a cluster needs "
                             '{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": k}}')
    try:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        resolver.cluster_spec()  # parses TF_CONFIG (the constructor does not)
        resolver.task_type, resolver.task_id
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PlacementError(f"TF_CONFIG cannot be read: {first}") from None
    return resolver


def task_devices(resolver, num_blocks: int, device_type: str = "CPU") -> List[str]:
    """One device per block, block j on task j of the "worker" job; PlacementError if too few."""
    spec = resolver.cluster_spec().as_dict()
    tasks = spec.get(JOB, [])
    if len(tasks) < num_blocks:
        raise PlacementError(f"the cluster has {len(tasks)} '{JOB}' tasks ({', '.join(tasks) or 'none'}), "
                             f"{num_blocks} blocks need {num_blocks}")
    return [f"/job:{JOB}/replica:0/task:{j}/device:{device_type}:0" for j in range(num_blocks)]


def connect(num_blocks: int, resolver=None, device_type: str = "CPU") -> List[str]:
    """Connects this process (task 0) to the cluster; returns one device name per block.

    Raises PlacementError (one line) for a cluster without the needed tasks.
    """
    resolver = resolver or resolver_from_env()
    devices = task_devices(resolver, num_blocks, device_type)
    tf.config.experimental_connect_to_cluster(resolver, job_name=JOB, task_index=0)
    return devices


def serve(resolver=None, threads: Optional[int] = None) -> None:
    """Runs this process's `tf.distribute.Server` (a worker task k >= 1) until killed."""
    resolver = resolver or resolver_from_env()
    config = None
    if threads:
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                          inter_op_parallelism_threads=threads)
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=JOB,
                                  task_index=resolver.task_id, protocol="grpc", config=config)
    server.join()


# Errors a step raises when a remote task is gone.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                      tf.errors.CancelledError, tf.errors.NotFoundError,
                      tf.errors.FailedPreconditionError, tf.errors.InternalError,
                      tf.errors.UnknownError)


def lose_block(model: PipelinedDNIClassifier, j: int) -> None:
    """Marks block j lost: later steps skip it (see the module docstring) and are retraced."""
    if not 0 <= j < len(model.block_slices):
        raise ValueError(f"block {j} does not exist (blocks 0..{len(model.block_slices) - 1})")
    if j == 0:
        raise ValueError("block 0 runs on the chief, which feeds the data: it cannot be lost")
    model.lost_blocks = sorted(set(model.lost_blocks) | {j})
    model.train_function = None  # retrace without the lost block
    model.make_train_function(force=True)


def all_variables(model: PipelinedDNIClassifier) -> list:
    """The model's variables, then its optimizers' (the same order for the same model)."""
    optimizers = [model.optimizer, *model.block_optimizers, *model.module_optimizers]
    return list(model.variables) + [v for o in optimizers for v in o.variables]


def same_device(a: str, b: str) -> bool:
    """Whether two device names name the same device (fields missing in either are ignored)."""
    a, b = tf.DeviceSpec.from_string(a), tf.DeviceSpec.from_string(b)
    return all(getattr(a, f) is None or getattr(b, f) is None or getattr(a, f) == getattr(b, f)
               for f in ("job", "replica", "task", "device_type", "device_index"))


def on_lost_device(model: PipelinedDNIClassifier, variable) -> bool:
    """Whether `variable` lives on the device of a lost block (its handle names it; no read)."""
    if not model.devices or not model.lost_blocks:
        return False
    return any(same_device(variable.handle.device, model.devices[j]) for j in model.lost_blocks)


def _restored_model(model: PipelinedDNIClassifier,
                    make_model: Callable[[], PipelinedDNIClassifier], checkpoint: str,
                    num_blocks: Optional[int], resolver, reconnect: bool):
    """(fresh model built after reconnecting and loaded from `checkpoint`, its variables),
    checked to match `model` variable for variable."""
    if reconnect:
        connect(num_blocks or len(model.block_slices), resolver)
    fresh = make_model()
    fresh.load_weights(checkpoint)
    variables = all_variables(fresh)
    count = len(all_variables(model))
    if len(variables) != count:
        raise ValueError(f"make_model() built {len(variables)} variables, the running model "
                         f"has {count}: not the same model")
    return fresh, variables


def rejoin(model: PipelinedDNIClassifier, make_model: Callable[[], PipelinedDNIClassifier],
           checkpoint: str, num_blocks: Optional[int] = None, resolver=None,
           reconnect: bool = True) -> PipelinedDNIClassifier:
    """A new model in which the lost blocks resume from `checkpoint` and the rest is current.

    `make_model()` must build and compile the same model (same devices); it
    is called after reconnecting to the cluster, so the returning worker gets
    fresh variables. `checkpoint` is a file written by
    `dni_tf.harness.callbacks.save` (or `save_weights`).
    `reconnect=False` skips reconnecting (devices of this process only).
    """
    keep = [None if on_lost_device(model, v) else v.numpy() for v in all_variables(model)]
    fresh, variables = _restored_model(model, make_model, checkpoint, num_blocks, resolver,
                                       reconnect)
    for v, value in zip(variables, keep):
        if value is not None:
            v.assign(value)
    return fresh


def task_of(device: str) -> Optional[int]:
    """The task index in a device name ("/job:worker/replica:0/task:1/..." -> 1), or None."""
    return tf.DeviceSpec.from_string(device).task


def task_addresses(resolver=None) -> Dict[int, str]:
    """{task index: "host:port"} of the "worker" job of the cluster (TF_CONFIG by default)."""
    resolver = resolver or resolver_from_env()
    return dict(enumerate(resolver.cluster_spec().as_dict().get(JOB, [])))


def worker_alive(address: str, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections at "host:port" (a cheap probe, no TensorFlow).

    A worker's gRPC server listens as soon as it serves, so an open port is a
    worker that can be reconnected to; a closed port is refused at once on a
    live host, and `timeout` bounds the wait on an unreachable one.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def dead_blocks(model: PipelinedDNIClassifier, error: Optional[BaseException] = None,
                addresses: Optional[Dict[int, str]] = None) -> List[int]:
    """The blocks (>= 1, not yet lost) whose worker task `error` names or that no longer listens.

    `error`: the exception a step raised; TensorFlow names the remote target
    ("/job:worker/replica:0/task:1/...") or its address in the message.
    `addresses`: `task_addresses()`; tasks without an address are only found
    through the message. Block 0 (the chief) is never returned.
    """
    if not model.devices:
        return []
    addresses = addresses or {}
    message = str(error) if error is not None else ""
    named = {int(t) for t in re.findall(rf"/job:{JOB}/replica:\d+/task:(\d+)", message)}
    named |= {task for task, address in addresses.items() if address in message}
    found = []
    for j in range(1, len(model.devices)):
        task = task_of(model.devices[j])
        if task is None or task == task_of(model.devices[0]) or j in model.lost_blocks:
            continue
        if task in named or (task in addresses and not worker_alive(addresses[task])):
            found.append(j)
    return found


def rejoin_in_place(model: PipelinedDNIClassifier,
                    make_model: Callable[[], PipelinedDNIClassifier], checkpoint: str,
                    num_blocks: Optional[int] = None, resolver=None,
                    reconnect: bool = True) -> List[int]:
    """Brings the lost blocks back into `model` itself from `checkpoint`; returns them.

    Like `rejoin`, but the running model object stays (so `fit()` and its
    callbacks go on): after reconnecting, `make_model()` builds a model whose
    variables on the returning devices are fresh, it loads `checkpoint`, and
    each variable of `model` that lived on a lost device is re-pointed at the
    fresh, restored one (weights, optimizer slots and step counts, buffers).
    Variables on surviving devices are not touched: their current values
    stay. The optimizers' variable indices and the traced step/test/predict
    functions are rebuilt. `make_model()` must build the same model with
    every variable created (e.g. `dni_tf.core.build_for_restore`);
    `checkpoint` is a `save_weights` file of `model` (also `harness.callbacks.save`).
    """
    lost = list(model.lost_blocks)
    if not lost:
        return []
    old = all_variables(model)
    on_lost = [on_lost_device(model, v) for v in old]
    _, new = _restored_model(model, make_model, checkpoint, num_blocks, resolver, reconnect)
    for variable, replacement, gone in zip(old, new, on_lost):
        if gone:
            if tuple(variable.shape) != tuple(replacement.shape):
                raise ValueError(f"make_model() built {replacement.path} with shape "
                                 f"{replacement.shape}, the running model {variable.shape}")
            # Keras variables hold their TensorFlow variable in `_value`; the old
            # one's resource died with the worker.
            variable._value = replacement._value
    for optimizer in [model.optimizer, *model.block_optimizers, *model.module_optimizers]:
        # The TensorFlow backend keys slots by the underlying variable's id.
        indices = getattr(optimizer, "_trainable_variables_indices", None)
        if indices is not None:
            indices.clear()
            for i, variable in enumerate(getattr(optimizer, "_trainable_variables", [])):
                indices[optimizer._var_key(variable)] = i
        if hasattr(optimizer, "_exclude_from_weight_decay_cache"):
            optimizer._exclude_from_weight_decay_cache = {}
    model.lost_blocks = []
    model.make_train_function(force=True)
    model.make_test_function(force=True)
    model.predict_function = None
    return lost


def _exit_with_parent() -> None:
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Serve one worker task of a pipelined DNI "
                                     "cluster (TF_CONFIG names the cluster and this task).")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op and inter-op threads of this task (default: TensorFlow's)")
    parser.add_argument("--exit_with_parent", action="store_true",
                        help="exit when the process that started this one ends (for tests)")
    args = parser.parse_args(argv)
    if args.exit_with_parent:
        _exit_with_parent()
    try:
        serve(threads=args.threads)
    except PlacementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
