"""Wall time per evaluation period: timing.csv, its resume, the event backfill, the report line."""

import importlib.util
import os
import types

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tensorboard.compat.proto import event_pb2

from dni_tf.data import make_dataset
from dni_tf.harness import callbacks, timing
from dni_tf.harness.training import train_and_evaluate
from dni_tf.studies import report

_SPEC = importlib.util.spec_from_file_location(
    "timing_from_events",
    os.path.join(os.path.dirname(__file__), "..", "scripts", "timing_from_events.py"))
timing_from_events_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(timing_from_events_script)


class _Clock:
    """A fake wall clock for the harness's callbacks; `_Tick` moves it."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


class _Tick(keras.callbacks.Callback):
    """Advances the clock by offset + 10 * (epoch + 1) seconds at each period's start."""

    def __init__(self, clock, offset=0.0):
        super().__init__()
        self.clock, self.offset = clock, offset

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.now += self.offset + 10.0 * (epoch + 1)


def _train(workdir, steps, clock, offset=0.0):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.RandomState(0).rand(16, 3).astype("float32")
    y = np.zeros((16, 2), "float32")
    train_and_evaluate(model, make_dataset(x, y, 4, shuffle=False, repeat=True),
                       make_dataset(x, y, 8, shuffle=False),
                       steps=steps, eval_every=2, workdir=str(workdir),
                       callbacks=[_Tick(clock, offset)])


def test_each_period_is_timed_from_the_last_evaluation_and_a_resume_replaces_what_it_retrains(
        tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(time=clock.time))
    _train(tmp_path, 4, clock)
    first = timing.load_timing(tmp_path)
    assert first["step"].tolist() == [2, 4]
    assert first["seconds"].tolist() == [10.0, 20.0]  # not 10 and 30: each from the last
    assert set(first["machine"]) == {timing.machine_description()}

    # Resumed to 6 steps: the timed periods stay, the new one is added.
    _train(tmp_path, 6, clock, offset=100.0)
    assert timing.load_timing(tmp_path)["seconds"].tolist() == [10.0, 20.0, 130.0]

    # Resumed from step 4 (the last checkpoint lost, as after a kill during the
    # period that followed it): step 6 is trained and timed again, its row replaced.
    os.remove(tmp_path / "checkpoints" / "ckpt-0000003.weights.h5")
    _train(tmp_path, 6, clock, offset=1000.0)
    assert timing.load_timing(tmp_path)["seconds"].tolist() == [10.0, 20.0, 1030.0]
    history = pd.read_csv(tmp_path / "history.csv")
    measured = timing.wall_time(str(tmp_path), history["step"])
    assert (measured.seconds, measured.timed, measured.periods) == (1060.0, 3, 3)
    assert timing.wall_time(str(tmp_path), [2, 4, 6, 8]).timed == 3


def _event_file(directory, created, events, name_time=None, suffix=""):
    """An event file as one process writes it: its first event at `created`, step 0.

    Its name holds `name_time` (TensorFlow's: whole seconds), a host name with dots
    and `suffix` (the sweep's hparams writer adds ".hparams").
    """
    name = f"events.out.tfevents.{name_time or int(created)}.node.example.org.1.0.v2{suffix}"
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as writer:
        writer.write(event_pb2.Event(wall_time=created, step=0,
                                     file_version="brain.Event:2").SerializeToString())
        for step, wall in events:
            event = event_pb2.Event(wall_time=wall, step=step)
            event.summary.value.add(tag="loss", simple_value=1.0)
            writer.write(event.SerializeToString())


def test_periods_are_rebuilt_from_event_times_the_later_process_counting(tmp_path):
    # Process 1 (created at 1000) evaluated steps 4 and 8, several scalars each; it was
    # killed before its checkpoint at 8, so process 2 (created at 2000) trained 8 again.
    # Their names give the same second, in the wrong order; the sweep's hparams file,
    # written last, holds a scalar at step 12 that is no evaluation.
    _event_file(tmp_path, 1000.5, [(4, 1010.0), (4, 1011.0), (8, 1030.0), (8, 1031.0)],
                name_time=99999)
    _event_file(tmp_path, 2000.0, [(8, 2005.0), (12, 2012.0)], name_time=99998)
    _event_file(tmp_path, 2100.0, [(12, 2100.5)], suffix=".hparams")
    rebuilt = timing.timing_from_events(str(tmp_path))
    assert rebuilt["step"].tolist() == [4, 8, 12]
    assert rebuilt["seconds"].tolist() == [9.5, 5.0, 7.0]
    assert set(rebuilt["machine"]) == {timing.UNKNOWN_MACHINE}

    # The script keeps the rows a run timed itself and adds the rest.
    pd.DataFrame([(8, 3.0, "measured")], columns=list(timing.COLUMNS)).to_csv(
        tmp_path / timing.TIMING_FILE, index=False)
    assert timing_from_events_script.backfill(str(tmp_path)) == 2
    merged = timing.load_timing(tmp_path)
    assert merged.values.tolist() == [[4, 9.5, timing.UNKNOWN_MACHINE], [8, 3.0, "measured"],
                                      [12, 7.0, timing.UNKNOWN_MACHINE]]
    assert timing_from_events_script.backfill(str(tmp_path)) == 0


def test_the_report_sums_the_runs_and_says_when_some_periods_were_not_timed(tmp_path):
    for name, rows in (("bptt_T2", [(2, 60.0, "cpu A"), (4, 60.0, "cpu A")]),
                       ("dni_T2", [(4, 300.0, "cpu B")])):
        os.makedirs(tmp_path / name)
        pd.DataFrame({"step": [2, 4]}).to_csv(tmp_path / name / "history.csv", index=False)
        pd.DataFrame(rows, columns=list(timing.COLUMNS)).to_csv(
            tmp_path / name / timing.TIMING_FILE, index=False)
    # The table's own history.csv combines its runs': not a run of its own.
    pd.DataFrame({"step": [2, 4, 2, 4]}).to_csv(tmp_path / "history.csv", index=False)
    runs = report.RunSet(str(tmp_path), "copy_task", None, {"bptt_T2": {}, "dni_T2": {}},
                         pd.read_csv(tmp_path / "history.csv"), [])
    assert report.wall_time_line(runs) == (
        "Wall time: 7 min over 2 runs (2 min to 5 min each) on cpu A; cpu B; only 3 of the "
        "4 evaluation periods were timed.")
    pd.DataFrame([(2, 60.0, timing.UNKNOWN_MACHINE), (4, 240.0, "cpu B")],
                 columns=list(timing.COLUMNS)).to_csv(tmp_path / "dni_T2" / timing.TIMING_FILE,
                                                      index=False)
    assert report.wall_time_line(runs) == (
        "Wall time: 7 min over 2 runs (2 min to 5 min each) on cpu A; cpu B, partly on a "
        "machine not recorded (periods timed from TensorBoard event files).")
    # A run without timing counts in the runs and periods, not in the time.
    os.remove(tmp_path / "dni_T2" / timing.TIMING_FILE)
    assert report.wall_time_line(runs) == ("Wall time: 2 min over 1 of the 2 runs on cpu A; "
                                           "only 2 of the 4 evaluation periods were timed.")
    os.remove(tmp_path / "bptt_T2" / timing.TIMING_FILE)
    assert report.wall_time_line(runs) is None
