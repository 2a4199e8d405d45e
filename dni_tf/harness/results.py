"""Result files written atomically: a reader never sees a half-written file.

`results.json` holds `{"study": ..., "config": {...}, "metrics": {...}, "status": ...}`;
`history.csv` holds one row per evaluation (`step` plus metric columns);
`settings.json` the settings a run directory trains with (`claim_run_directory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

from dni_tf.errors import UsageError

RESULTS_FILE = "results.json"
HISTORY_FILE = "history.csv"
SETTINGS_FILE = "settings.json"
# Settings a rerun may change in a run directory that holds a run (see
# `claim_run_directory`); everything else (the algorithm, model, optimizer, data, seed,
# precision, schedule) must match.
# - Where and how fast it runs, and what is derived from its history afterwards:
#   always (they change no number the run records).
PLACEMENT_SETTINGS = ("data_dir", "devices", "jit_compile", "steps_per_execution",
                      "cluster_checkpoint_every", "cluster_probe_seconds",
                      "cluster_wait_seconds", "cluster_restarts", "target_accuracy")
# - The budget and how the training still to come is evaluated and logged: only when
#   the rerun trains on (a finished run's numbers were made under the old ones).
BUDGET_SETTINGS = ("steps", "digits")
EVALUATION_SETTINGS = ("eval_every", "eval_digits", "eval_batches", "eval_batch_size",
                       "eval_length", "diagnostics", "statistics_every")
TEMPORARY_PREFIX = ".tmp-"  # atomic_write_text's temporary files


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` durably: temporary file, fsync, rename, fsync of the directory.

    A reader (or a rerun after a kill or a power loss) sees either the old file
    or the new one, never a mix; a kill can leave only a `.tmp-*` file behind,
    which `remove_stale_temporaries` deletes.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=os.path.basename(path),
                               dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def fsync_file(path: str) -> None:
    """Flushes `path`'s contents to disk (for files written by other libraries, e.g. h5py)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str) -> None:
    """Makes renames and new names in `directory` durable; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str) -> List[str]:
    """Deletes the `.tmp-*` files a killed `atomic_write_text` left in `directory`.

    Call it only where no other process writes at the same time (a run's own
    directory, at the start of the run). Returns the removed paths.
    """
    removed = []
    for path in glob.glob(os.path.join(directory, TEMPORARY_PREFIX + "*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    return removed


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable.
    return value


def write_json(path: str, obj: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_csv(path: str, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def save_results(workdir: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
                 status: str = "completed", study: Optional[str] = None, **extra: Any) -> str:
    """Writes `workdir/results.json` atomically and returns its path.

    `study` names the study that wrote it (e.g. "gradient_drop"); the
    reproduction report reads it instead of guessing from the config.
    """
    path = os.path.join(workdir, RESULTS_FILE)
    named = {"study": study} if study else {}
    write_json(path, {**named, "config": config, "metrics": metrics, "status": status, **extra})
    return path


def load_results(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_settings(workdir: str) -> Optional[dict]:
    """The settings the run in `workdir` trained with: settings.json, else (runs made
    before it existed) results.json's config; None for a new directory."""
    path = os.path.join(workdir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    done = load_results(workdir)
    return done.get("config") if done else None


def changed_settings(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> List[str]:
    """The names of the settings in both mappings whose values differ (compared as JSON)."""
    old, new = (json.loads(json.dumps(_jsonable(dict(m)))) for m in (saved, settings))
    return sorted(k for k in set(old) & set(new) if old[k] != new[k])


def _mismatch(workdir: str, saved: Mapping[str, Any], settings: Mapping[str, Any],
              changed: List[str], finished: bool) -> UsageError:
    listed = ", ".join(f"--{k}={_jsonable(saved[k])!r} (now {_jsonable(settings[k])!r})"
                       for k in changed)
    if finished:
        return UsageError(f"{workdir} holds a finished run made with other settings: {listed}; "
                          "its results stand as they are: rerun with its settings (and a larger "
                          "--steps to train it on), or use another --workdir")
    return UsageError(f"{workdir} holds a run trained with other settings: {listed}; rerun "
                      "with its settings to resume it (only the budget, evaluation and placement "
                      "flags may change, e.g. --steps, --eval_every, --jit_compile), or use "
                      "another --workdir")


def _refused(saved: Mapping[str, Any], settings: Mapping[str, Any], trains_on: bool) -> List[str]:
    """The changed settings a rerun may not make (see PLACEMENT_SETTINGS and the rest)."""
    allowed = set(PLACEMENT_SETTINGS)
    if trains_on:
        allowed |= set(EVALUATION_SETTINGS) | set(BUDGET_SETTINGS)
        if settings.get("lr_boundaries"):
            allowed -= set(BUDGET_SETTINGS)  # the schedule's steps are fractions of the budget
    return [k for k in changed_settings(saved, settings) if k not in allowed]


def claim_run_directory(workdir: str, settings: Mapping[str, Any], trains_on: bool = True) -> None:
    """Records in `workdir` the settings its run trains with, and refuses to resume
    a run there under other ones.

    `settings`: the study's configuration of this one run (field -> value, the
    flag names); `trains_on`: whether the rerun has steps left to train. A
    directory that holds a run (settings.json, or results.json from before it)
    whose settings differ raises UsageError naming each changed setting, before
    training and before any record is written: resuming would mix two
    configurations in one set of weights and record only the second. Allowed:
    `PLACEMENT_SETTINGS` always; the budget and `EVALUATION_SETTINGS` only when
    the rerun trains on (a finished run's numbers were made under the old ones),
    and the budget not under a learning-rate schedule given in fractions of it
    (`lr_boundaries`). Settings known to only one side (a field added later) are
    not compared.
    """
    saved = saved_settings(workdir)
    if saved is not None:
        refused = _refused(saved, settings, trains_on)
        if refused:
            raise _mismatch(workdir, saved, settings, refused, finished=not trains_on)
    write_json(os.path.join(workdir, SETTINGS_FILE), settings)


def completed_metrics(workdir: str, settings: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """The metrics of a finished run in `workdir` (results.json, status completed), else None.

    With `settings` (the run's configuration as `claim_run_directory` takes it), a
    finished run is read back only when it was made with them (placement
    settings aside); one asked for a larger budget is not finished for them (None:
    training it again resumes it to the new budget), and any other difference
    raises UsageError, as `claim_run_directory` would.
    """
    done = load_results(workdir)
    if not done or done.get("status") != "completed":
        return None
    if settings is not None:
        # Against the budget the results were made with, not settings.json's: a run
        # stopped on its way to a larger budget names it there already, while its
        # results are still the smaller budget's.
        finished_at = done.get("config") or {}
        grows = any(isinstance(finished_at.get(k), int) and isinstance(settings.get(k), int)
                    and settings[k] > finished_at[k] for k in BUDGET_SETTINGS)
        saved = saved_settings(workdir)
        if saved is not None:
            refused = _refused(saved, settings, trains_on=grows)
            if refused:
                raise _mismatch(workdir, saved, settings, refused, finished=not grows)
        if grows:
            return None
    return done["metrics"]


def load_history(workdir: str) -> pd.DataFrame:
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return pd.DataFrame({"step": pd.Series(dtype=int)})
    return pd.read_csv(path)


def markdown_table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A GitHub-flavoured Markdown table of `frame` (no extra dependency)."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


@dataclasses.dataclass(frozen=True)
class Published:
    """What a source reports for one study (each study module holds its own).

    `setup` maps configuration keys (as saved in results.json) to the
    published value; the reproduction report lists a run whose value differs
    under "differs from the published setup".
    """

    title: str
    source: str
    claims: Tuple[str, ...]
    setup: Mapping[str, Any] = dataclasses.field(default_factory=dict)

