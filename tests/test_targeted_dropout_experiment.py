"""dni-tf targeted-dropout (python -m experiments.targeted_dropout): usage errors (exit 2,
one line) and a tiny full run."""

import glob
import json
import os
import subprocess
import sys
import types

import pandas as pd
import pytest

from dni_tf.apps import targeted_dropout as exp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "experiments.targeted_dropout", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _flags(**overrides):
    values = dict(workdir="/tmp/x", regimes=["none"], alpha=0.5, gamma=0.5, dropout_rate=0.25,
                  ramp_epochs=0.0, rank_every=1, epochs=1.0, steps=0, eval_every=0,
                  batch_size=128, learning_rate=1e-3, prune_fractions=["0", "50"],
                  hidden=["8"])
    values.update(overrides)
    return types.SimpleNamespace(**values)


def test_validate_names_the_allowed_values():
    with pytest.raises(exp.cli.UsageError, match="choose from none, dropout"):
        exp.validate(_flags(regimes=["none", "targeted"]))
    with pytest.raises(exp.cli.UsageError, match=r"allowed \[0, 100\)"):
        exp.validate(_flags(prune_fractions=["99.5", "100"]))
    with pytest.raises(exp.cli.UsageError, match="'none' is given more than once"):
        exp.validate(_flags(regimes=["none", "none"]))
    exp.validate(_flags(steps=10, eval_every=3))  # evaluates at 3, 6, 9 and 10
    with pytest.raises(exp.cli.UsageError, match="--prune_fractions: 90 is given more than once"):
        exp.validate(_flags(prune_fractions=["90", "0", "90"]))
    with pytest.raises(exp.cli.UsageError, match="--prune_fractions=nan is not a finite number"):
        exp.validate(_flags(prune_fractions=["0", "nan"]))
    assert exp.validate(_flags(prune_fractions=["90", "0", "50"]))["fractions"] == [0.0, 50.0, 90.0]


def test_schedule_evaluates_once_per_epoch_or_every_eval_every_steps():
    assert exp.schedule(_flags(epochs=2.0), 60000) == (936, 468, 468)
    assert exp.schedule(_flags(steps=1000), 60000) == (1000, 468, 468)  # and at step 1000
    assert exp.schedule(_flags(steps=7), 60000)[1] == 7
    assert exp.schedule(_flags(steps=10, eval_every=3), 60000)[:2] == (10, 3)
    assert exp.schedule(_flags(steps=10, eval_every=30), 60000)[:2] == (10, 10)


def test_tiny_run_writes_table_figures_and_results(tmp_path):
    workdir = tmp_path / "td"
    proc = _run([f"--workdir={workdir}", "--dataset=digits", "--regimes=none,targeted_unit",
                 "--hidden=16,8", "--steps=6", "--eval_every=3", "--batch_size=32",
                 "--prune_fractions=0,50,90", "--seed=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ["pruning_accuracy.csv", "pruning_accuracy.md", "pruning_accuracy.png",
                 "weight_magnitudes.png", "results.json"]:
        assert (workdir / name).is_file(), name
    for regime in ["none", "targeted_unit"]:
        history = pd.read_csv(workdir / regime / "history.csv")
        assert list(history["step"]) == [3, 6]
        assert (workdir / regime / "weight_magnitudes.png").is_file()
        assert glob.glob(str(workdir / regime / "**" / "events.out.tfevents.*"), recursive=True)
    table = pd.read_csv(workdir / "pruning_accuracy.csv")
    assert len(table) == 2 * 2 * 3  # regimes x kinds x fractions
    unpruned = table[table["fraction"] == 0]
    assert unpruned.groupby("regime")["accuracy"].nunique().max() == 1  # 0% == unpruned
    assert table[table["fraction"] == 90]["sparsity"].min() >= 0.85
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["alpha"] == 0.5 and results["config"]["hidden"] == ["16", "8"]
    assert 0.0 <= results["metrics"]["targeted_unit/unit_pruned_50_accuracy"] <= 1.0
    assert "published_baseline" not in results  # only for fashion_mnist
    assert "| unit | targeted_unit |" in (workdir / "pruning_accuracy.md").read_text()
