"""scripts/sg_linear_bound.py: the linear ceiling for M, on a tiny trained Copy run."""

import os
import re
import subprocess
import sys

import pytest

from dni_tf.studies import recurrent_dni as study

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "sg_linear_bound.py")


def _run(workdir, *extra):
    return subprocess.run([sys.executable, SCRIPT, f"--workdir={workdir}", *extra],
                          capture_output=True, text=True, timeout=300)


def test_fits_an_affine_map_to_the_future_gradients_of_a_run(tmp_path):
    cfg = study.CopyTaskConfig(method="dni", truncation=2, hidden_size=6, batch_size=4,
                               steps=3, eval_every=3, eval_batches=1, min_length=2,
                               max_length=2, num_bits=2, sg_lr_scale=1.0)
    study.run_copy_task(cfg, str(tmp_path / "dni"))
    done = _run(tmp_path / "dni", "--batches=40")
    assert done.returncode == 0, done.stderr[-2000:]
    # L=2 at T=2: 5 steps, three windows, two window ends with a future: 20 held-out
    # batches x 2 x 4 rows.
    assert "dni T=2, L=2" in done.stdout and "160 held-out window ends" in done.stdout
    m = re.search(r"trained M: +cosine (\S+) .*\n.*best affine map: +cosine (\S+) +norm ratio "
                  r"(\S+) +\(in-sample cosine (\S+)\)", done.stdout)
    trained, fitted, ratio, in_sample = (float(v) for v in m.groups())
    assert -1 <= trained <= 1 and 0 < fitted <= 1 and ratio > 0
    # 13 parameters per output fitted on 160 rows: the in-sample fit is the better one.
    assert in_sample >= fitted
    # The trained M's score, by hand: the run's weights, its carried state, the script's
    # batches streamed in order with the state carried, scored on the second half.
    import glob
    import numpy as np
    import tensorflow as tf
    from dni_tf.data import sequence_tasks
    model, _ = study.build_copy_model(cfg)
    model.load_weights(sorted(glob.glob(str(tmp_path / "dni" / "checkpoints" / "*.h5")))[-1])
    state, true, predicted = model.train_state.value, [], []
    for i in range(40):
        x, y, mask = sequence_tasks.copy_batch(tf.constant([3_000_017, i], tf.int64), 4, 2, 2)
        q = model.synthetic_gradient_quality(x, y, mask, state=state)
        state = q["final_state"]
        if i >= 20:
            true.append(q["true"].numpy())
            predicted.append(q["predicted"].numpy())
    true, predicted = np.stack(true), np.stack(predicted)
    cosine = np.sum(true * predicted) / (np.linalg.norm(true) * np.linalg.norm(predicted))
    assert trained == pytest.approx(cosine, abs=1.5e-3)


def test_refuses_a_run_without_a_module(tmp_path):
    assert _run(tmp_path / "missing").returncode == 2
    cfg = study.CopyTaskConfig(method="bptt", truncation=2, hidden_size=4, batch_size=2,
                               steps=1, eval_every=1, eval_batches=1, num_bits=2)
    study.run_copy_task(cfg, str(tmp_path / "bptt"))
    refused = _run(tmp_path / "bptt")
    assert refused.returncode == 2 and "bptt run has no synthetic gradient module" in refused.stderr
