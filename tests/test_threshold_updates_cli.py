"""Tests of the experiments.threshold_updates entry point and its sweep outputs."""

import dataclasses
import os

import pytest

from dni_tf.harness import cli, results
from dni_tf.data import load_image_data
from dni_tf.studies.threshold_updates import ThresholdSweepConfig, run_sweep

GOOD = dict(thresholds=(0.0, 1e-3), accumulation="sum", decay=0.9,
            clip=0.0, noise_stddev=0.0, sparse_backward=False, max_delay=0,
            dataset="mnist", model="mlp", hidden=(16,), optimizer="sgd",
            learning_rate=0.1, steps=20, eval_every=10, batch_size=8, seed=0,
            target_accuracy=0.9, data_dir=None)


def check_config(values):
    config = ThresholdSweepConfig(**values)
    config.validate()
    return config


@pytest.mark.parametrize("change, flag", [
    (dict(thresholds=(-1e-3,)), "thresholds"), (dict(thresholds=("x",)), "thresholds"),
    (dict(accumulation="adam"), "accumulation"), (dict(max_delay=-1), "max_delay"),
    (dict(decay=2.0), "decay"), (dict(clip=-1.0), "clip"), (dict(model="rnn"), "model"),
    (dict(dataset="imagenet"), "dataset"), (dict(hidden=(0,)), "hidden"),
    (dict(steps=0), "steps"), (dict(learning_rate=0.0), "learning_rate"),
    (dict(optimizer="lbfgs"), "optimizer")])
def test_bad_values_name_the_flag(change, flag):
    with pytest.raises(cli.UsageError, match=f"--{flag}"):
        check_config({**GOOD, **change})


def test_good_values_parse():
    config = check_config(GOOD)
    assert config.thresholds == (0.0, 1e-3) and config.hidden == (16,)


def test_sweep_writes_tables_figures_and_resumes(tmp_path):
    data = load_image_data("digits")
    config = check_config({**GOOD, "dataset": "digits", "max_delay": 1, "sparse_backward": True})
    metrics = run_sweep(config, str(tmp_path), data)
    for name in ("summary.csv", "summary.md", "curves.csv", "curves.png",
                 "accuracy_vs_sparsity.png", "results.json",
                 "threshold_0/history.csv", "threshold_0.001/results.json"):
        assert os.path.exists(os.path.join(tmp_path, name)), name
    assert results.load_results(str(tmp_path))["config"]["max_delay"] == 1
    dense, sparse = metrics["T=0"], metrics["T=0.001"]
    assert 0 < sparse["weight_updates"] < dense["weight_updates"]
    assert dense["cancelled_fraction"] == 0.0
    # A rerun finds the checkpoints and trains no further.
    again = run_sweep(config, str(tmp_path), data)
    assert again["T=0.001"]["weight_updates"] == sparse["weight_updates"]


def test_value_labels_are_short_and_exact():
    assert [cli.value_label(v) for v in (0, 1e-4, 0.5, 20.0, 1e-12)] == [
        "0", "0.0001", "0.5", "20", "1e-12"]
    assert cli.value_label(1.000001e-4) == "0.0001000001"
    assert cli.value_label(0.1 + 0.2) == "0.30000000000000004"


@pytest.mark.parametrize("change, message", [
    (dict(thresholds=(float("nan"),)), "--thresholds=nan is not a finite number"),
    (dict(thresholds=(1e-4, 0.0001)), "--thresholds: 0.0001 is given more than once"),
    (dict(decay=float("nan")), "--decay=nan is not a finite number"),
    (dict(learning_rate=float("inf")), "--learning_rate=inf is not a finite number")])
def test_non_finite_and_repeated_values_are_rejected(change, message):
    with pytest.raises(cli.UsageError, match=message):
        check_config({**GOOD, **change})


def test_close_thresholds_train_in_their_own_folders(tmp_path):
    data = load_image_data("digits")
    config = check_config({**GOOD, "dataset": "digits", "thresholds": (1e-4, 1.000001e-4),
                           "steps": 2, "eval_every": 2})
    metrics = run_sweep(config, str(tmp_path), data)
    for name in ("threshold_0.0001", "threshold_0.0001000001"):
        assert (tmp_path / name / "results.json").is_file(), name
    assert set(metrics) == {"T=0.0001", "T=0.0001000001"}
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[1].split(",")[0] != summary[2].split(",")[0]
    with pytest.raises(cli.UsageError, match=r"--batch_size=5000 is out of range: allowed \[1, 1497\]"):
        run_sweep(dataclasses.replace(config, batch_size=5000), str(tmp_path / "big"), data)
    assert not os.path.exists(tmp_path / "big")
