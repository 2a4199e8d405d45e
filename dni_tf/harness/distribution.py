"""Choosing a `tf.distribute` strategy for an experiment, and where each worker writes.

    with distribution.distributed("mirrored", workdir) as run_dir:
        run_sweep(config, run_dir)     # models built here are replicated; fit() distributes

Strategies (the `--distribution` flag of every entry point):
  none          TensorFlow's default strategy: one device.
  mirrored      `MirroredStrategy` over every local GPU (or the one CPU).
  multi_worker  `MultiWorkerMirroredStrategy`; the cluster and this process's
                task come from the `TF_CONFIG` environment variable.

What the caller must know:
* A multi-worker strategy must exist before TensorFlow runs any op, so enter
  `distributed` before loading data or building models.
* Every worker runs the same code on its own run directory: the chief writes to
  `workdir` itself, worker i to `workdir/workers/worker_i`. Each directory gets
  its own checkpoints, so a worker restarted with the same command resumes from
  its own last checkpoint (the workers checkpoint at the same steps). Only the
  chief's results are the experiment's results.
* Batches stay global: a dataset batched at B is split into B / replicas per
  replica, so results are comparable across strategies.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import tensorflow as tf

from dni_tf.errors import DistributionError

STRATEGIES = ("none", "mirrored", "multi_worker")


def cluster_task() -> dict:
    """This process's `{"type", "index"}` from TF_CONFIG, or chief/0 without one."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {"type": "chief", "index": 0}
    try:
        task = json.loads(raw).get("task", {})
        return {"type": task.get("type", "chief"), "index": int(task.get("index", 0))}
    except (ValueError, AttributeError, TypeError) as exc:
        raise DistributionError(f"TF_CONFIG is not valid JSON with a task entry ({exc})") from None


def is_chief(task: dict) -> bool:
    """Chief: the "chief" task, or worker 0 of a cluster that has no chief."""
    if task["type"] == "chief":
        return True
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy named `name` (one of `STRATEGIES`)."""
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        raw = os.environ.get("TF_CONFIG")
        if not raw:
            raise DistributionError("--distribution=multi_worker needs the TF_CONFIG "
                                    "environment variable (cluster and task)")
        try:
            workers = json.loads(raw)["cluster"]["worker"]
        except (ValueError, KeyError, TypeError):
            raise DistributionError("TF_CONFIG must give cluster.worker (a list of "
                                    "host:port) and task") from None
        if not workers:
            raise DistributionError("TF_CONFIG cluster.worker is empty")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise DistributionError(f"--distribution={name!r} is not allowed: choose from "
                            f"{', '.join(STRATEGIES)}")


def worker_workdir(workdir: str, name: str) -> str:
    """The run directory of this process: `workdir` for the chief (or no cluster)."""
    if name != "multi_worker":
        return workdir
    task = cluster_task()
    if is_chief(task):
        return workdir
    return os.path.join(workdir, "workers", f"{task['type']}_{task['index']}")


@contextlib.contextmanager
def distributed(name: str, workdir: str) -> Iterator[str]:
    """Creates the strategy `name`, enters its scope and yields this worker's run directory."""
    strategy = make_strategy(name)
    run_dir = worker_workdir(workdir, name)
    os.makedirs(run_dir, exist_ok=True)
    with strategy.scope():
        yield run_dir
