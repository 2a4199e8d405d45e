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
# Settings a rerun may change and still resume the run: the budget (longer, or shorter
# while not yet reached), how and how often it is evaluated, and where and how fast it
# runs (data location, devices, XLA, steps per call, cluster timings). Everything else
# (the algorithm, model, optimizer, data, seed, precision) must match.
RESUMABLE_CHANGES = ("steps", "digits", "eval_every", "eval_digits", "eval_batches",
                     "eval_batch_size", "diagnostics", "data_dir", "devices", "jit_compile",
                     "steps_per_execution", "cluster_checkpoint_every", "cluster_probe_seconds",
                     "cluster_wait_seconds", "cluster_restarts")
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
              changed: List[str]) -> UsageError:
    listed = ", ".join(f"--{k}={_jsonable(saved[k])!r} (now {_jsonable(settings[k])!r})"
                       for k in changed)
    return UsageError(f"{workdir} holds a run trained with other settings: {listed}; rerun "
                      "with its settings to resume it (only the budget, evaluation and placement "
                      "flags may change, e.g. --steps, --eval_every, --jit_compile), or use "
                      "another --workdir")


def claim_run_directory(workdir: str, settings: Mapping[str, Any]) -> None:
    """Records in `workdir` the settings its run trains with, and refuses to resume
    a run there under other ones.

    `settings`: the study's configuration of this one run (field -> value, the
    flag names). A directory that holds a run (settings.json, or results.json
    from before it) whose settings differ in anything but `RESUMABLE_CHANGES`
    raises UsageError naming each changed setting, before anything is written:
    resuming would mix two configurations in one set of weights and record only
    the second. Settings known to only one side (a field added later) are not
    compared.
    """
    saved = saved_settings(workdir)
    if saved is not None:
        changed = [k for k in changed_settings(saved, settings) if k not in RESUMABLE_CHANGES]
        if changed:
            raise _mismatch(workdir, saved, settings, changed)
    write_json(os.path.join(workdir, SETTINGS_FILE), settings)


def completed_metrics(workdir: str, settings: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """The metrics of a finished run in `workdir` (results.json, status completed), else None.

    With `settings` (the run's configuration as `claim_run_directory` takes it), a
    finished run is only read back when it was trained with them; one that differs
    only in `RESUMABLE_CHANGES` (e.g. `steps`) is not finished for them (None:
    training it again resumes it to the new budget), and any other difference
    raises UsageError.
    """
    done = load_results(workdir)
    if not done or done.get("status") != "completed":
        return None
    if settings is not None:
        saved = saved_settings(workdir)
        changed = changed_settings(saved, settings) if saved is not None else []
        if any(k not in RESUMABLE_CHANGES for k in changed):
            raise _mismatch(workdir, saved, settings,
                            [k for k in changed if k not in RESUMABLE_CHANGES])
        if changed:
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

