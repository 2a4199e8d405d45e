"""Wall time of a run, per evaluation period, with the machine it ran on.

`timing.csv` sits beside `history.csv`: one row per evaluation, `step`,
`seconds` (wall time since the previous evaluation of the same process, or
since the process began training: the first period of each process also holds
tracing and the checkpoint restore, and each later one the previous
evaluation's checkpoint save) and `machine`. It times the run's surviving
trajectory, as history.csv records it: a resumed run keeps the rows below its
resume point and replaces the rest, so a period trained again after a kill
counts once (the killed attempt not at all), and a fork starts with its source's
rows up to the fork step. The last checkpoint save and what follows `fit()`
(results.json, figures) are not counted. Kept apart from history.csv so that
the history of a resumed run stays identical to an uninterrupted one.

Wall time depends on the machine and on what else ran on it, so tables report
it next to the machine and compare speeds only as ratios within one process
(`benchmarks/`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
from typing import List

import pandas as pd

TIMING_FILE = "timing.csv"
COLUMNS = ("step", "seconds", "machine")
UNKNOWN_MACHINE = "not recorded"


def machine_description() -> str:
    """CPU model, the cores this process may use out of the machine's, and any GPUs.

    The usable cores are what `taskset` or a container allows (one process per
    core reads "1 of 2 cores"), not what the machine has.
    """
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{name}, {usable} of {os.cpu_count()} cores"
    import tensorflow as tf  # only here: reading timings needs no TensorFlow

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return text + (f", GPUs {', '.join(gpus)}" if gpus else "")


def load_timing(workdir: str) -> pd.DataFrame:
    """The run's timing.csv (empty, with its columns, when there is none)."""
    path = os.path.join(workdir, TIMING_FILE)
    if not os.path.exists(path):
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_csv(path, keep_default_na=False)


@dataclasses.dataclass
class WallTime:
    """What a run's timing says about the evaluations in its history.

    `seconds` sums the timed periods; `timed` of the `periods` evaluations in the
    history have a timing row (fewer when the run began before timings were
    recorded and its event files are gone; none without timing.csv).
    """

    seconds: float
    timed: int
    periods: int
    machines: List[str]


def wall_time(workdir: str, history_steps) -> WallTime:
    """Sums `workdir`'s timing over the evaluation steps of its history."""
    rows = load_timing(workdir)
    steps = set(int(s) for s in history_steps)
    timed = rows[rows["step"].astype(int).isin(steps)]
    machines = sorted(set(timed["machine"].astype(str)))
    return WallTime(float(timed["seconds"].sum()), len(timed), len(steps), machines)


def timing_from_events(workdir: str) -> pd.DataFrame:
    """Rebuilds timing rows from a run's TensorBoard event files (runs from before timing.csv).

    Each event file is one process: its first event is written when the process
    opens the writer, and every evaluation writes events at the evaluation's
    step, so a period's seconds are the wall time between the first event of a
    step and that of the step before it in the same file. Where two processes
    logged the same step (a period trained again after a kill), the later one
    counts. The machine is not in the event files: `UNKNOWN_MACHINE`.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    # The evaluation logger's files only: writers with a filename suffix (the
    # sweep's hparams, a lost worker's log) write other steps at other times.
    processes = []
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*.v2")):
        first_seen = {}
        for event in EventFileLoader(path).Load():
            first_seen.setdefault(int(event.step), event.wall_time)
        if first_seen:
            processes.append(first_seen)
    rows = {}
    for first_seen in sorted(processes, key=lambda seen: min(seen.values())):  # in start order
        start = min(first_seen.values())  # the file's own first event (step 0)
        previous = start
        for step, wall in sorted(first_seen.items(), key=lambda item: item[1]):
            if step == 0 and wall == start:
                continue
            rows[step] = (step, wall - previous, UNKNOWN_MACHINE)
            previous = wall
    return pd.DataFrame([rows[s] for s in sorted(rows)], columns=list(COLUMNS))
