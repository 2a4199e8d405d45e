"""scripts/sg_linear_bound.py: the linear ceiling for M, on a tiny trained Copy run."""

import glob
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from dni_tf.data import sequence_tasks
from dni_tf.studies import recurrent_dni as study

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "sg_linear_bound.py")
_spec = importlib.util.spec_from_file_location("sg_linear_bound", SCRIPT)
bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bound)


# Continuous at T=3: 20-step segments cut at 18 or 21 steps, so segments differ in length.
@pytest.mark.parametrize("episodes, t", [("stream", 2), ("continuous", 3)])
def test_fits_an_affine_map_to_the_future_gradients_of_a_run(tmp_path, episodes, t):
    cfg = study.CopyTaskConfig(method="dni", truncation=t, hidden_size=6, batch_size=4,
                               steps=3, eval_every=3, eval_batches=1, min_length=2,
                               max_length=2, num_bits=2, sg_lr_scale=1.0, episodes=episodes)
    study.run_copy_task(cfg, str(tmp_path))
    # A killed save's temporary is never read as the newest checkpoint.
    (tmp_path / "checkpoints" / "tmp-999.weights.h5").write_bytes(b"partial")
    # Continuous segments hold four episodes each: fewer of them make as many rows.
    batches = 20 if episodes == "stream" else 12
    r = bound.linear_bound(str(tmp_path), batches=batches)
    assert (r["method"], r["truncation"], r["length"]) == ("dni", t, 2)
    assert f"dni T={t}, L=2" in bound.report("W", r) and "all later losses" in bound.report("W", r)
    near = bound.linear_bound(str(tmp_path), batches=10, next_window_only=True)
    assert "next window's loss" in bound.report("W", near)
    assert near["m_norm_ratio"] != pytest.approx(r["m_norm_ratio"], rel=1e-3)
    assert 0 < r["fit_cosine"] <= 1 and r["fit_norm_ratio"] > 0
    if episodes == "stream":
        # 13 parameters per output fitted on 80 rows: the in-sample fit is the better one.
        assert r["fit_in_sample_cosine"] >= r["fit_cosine"]
    # The trained M's score, by hand: the run's weights, its carried state, the script's
    # batches streamed in order with the state carried, scored on the second half.
    model, _ = study.build_copy_model(cfg)
    model.load_weights(sorted(glob.glob(str(tmp_path / "checkpoints" / "ckpt-*.h5")))[-1])
    state, true, predicted, dots, norms, true_norms = model.train_state.value, [], [], 0, 0, 0
    if episodes == "continuous":
        # One stream: the checkpoint's pending steps, then episodes 0, 1, ... in order;
        # segment i ends at the last window end before its four episodes' end.
        p = int(model.pending_steps.numpy())  # 3 batches of 5 steps at T=3: none over
        pending = [v.numpy()[:, :p] for v in (model.pending_x, model.pending_y,
                                              model.pending_mask)]
        parts = [sequence_tasks.copy_batch(tf.constant([3_000_017, k], tf.int64), 4, 2, 2)
                 for k in range(4 * batches)]
        stream = [np.concatenate([pending[j]] + [e[j].numpy() for e in parts], 1)
                  for j in range(3)]
        ends = [0] + [(p + 20 * (i + 1)) // t * t for i in range(batches)]
        windows = [(ends[i + 1] - ends[i]) // t for i in range(batches // 2, batches)]
        assert len(set(windows)) > 1
        # Every window end but each segment's last has a future, 4 rows each.
        assert r["held_out_rows"] == sum(k - 1 for k in windows) * 4
    else:
        # L=2 at T=2: 5 steps, three windows, two window ends with a future: 10 held-out
        # batches x 2 x 4 rows.
        assert r["held_out_rows"] == 80
    for i in range(batches):
        if episodes == "continuous":
            x, y, mask = (v[:, ends[i]:ends[i + 1]] for v in stream)
        else:
            x, y, mask = sequence_tasks.copy_batch(tf.constant([3_000_017, i], tf.int64), 4,
                                                   2, 2)
        q = model.synthetic_gradient_quality(x, y, mask, state=state,
                                             weight_space=i >= batches // 2)
        state = q["final_state"]
        if i >= batches // 2:
            true.append(q["true"].numpy())
            predicted.append(q["predicted"].numpy())
            norm, true_norm = q["update_norm"].numpy(), q["update_true_norm"].numpy()
            dots += np.sum(q["update_cosine"].numpy() * norm * true_norm)
            norms += np.sum(norm ** 2)
            true_norms += np.sum(true_norm ** 2)
    true, predicted = np.concatenate(true, 0), np.concatenate(predicted, 0)
    cosine = np.sum(true * predicted) / (np.linalg.norm(true) * np.linalg.norm(predicted))
    assert r["m_cosine"] == pytest.approx(cosine, rel=1e-4)
    assert r["m_norm_ratio"] == pytest.approx(np.linalg.norm(predicted) / np.linalg.norm(true),
                                              rel=1e-4)
    assert r["m_update_cosine"] == pytest.approx(dots / np.sqrt(norms * true_norms),
                                                 rel=1e-4, abs=1e-6)
    assert r["m_update_norm_ratio"] == pytest.approx(np.sqrt(norms / true_norms), rel=1e-4)
    assert "in the core's weights" in bound.report("W", r)


def test_refuses_a_run_without_a_module(tmp_path):
    with pytest.raises(ValueError, match="--workdir: needs a Copy run directory"):
        bound.linear_bound(str(tmp_path / "missing"))
    cfg = study.CopyTaskConfig(method="bptt", truncation=2, hidden_size=4, batch_size=2,
                               steps=1, eval_every=1, eval_batches=1, num_bits=2)
    study.run_copy_task(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="bptt run has no synthetic gradient module"):
        bound.linear_bound(str(tmp_path))
