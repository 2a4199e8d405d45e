"""The shared fit loop: history rows, exact resume, divergence handling, progress."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

from dni_tf import callbacks, results
from dni_tf.cli import TrainingDiverged
from dni_tf.data import make_dataset
from dni_tf.gradient_dropping import GradientDropping
from dni_tf.training import SweepProgress, train_and_evaluate


def _data(n=96, seed=0, poison=False):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 5).astype("float32")
    if poison:
        x[:] = np.nan
    return x, rng.randint(0, 3, n).astype("int32")


def _model():
    keras.utils.set_random_seed(0)
    network = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                                keras.layers.Dropout(0.3, seed=1), keras.layers.Dense(3)])
    model = GradientDropping(network, keep_prob=0.5, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _run(workdir, steps, data=None, eval_prefix="test"):
    x, y = data or _data()
    return train_and_evaluate(
        _model(), make_dataset(x, y, 16, shuffle=True, seed=0, repeat=True, drop_remainder=True),
        make_dataset(x, y, 32, shuffle=False), steps=steps, eval_every=4, workdir=str(workdir),
        eval_prefix=eval_prefix)


def test_history_has_one_row_per_evaluation(tmp_path):
    final = _run(tmp_path, 12)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["step"].tolist() == [4, 8, 12]
    assert {"train_loss", "train_accuracy", "train_kept_fraction", "test_loss",
            "test_accuracy"} <= set(history.columns)
    assert final["step"] == 12 and final["test_loss"] == pytest.approx(history["test_loss"].iloc[-1])
    assert os.listdir(tmp_path / "tensorboard")


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    whole = _run(tmp_path / "whole", 12)
    _run(tmp_path / "split", 8)
    resumed = _run(tmp_path / "split", 12)
    assert resumed == whole  # shuffle order, dropout and gradient masks all restored
    assert pd.read_csv(tmp_path / "split" / "history.csv")["step"].tolist() == [4, 8, 12]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _run(tmp_path, 8)
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(TrainingDiverged, match="became nan by step 12"):
        _run(tmp_path, 16, data=_data(poison=True))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == checkpoints
    assert pd.read_csv(tmp_path / "history.csv")["step"].tolist() == [4, 8]


def test_results_are_written_atomically(tmp_path):
    path = results.save_results(str(tmp_path), {"lr": 0.1}, {"acc": float("nan")})
    assert json.loads(open(path).read())["metrics"]["acc"] == "nan"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left behind


def test_sweep_eta_counts_the_rest_of_this_run_and_every_later_run():
    sweep = SweepProgress(["a", "b", "c"])
    iterator = iter(sweep)
    next(iterator), next(iterator)  # now in run 2 of 3
    sweep.record(50, 10.0)  # 5 steps/s
    # 100-step runs, run 2 at step 50: 50 + 100 steps left at 5 steps/s.
    assert sweep.eta_seconds(50, 100) == pytest.approx(30.0)
    assert sweep.position(50, 100) == "sweep 2/3 ETA 0m30s"
    iterator.close()
    assert not callbacks._ACTIVE_SWEEPS


def test_progress_lines_show_the_sweep_position_only_inside_a_sweep(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(callbacks.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    for name in SweepProgress(["first", "second"], lambda n: f"run {n}"):
        _run(tmp_path / name, 8)
    _run(tmp_path / "alone", 4, eval_prefix="val")
    progress = [line for line in lines if " steps/s " in line]
    assert len(progress) == 5
    assert [line for line in lines if line.startswith("[sweep")] == [
        "[sweep 1/2] run first", "[sweep 2/2] run second", lines[-2]]
    assert lines[-2].startswith("[sweep] 2 runs done in ")
    assert [" sweep 1/2 ETA " in line for line in progress] == [True, True, False, False, False]
    assert [" sweep 2/2 ETA " in line for line in progress] == [False, False, True, True, False]
    assert " sweep 2/2 ETA 0m00s " in progress[3]  # the last step of the last run
    # Evaluation metrics carry the run's own prefix, as in its history.csv.
    assert " test_loss=" in progress[0] and " val_loss=" in progress[4]
    assert "test_" not in progress[4]
