"""The gradient-dropping entry point: end-to-end sweep, resume, and usage errors."""

import glob
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT
from dni_tf.studies.gradient_drop import GradientDropConfig, run_sweep


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.gradient_drop", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_sweep_writes_runs_table_figures_and_resumes(tmp_path):
    config = GradientDropConfig(keep_probs=(1.0, 0.5), dataset="digits", steps=20,
                                eval_every=10, batch_size=25, learning_rate=1e-3)
    history = run_sweep(config, str(tmp_path))
    assert sorted(history["keep_prob"].unique()) == [0.5, 1.0]
    assert history.groupby("keep_prob")["step"].apply(list).tolist() == [[10, 20], [10, 20]]
    half = history[history["keep_prob"] == 0.5]
    assert (half["prorated_step"] == half["step"] * 0.5).all()
    for name in ("history.csv", "results.json", "results_raw.png", "results_prorated.png",
                 "summary.csv", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    run = tmp_path / "keep_prob_0.5"
    assert glob.glob(str(run / "**" / "events.out.tfevents.*"), recursive=True)
    assert os.listdir(run / "checkpoints")
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["metrics"]["by_keep_prob"]) == {"1", "0.5"}
    assert 0.0 <= results["metrics"]["by_keep_prob"]["1"]["test_accuracy"] <= 1.0

    # A rerun with more steps resumes from the checkpoint: old rows kept, one added.
    before = pd.read_csv(run / "history.csv")
    run_sweep(GradientDropConfig(**{**config.__dict__, "steps": 30}), str(tmp_path))
    after = pd.read_csv(run / "history.csv")
    assert after["step"].tolist() == [10, 20, 30]
    pd.testing.assert_frame_equal(after.iloc[:2], before)


def test_close_keep_probs_get_their_own_folders_and_duplicates_are_rejected():
    from dni_tf.studies.gradient_drop import run_dir

    # `:g` would give both "keep_prob_0.5": the second run would resume the first.
    assert run_dir("w", 0.5) == os.path.join("w", "keep_prob_0.5")
    assert run_dir("w", 0.5000001) == os.path.join("w", "keep_prob_0.5000001")
    with pytest.raises(ValueError, match="--keep_probs: 0.5 is given more than once"):
        GradientDropConfig(keep_probs=(0.5, 0.5)).validate()
    with pytest.raises(ValueError, match="--learning_rate=nan is not a finite number"):
        GradientDropConfig(learning_rate=float("nan")).validate()


def test_the_tutorials_setup(real_data_dir):
    """The write-up trains the TensorFlow tutorial's CNN as the tutorial does: 55,000
    MNIST training images, Adam epsilon 1e-8, each layer initialised independently;
    the gradient masks draw from a stream apart from the dropout layer's."""
    import numpy as np

    from dni_tf.studies import gradient_drop as study

    config = GradientDropConfig(data_dir=real_data_dir)
    data = study.load_data(config)
    assert len(data.train[1]) == 55000 and len(data.test[1]) == 10000
    model = study.build_model(config, 0.5, data.image_shape, data.num_classes)
    assert model.optimizer.epsilon == 1e-8
    kernels = [layer.kernel.numpy().ravel() for layer in model.network.layers
               if hasattr(layer, "kernel")]
    assert len(kernels) == 4
    for small, large in zip(kernels, kernels[1:]):
        n = min(small.size, large.size)
        assert not np.allclose(small[:n], large[:n])  # not the same draws
    dropout = next(layer for layer in model.network.layers
                   if isinstance(layer, __import__("keras").layers.Dropout))
    assert model.seed != dropout.seed


def test_the_applied_fraction_covers_the_whole_run():
    """Keras resets the metric each period: the run's fraction weighs every period."""
    from dni_tf.studies.gradient_drop import _run_fraction

    history = pd.DataFrame({"step": [500, 1000, 1200],
                            "train_kept_fraction": [0.4, 0.6, 0.8]})
    assert _run_fraction(history) == pytest.approx((0.4 * 500 + 0.6 * 500 + 0.8 * 200) / 1200)
