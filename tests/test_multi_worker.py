"""Two real worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy."""

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT

TIME_LIMIT_S = 240


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _datasets(path):
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, np.array(obj))
                     if isinstance(obj, h5py.Dataset) else None)
    return found


def test_two_workers_train_in_lockstep_and_end_with_identical_weights(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "experiments.gradient_drop", "--dataset=digits",
               "--steps=20", "--eval_every=10", "--keep_probs=0.5", "--batch_size=32",
               "--distribution=multi_worker", f"--workdir={workdir}"]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIME_LIMIT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the workers did not finish within {TIME_LIMIT_S} s")
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]

    chief = os.path.join(workdir, "keep_prob_0.5", "checkpoints", "ckpt-0000002.weights.h5")
    other = os.path.join(workdir, "workers", "worker_1", "keep_prob_0.5", "checkpoints",
                         "ckpt-0000002.weights.h5")
    chief_weights, other_weights = _datasets(chief), _datasets(other)
    assert chief_weights.keys() == other_weights.keys() and len(chief_weights) > 4
    for name, value in chief_weights.items():
        np.testing.assert_array_equal(value, other_weights[name], err_msg=name)
    # Training happened: the weights moved away from the first checkpoint's.
    first = _datasets(chief.replace("0000002", "0000001"))
    assert any(not np.array_equal(first[k], v) for k, v in chief_weights.items())
    assert os.path.exists(os.path.join(workdir, "results.json"))
