"""dni-tf targeted-dropout (python -m experiments.targeted_dropout): usage errors (exit 2,
one line), a tiny full run, per-(regime, seed) resume and partial tables."""

import glob
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from dni_tf.errors import UsageError
from dni_tf.studies import targeted_dropout as study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=240):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "experiments.targeted_dropout", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _config(**overrides):
    values = dict(regimes=("none",), epochs=1.0, prune_fractions=(0.0, 50.0), hidden=(8,))
    values.update(overrides)
    return study.TargetedDropoutConfig(**values)


def test_validate_names_the_allowed_values():
    with pytest.raises(UsageError, match="choose from none, dropout"):
        _config(regimes=("none", "targeted")).validate()
    with pytest.raises(UsageError, match=r"allowed \[0, 100\)"):
        _config(prune_fractions=(99.5, 100.0)).validate()
    with pytest.raises(UsageError, match="'none' is given more than once"):
        _config(regimes=("none", "none")).validate()
    _config(steps=10, eval_every=3).validate()  # evaluates at 3, 6, 9 and 10
    with pytest.raises(UsageError, match="--prune_fractions: 90.0 is given more than once"):
        _config(prune_fractions=(90.0, 0.0, 90.0)).validate()
    with pytest.raises(UsageError, match="--prune_fractions=nan is not a finite number"):
        _config(prune_fractions=(0.0, float("nan"))).validate()
    with pytest.raises(UsageError, match="--seeds: 2 is given more than once"):
        _config(seeds=(2, 2)).validate()
    with pytest.raises(UsageError, match="--steps_per_execution"):
        _config(steps_per_execution=-1).validate()
    _config(steps_per_execution=0).validate()  # 0 = auto
    with pytest.raises(UsageError, match="--xla_regimes: give it or --jit_compile"):
        _config(xla_regimes=("targeted_unit",), jit_compile=False).validate()
    _config(regimes=("targeted_weight_ramp", "targeted_unit_ramp"),
            xla_regimes=("targeted_weight_ramp",)).validate()
    _config(xla_regimes=()).validate()  # the one list that may be empty
    with pytest.raises(UsageError, match="--xla_regimes='weight'"):
        _config(xla_regimes=("weight",)).validate()


def test_steps_per_execution_must_divide_every_evaluation_period():
    def regime(k, steps, eval_every, name="none", **kwargs):
        config = _config(steps_per_execution=k, **kwargs)
        fast = config.regime_fast_path(name, (eval_every, steps % eval_every or eval_every))
        return fast.jit_compile, fast.steps_per_execution

    assert regime(12, 9360, 468) == (False, 12)
    with pytest.raises(UsageError, match="--steps_per_execution=10: must divide"):
        regime(10, 9360, 468)
    with pytest.raises(UsageError, match=r"periods \[4\]"):
        regime(3, 1000, 12)
    # Defaults: XLA one step per call for the weight variant (measured faster), the
    # largest k dividing every period for the others; --xla_regimes as before.
    assert regime(0, 9360, 468, "targeted_weight") == (True, 1)
    assert regime(0, 9360, 468) == (False, 39)  # 468 = 39 x 12
    assert regime(0, 1000, 12) == (False, 4)
    assert regime(4, 1000, 12, "targeted_unit", xla_regimes=("targeted_unit",)) == (True, 1)
    assert regime(4, 1000, 12, "targeted_weight", xla_regimes=("targeted_unit",)) == (False, 4)
    assert regime(0, 1000, 12, jit_compile=True) == (True, 4)


def test_schedule_evaluates_once_per_epoch_or_every_eval_every_steps():
    assert _config(epochs=2.0).schedule(60000) == (936, 468, 468)
    assert _config(steps=1000).schedule(60000) == (1000, 468, 468)  # and at step 1000
    assert _config(steps=7).schedule(60000)[1] == 7
    assert _config(steps=10, eval_every=3).schedule(60000)[:2] == (10, 3)
    assert _config(steps=10, eval_every=30).schedule(60000)[:2] == (10, 10)


