"""The shared fit loop: history rows, exact resume, divergence handling, progress."""

import json
import os
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import count_traces
from dni_tf.harness import callbacks, cli, results
from dni_tf.errors import CheckpointError, TrainingDiverged, UsageError
from dni_tf.data import make_dataset
from dni_tf.gradient_dropping import GradientDropping
from dni_tf.harness.training import SweepProgress, train_and_evaluate


def _data(n=96, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.rand(n, 5).astype("float32")
    return x, rng.randint(0, 3, n).astype("int32")


def _model(hidden=8):
    keras.utils.set_random_seed(0)
    network = keras.Sequential([keras.Input((5,)), keras.layers.Dense(hidden, activation="relu"),
                                keras.layers.Dropout(0.3, seed=1), keras.layers.Dense(3)])
    model = GradientDropping(network, keep_prob=0.5, seed=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _run(workdir, steps, eval_prefix="test", model=None, extra_callbacks=(), eval_every=4,
         sweep=None):
    """The last evaluation of a tiny run (`train_and_evaluate(...).final`)."""
    x, y = _data()
    return train_and_evaluate(
        model or _model(),
        make_dataset(x, y, 16, shuffle=True, seed=0, repeat=True, drop_remainder=True),
        make_dataset(x, y, 32, shuffle=False), steps=steps, eval_every=eval_every,
        workdir=str(workdir), eval_prefix=eval_prefix, callbacks=extra_callbacks,
        sweep=sweep).final


class _PoisonWeights(keras.callbacks.Callback):
    """Writes NaN into every trainable weight at train begin (after the resume).

    Divergence is injected into the weights, not the inputs: how a NaN input
    flows through an op depends on the CPU and its kernels (oneDNN's MatMul fused
    with ReLU turns it into 0), while NaN logits make the loss NaN everywhere.
    """

    def on_train_begin(self, logs=None):
        for variable in self.model.trainable_variables:
            variable.assign(tf.fill(variable.shape, float("nan")))


def _checkpoint_names(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_history_has_one_row_per_evaluation(tmp_path):
    final = _run(tmp_path, 12)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["step"].tolist() == [4, 8, 12]
    assert {"train_loss", "train_accuracy", "train_kept_fraction", "test_loss",
            "test_accuracy"} <= set(history.columns)
    assert final["step"] == 12 and final["test_loss"] == pytest.approx(history["test_loss"].iloc[-1])
    assert _tensorboard_steps(tmp_path) == [4, 8, 12]


def test_a_plain_keras_model_traces_its_train_step_once(tmp_path):
    """The harness builds optimizer slots and metrics before fit(); Keras alone would
    create them inside the first trace and trace the whole step a second time."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    traces = count_traces(model)
    _run(tmp_path, 4, model=model)
    assert len(traces) == 1


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    whole = _run(tmp_path / "whole", 12)
    _run(tmp_path / "split", 8)
    resumed = _run(tmp_path / "split", 12)
    assert resumed == whole  # shuffle order, dropout and gradient masks all restored
    assert pd.read_csv(tmp_path / "split" / "history.csv")["step"].tolist() == [4, 8, 12]


def test_the_returned_history_is_the_whole_run_without_rereading_history_csv(tmp_path,
                                                                            monkeypatch):
    x, y = _data()

    def train(steps):
        return train_and_evaluate(
            _model(), make_dataset(x, y, 16, shuffle=True, seed=0, repeat=True,
                                   drop_remainder=True),
            make_dataset(x, y, 32, shuffle=False), steps=steps, eval_every=4,
            workdir=str(tmp_path))

    train(8)
    # A resumed run reads its earlier rows once, when training starts; the
    # rows it adds reach the caller in memory.
    reads = []
    real_load = results.load_history
    monkeypatch.setattr(results, "load_history", lambda d: reads.append(d) or real_load(d))
    outcome = train(12)
    assert len(reads) == 1
    assert outcome.history["step"].tolist() == [4, 8, 12]
    pd.testing.assert_frame_equal(outcome.history, pd.read_csv(tmp_path / "history.csv"),
                                  check_dtype=False)
    assert outcome.final == {k: (int(v) if k == "step" else float(v))
                             for k, v in outcome.history.iloc[-1].items()}


def _tensorboard_steps(workdir, tag="test/loss"):
    """Steps of the TensorBoard scalar `tag`, wherever under `workdir` the events are."""
    import glob

    steps = []
    for path in glob.glob(os.path.join(str(workdir), "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_steps_not_a_multiple_of_eval_every_evaluate_at_the_last_step(tmp_path):
    model = _model()
    final = _run(tmp_path, 10, model=model)  # evaluations every 4 steps: 4, 8 and 10
    assert int(model.optimizer.iterations.numpy()) == 10  # the last period is 2 steps
    assert pd.read_csv(tmp_path / "history.csv")["step"].tolist() == [4, 8, 10]
    assert final["step"] == 10
    assert _tensorboard_steps(tmp_path) == [4, 8, 10]
    assert _checkpoint_names(tmp_path) == ["ckpt-0000002.weights.h5", "ckpt-0000003.weights.h5"]
    assert callbacks.checkpoint_step(str(tmp_path / "checkpoints" / "ckpt-0000003.weights.h5")) == 10
    # eval_every above steps: one evaluation, at the end.
    assert _run(tmp_path / "once", 3)["step"] == 3
    assert pd.read_csv(tmp_path / "once" / "history.csv")["step"].tolist() == [3]


def test_a_short_last_period_resumes_exactly(tmp_path):
    whole = _run(tmp_path / "whole", 10)
    _run(tmp_path / "split", 8)  # killed after the last full period
    assert _run(tmp_path / "split", 10) == whole
    assert pd.read_csv(tmp_path / "split" / "history.csv")["step"].tolist() == [4, 8, 10]
    # Rerunning the finished run trains nothing and restores the step-10 weights.
    model = _model()
    assert _run(tmp_path / "whole", 10, model=model) == whole
    assert pd.read_csv(tmp_path / "whole" / "history.csv")["step"].tolist() == [4, 8, 10]
    reference = _model()
    _run(tmp_path / "split", 10, model=reference)
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_run_that_ended_on_a_short_period_continues_exactly(tmp_path):
    # 10 steps (evaluated at 4, 8, 10), then the same run asked for 12: it trains
    # steps 11-12 on the batches an uninterrupted 12-step run sees there.
    whole = _run(tmp_path / "whole", 12)
    _run(tmp_path / "extended", 10)
    extended = _run(tmp_path / "extended", 12)
    assert pd.read_csv(tmp_path / "extended" / "history.csv")["step"].tolist() == [4, 8, 10, 12]
    # Evaluations do not change training: the step-12 test metrics are identical
    # (train_* metrics average over the period, 9-12 against 11-12).
    assert {k: v for k, v in extended.items() if not k.startswith("train_")} == {
        k: v for k, v in whole.items() if not k.startswith("train_")}
    assert _tensorboard_steps(tmp_path / "extended") == [4, 8, 10, 12]


def test_a_resume_with_another_eval_every_evaluates_every_eval_every_from_the_checkpoint(tmp_path):
    _run(tmp_path, 10)  # checkpoint after 3 evaluations, at step 10
    _run(tmp_path, 16, eval_every=3)
    assert pd.read_csv(tmp_path / "history.csv")["step"].tolist() == [4, 8, 10, 13, 16]
    assert callbacks.checkpoint_step(str(tmp_path / "checkpoints" / "ckpt-0000005.weights.h5")) == 16


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _run(tmp_path, 8)
    checkpoints = _checkpoint_names(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"^loss became nan by step 12; the last good "
                       r"checkpoint \(.*ckpt-0000002\.weights\.h5, step 8\) is kept$"):
        _run(tmp_path, 16, extra_callbacks=[_PoisonWeights()])
    assert _checkpoint_names(tmp_path) == checkpoints
    assert pd.read_csv(tmp_path / "history.csv")["step"].tolist() == [4, 8]


class _AccumulatorModel(keras.Model):
    """A finite loss, but its own metric `acc_norm` turns NaN after step 8.

    Stands for an algorithm whose internal state (say, a threshold accumulator)
    became non-finite while the loss it reports did not.
    """

    def __init__(self):
        super().__init__(name="accumulator_model")
        self.dense = keras.layers.Dense(3)
        self.acc_norm = keras.metrics.Mean(name="acc_norm")

    def call(self, inputs):
        return self.dense(inputs)

    def train_step(self, data):
        logs = super().train_step(data)
        broken = self.optimizer.iterations > 8
        self.acc_norm.update_state(tf.where(broken, float("nan"), 1.0))
        return {**logs, "acc_norm": self.acc_norm.result()}

    @property
    def metrics(self):
        return [*super().metrics, self.acc_norm]


def test_a_non_finite_algorithm_metric_stops_the_run_although_the_loss_is_finite(tmp_path):
    keras.utils.set_random_seed(0)
    model = _AccumulatorModel()
    model.compile(optimizer="sgd", jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(TrainingDiverged, match=r"^acc_norm became nan by step 12; the last good "
                       r"checkpoint \(.*ckpt-0000002\.weights\.h5, step 8\) is kept$"):
        _run(tmp_path, 16, model=model)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["step"].tolist() == [4, 8]
    assert np.isfinite(history["train_loss"]).all() and (history["train_acc_norm"] == 1.0).all()
    assert _checkpoint_names(tmp_path) == ["ckpt-0000001.weights.h5", "ckpt-0000002.weights.h5"]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch):
    whole = _run(tmp_path / "whole", 12)
    workdir = tmp_path / "split"
    _run(workdir, 8)
    _truncate(workdir / "checkpoints" / "ckpt-0000002.weights.h5")
    warnings = []
    monkeypatch.setattr(callbacks.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
    resumed = _run(workdir, 12)
    # One line names the bad file and the one used instead.
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "ckpt-0000002.weights.h5 is unreadable" in warnings[0]
    assert warnings[0].endswith("resuming from " + str(workdir / "checkpoints" / "ckpt-0000001.weights.h5")
                                + " instead")
    # Resumed from step 4 with the data stream at step 4: as if never interrupted.
    assert resumed == whole
    assert pd.read_csv(workdir / "history.csv")["step"].tolist() == [4, 8, 12]
    # The bad file was moved aside before steps 5-8 were checkpointed again.
    assert _checkpoint_names(workdir) == ["ckpt-0000002.weights.h5", "ckpt-0000002.weights.h5.corrupt",
                                          "ckpt-0000003.weights.h5"]


def test_no_readable_checkpoint_fails_with_one_line_naming_the_file_and_exit_code_1(
        tmp_path, monkeypatch, capsys):
    _run(tmp_path, 4)
    bad = tmp_path / "checkpoints" / "ckpt-0000001.weights.h5"
    _truncate(bad)
    monkeypatch.setattr(sys, "argv", ["train"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda argv: _run(tmp_path, 8))
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot resume: checkpoint {bad} is unreadable (")
    assert _checkpoint_names(tmp_path) == ["ckpt-0000001.weights.h5"]  # kept for inspection


def test_a_checkpoint_of_another_model_fails_with_one_line_naming_the_file(tmp_path):
    _run(tmp_path, 4)
    with pytest.raises(CheckpointError) as error:
        _run(tmp_path, 8, model=_model(hidden=4))
    message = str(error.value)
    assert message.startswith("cannot resume from checkpoint ") and "\n" not in message
    assert str(tmp_path / "checkpoints" / "ckpt-0000001.weights.h5") in message


def test_a_checkpoint_with_a_corrupted_dataset_is_detected_by_its_checksum(tmp_path):
    import h5py

    _run(tmp_path, 4)
    path = str(tmp_path / "checkpoints" / "ckpt-0000001.weights.h5")
    assert callbacks.verify(path) is None
    with h5py.File(path, "r+") as f:  # flip one weight, as a bad disk block would
        dataset = next(f[name] for name in _datasets(f) if f[name].size > 1)
        values = dataset[()]
        values.flat[0] += 1.0
        dataset[...] = values
    assert callbacks.verify(path) == "its contents do not match its checksum"


def _datasets(h5file):
    import h5py

    names = []
    h5file.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
    return names


def test_stale_temporaries_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    _run(tmp_path, 4)
    stale_checkpoint = tmp_path / "checkpoints" / "tmp-999999.weights.h5"
    stale_history = tmp_path / ".tmp-abc123history.csv"
    stale_checkpoint.write_bytes(b"half a checkpoint")
    stale_history.write_text("step,train_lo")
    _run(tmp_path, 8)
    assert not stale_checkpoint.exists() and not stale_history.exists()
    assert _checkpoint_names(tmp_path) == ["ckpt-0000001.weights.h5", "ckpt-0000002.weights.h5"]


def test_checkpoints_and_result_files_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    results.save_results(str(tmp_path), {}, {"acc": 1.0})
    (name,) = [os.path.basename(p) for p in synced[:-1]]
    assert name.startswith(results.TEMPORARY_PREFIX) and name.endswith("results.json")
    assert synced[-1] == str(tmp_path)  # the directory, after the rename

    synced.clear()
    _run(tmp_path / "run", 4)
    checkpoints = str(tmp_path / "run" / "checkpoints")
    temporary = os.path.join(checkpoints, f"tmp-{os.getpid()}.weights.h5")
    assert synced.index(temporary) < synced.index(checkpoints)
    history = [p for p in synced if p.endswith("history.csv")]
    assert len(history) == 1 and os.path.basename(history[0]).startswith(results.TEMPORARY_PREFIX)
    assert synced.index(history[0]) < synced.index(str(tmp_path / "run"))


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


def test_progress_lines_show_the_sweep_position_only_for_runs_given_the_sweep(tmp_path,
                                                                            monkeypatch):
    lines = []
    monkeypatch.setattr(callbacks.logging, "info", lambda fmt, *args: lines.append(fmt % args))
    sweep = SweepProgress(["first", "second"], lambda n: f"run {n}")
    for name in sweep:
        _run(tmp_path / name, 8, sweep=sweep)
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


def _run_with(workdir, steps, **settings):
    x, y = _data()
    return train_and_evaluate(
        _model(), make_dataset(x, y, 16, shuffle=True, seed=0, repeat=True, drop_remainder=True),
        make_dataset(x, y, 32, shuffle=False), steps=steps, eval_every=4, workdir=str(workdir),
        settings={"steps": steps, "eval_every": 4, **settings}).final


def test_a_resume_under_other_settings_is_refused_and_a_longer_budget_extends_the_run(tmp_path):
    _run_with(tmp_path, 8, learning_rate=0.01, method="dni", eval_batches=10)
    recorded = json.loads((tmp_path / results.SETTINGS_FILE).read_text())
    assert recorded == {"steps": 8, "eval_every": 4, "learning_rate": 0.01, "method": "dni",
                        "eval_batches": 10}
    before = {name: (tmp_path / name).read_bytes() for name in ("history.csv", "settings.json")}
    checkpoints = _checkpoint_names(tmp_path)
    with pytest.raises(UsageError, match=r"--learning_rate=0\.01 \(now 0\.1\)") as caught:
        _run_with(tmp_path, 8, learning_rate=0.1, method="dni")
    assert "method" not in str(caught.value)  # only what changed is named
    with pytest.raises(UsageError, match=r"trained for 8 steps, more than --steps=4"):
        _run_with(tmp_path, 4, learning_rate=0.01, method="dni")
    # A finished run evaluates nothing more: its numbers stand under its own evaluation.
    with pytest.raises(UsageError, match=r"finished run made with other settings: "
                                         r"--eval_batches=10 \(now 50\)"):
        _run_with(tmp_path, 8, learning_rate=0.01, method="dni", eval_batches=50)
    # Refused before anything was written or trained.
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert _checkpoint_names(tmp_path) == checkpoints
    # A longer budget resumes the run (its settings record the new budget) and
    # continues it exactly as an uninterrupted run of that length.
    # (its evaluation may change with it: the evaluations to come use the new one).
    extended = _run_with(tmp_path, 12, learning_rate=0.01, method="dni", eval_batches=50)
    assert json.loads((tmp_path / results.SETTINGS_FILE).read_text())["steps"] == 12
    assert results.load_history(str(tmp_path))["step"].tolist() == [4, 8, 12]
    assert extended == _run_with(tmp_path / "uninterrupted", 12, learning_rate=0.01, method="dni")


def test_a_run_from_before_settings_json_is_checked_against_its_results(tmp_path):
    results.save_results(str(tmp_path), {"learning_rate": 0.01, "steps": 8, "flags": {}}, {})
    with pytest.raises(UsageError, match=r"--learning_rate=0\.01 \(now 0\.1\)"):
        results.claim_run_directory(str(tmp_path), {"learning_rate": 0.1, "steps": 8})
    assert not (tmp_path / results.SETTINGS_FILE).exists()
    # A setting the old run did not record (added later) is not compared.
    results.claim_run_directory(str(tmp_path), {"learning_rate": 0.01, "steps": 9, "new": 1})
    assert json.loads((tmp_path / results.SETTINGS_FILE).read_text())["steps"] == 9
    # How it runs may change (XLA, steps per call); what it trains may not.
    results.claim_run_directory(str(tmp_path), {"learning_rate": 0.01, "steps": 9, "new": 1,
                                                "jit_compile": True})
    results.claim_run_directory(str(tmp_path), {"learning_rate": 0.01, "steps": 9, "new": 1,
                                                "jit_compile": False})
    with pytest.raises(UsageError, match=r"--new=1 \(now 2\)") as caught:
        results.claim_run_directory(str(tmp_path), {"learning_rate": 0.01, "steps": 9,
                                                    "new": 2, "jit_compile": True})
    assert "jit_compile=" not in str(caught.value)
    # Under a schedule in fractions of the budget, the budget may not change.
    results.claim_run_directory(str(tmp_path / "schedule"), {"steps": 8, "lr_boundaries": [0.5]})
    with pytest.raises(UsageError, match=r"--steps=8 \(now 16\)"):
        results.claim_run_directory(str(tmp_path / "schedule"),
                                    {"steps": 16, "lr_boundaries": [0.5]})


def test_a_finished_run_is_read_back_only_under_its_own_settings(tmp_path):
    workdir = str(tmp_path)
    results.save_results(workdir, {"learning_rate": 0.01, "steps": 8}, {"accuracy": 0.5})
    assert results.completed_metrics(workdir) == {"accuracy": 0.5}
    assert results.completed_metrics(workdir, {"learning_rate": 0.01, "steps": 8}) == {
        "accuracy": 0.5}
    assert results.completed_metrics(workdir, {"learning_rate": 0.01, "steps": 16}) is None
    with pytest.raises(UsageError, match=r"--learning_rate=0\.01 \(now 0\.1\)"):
        results.completed_metrics(workdir, {"learning_rate": 0.1, "steps": 8})
    # Placement never matters; evaluation only for a run that trains on.
    assert results.completed_metrics(
        workdir, {"learning_rate": 0.01, "steps": 8, "jit_compile": True}) == {"accuracy": 0.5}
    results.save_results(workdir, {"learning_rate": 0.01, "steps": 8, "eval_every": 4},
                         {"accuracy": 0.5})
    with pytest.raises(UsageError, match=r"finished run made with other settings: "
                                         r"--eval_every=4 \(now 2\)"):
        results.completed_metrics(workdir, {"learning_rate": 0.01, "steps": 8, "eval_every": 2})
    assert results.completed_metrics(
        workdir, {"learning_rate": 0.01, "steps": 16, "eval_every": 2}) is None
    # Trained on to 16 steps and stopped before the end: settings.json says 16, the
    # results are still the 8-step run's, so the run is not finished at 16.
    results.claim_run_directory(workdir, {"learning_rate": 0.01, "steps": 16, "eval_every": 4})
    assert results.completed_metrics(
        workdir, {"learning_rate": 0.01, "steps": 16, "eval_every": 4}) is None
    # ... and, as any run that trains on, it may change its evaluation flags.
    assert results.completed_metrics(
        workdir, {"learning_rate": 0.01, "steps": 16, "eval_every": 2}) is None


def test_a_finished_run_without_its_checkpoints_says_it_trains_again_from_step_0(
        tmp_path, caplog):
    """A fresh machine has a finished run's records but not its checkpoints
    (scripts/archive_runs.py --restore): a longer --steps cannot train it on, so
    the run starts again from step 0, and says so."""
    import logging
    import shutil

    caplog.set_level(logging.WARNING)
    _run_with(tmp_path, 8, method="dni")
    results.save_results(str(tmp_path), {"steps": 8, "eval_every": 4, "method": "dni"}, {})
    _run_with(tmp_path, 12, method="dni")  # trained on from its checkpoint: nothing to say
    assert not [r for r in caplog.records if "step 0" in r.getMessage()]
    shutil.rmtree(tmp_path / "checkpoints")
    _run_with(tmp_path, 16, method="dni")
    said = [r.getMessage() for r in caplog.records if "step 0" in r.getMessage()]
    assert said == [f"{tmp_path} holds a finished run but no checkpoint to train it on from: "
                    "it trains again from step 0 to --steps=16"]
    assert results.load_history(str(tmp_path))["step"].tolist() == [4, 8, 12, 16]