def test_tables_from_finished_cells_list_the_missing_ones(tmp_path):
    def cell(regime, seed, accuracy):
        table = pd.DataFrame({"kind": ["weight", "weight", "unit", "unit"],
                              "fraction": [0.0, 50.0, 0.0, 50.0],
                              "accuracy": [accuracy] * 4, "sparsity": [0.0, 0.5, 0.0, 0.5],
                              "model_sparsity": [0.0, 0.4, 0.0, 0.4], "evaluation": "dense",
                              "regime": regime, "seed": seed})
        return table, None, {"test_accuracy": accuracy, "step": 10,
                             "weight_pruned_50_accuracy": accuracy}, pd.DataFrame({"step": [10]})

    cells = [("none", 1), ("targeted_unit", 1), ("none", 2), ("targeted_unit", 2)]
    finished = {("none", 1): cell("none", 1, 0.5), ("none", 2): cell("none", 2, 0.7),
                ("targeted_unit", 1): cell("targeted_unit", 1, 0.9)}
    metrics = study.write_tables(str(tmp_path), {"regimes": ["none"]}, cells, finished,
                                 baseline=False, evaluation="dense")
    assert metrics["none/weight_pruned_50_accuracy"] == pytest.approx(0.6)  # mean of 2 seeds
    assert metrics["none/seed_2/test_accuracy"] == 0.7
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "partial" and saved["missing_cells"] == ["targeted_unit seed 2"]
    text = (tmp_path / "pruning_accuracy.md").read_text()
    assert "| kind | regime | seeds | 0% (dense) | 50% |" in text
    assert "| weight | none | 2 | 60.0 | 60.0 |" in text
    assert "| unit | targeted_unit | 1 | 90.0 | 90.0 |" in text
    wide = study.wide_table(pd.concat([finished[c][0] for c in finished]), True,
                            "remove_targets")
    assert "0% (targets removed)" in wide.columns


def test_tiny_run_writes_table_figures_and_results_and_resumes_per_cell(tmp_path):
    workdir = tmp_path / "td"
    common = [f"--workdir={workdir}", "--dataset=digits", "--regimes=none,targeted_unit",
              "--hidden=16,8", "--steps=6", "--eval_every=3", "--batch_size=32",
              "--prune_fractions=0,50,90", "--steps_per_execution=3",
              "--xla_regimes=targeted_unit"]
    proc = _run([*common, "--seeds=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ["pruning_accuracy.csv", "pruning_accuracy.md", "pruning_accuracy.png",
                 "weight_magnitudes.png", "results.json"]:
        assert (workdir / name).is_file(), name
    for regime in ["none", "targeted_unit"]:
        cell = workdir / regime / "seed_1"
        history = pd.read_csv(cell / "history.csv")
        assert list(history["step"]) == [3, 6]
        assert (cell / "weight_magnitudes.png").is_file()
        assert glob.glob(str(cell / "**" / "events.out.tfevents.*"), recursive=True)
    table = pd.read_csv(workdir / "pruning_accuracy.csv")
    assert len(table) == 2 * 2 * 3  # regimes x kinds x fractions
    unpruned = table[table["fraction"] == 0]
    assert unpruned.groupby("regime")["accuracy"].nunique().max() == 1  # 0% == unpruned
    assert table[table["fraction"] == 90]["sparsity"].min() >= 0.85
    results = json.loads((workdir / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["alpha"] == 0.5 and results["config"]["hidden"] == [16, 8]
    assert 0.0 <= results["metrics"]["targeted_unit/unit_pruned_50_accuracy"] <= 1.0
    assert "published_baseline" not in results  # only for fashion_mnist
    assert "| unit | targeted_unit | 1 |" in (workdir / "pruning_accuracy.md").read_text()

    # A second seed, in process (the library call a notebook makes; saves a
    # TensorFlow start-up): the finished seed-1 cells are read back, not retrained.
    from dni_tf import data

    first = (workdir / "none" / "seed_1" / "history.csv").stat().st_mtime_ns
    config = study.TargetedDropoutConfig(
        dataset="digits", regimes=("none", "targeted_unit"),
        hidden=(16, 8), steps=6, eval_every=3, batch_size=32, prune_fractions=(0.0, 50.0, 90.0),
        steps_per_execution=3, xla_regimes=("targeted_unit",), seeds=(1, 2))
    study.run_study(data.load_image_data("digits"), str(workdir), config)
    assert (workdir / "none" / "seed_1" / "history.csv").stat().st_mtime_ns == first
    assert list(pd.read_csv(workdir / "none" / "seed_2" / "history.csv")["step"]) == [3, 6]
    assert "| unit | targeted_unit | 2 |" in (workdir / "pruning_accuracy.md").read_text()
    assert len(pd.read_csv(workdir / "pruning_accuracy.csv")) == 2 * 2 * 2 * 3

    # Other training settings in the same folder: one line, exit 2, nothing overwritten.
    proc = _run([*common, "--seeds=1", "--alpha=0.3"])
    assert proc.returncode == 2
    assert "was trained with other settings: alpha=0.5 (now 0.3)" in proc.stderr
    assert (workdir / "none" / "seed_1" / "history.csv").stat().st_mtime_ns == first
