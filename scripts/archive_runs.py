"""Copies every run's small records from runs/ into docs/run_records/ (tracked).

A table built over several sittings must survive the machine, and run
directories do not (checkpoints and weights are too large to commit). This
keeps, per run directory, what the report and the tables read: results.json,
history.csv, timing.csv, best.json, forked_from.json, the run's figures and the table queues' marker files;
never checkpoints, weights or TensorBoard events (rerun a cell for those).

    python scripts/archive_runs.py [SUBDIR ...]     e.g.  python scripts/archive_runs.py copy ptb256

With no argument everything under runs/ (or $RUNS) is archived. Rerun it whenever
a cell finishes: a record whose contents differ from the archived one replaces it,
and an archived record with no counterpart in runs/ is kept (a later sitting starts
with an empty runs/). A run still training never replaces a finished run's records:
a finished cell trained on to a larger budget on a fresh machine starts again from
step 0, and its records are archived once it finishes. Hidden files (a plot or
result being written) are skipped, and each copy is atomic, so two table queues may
archive at once.
scripts/reproduction_report.sh reads the archive.

    python scripts/archive_runs.py --restore SUBDIR ...

does the reverse on a fresh machine (a new checkout has no runs/): the records of
every *finished* run (results.json with status "completed") and the table queues'
marker files are copied back into runs/ where runs/ lacks them, so the table scripts
read those cells back instead of training them again. Unfinished runs are not
restored (without their checkpoints they start again from step 0), and a cell that
already holds a run in runs/ gets nothing.
"""

import filecmp
import fnmatch
import os
import shutil
import sys
import tempfile

from dni_tf.harness import results

SOURCE = os.environ.get("RUNS", "runs")
ARCHIVE = "docs/run_records"
MARKERS = "*.identical_to_dni"  # the table queues' marker files (scripts/copy_table.sh)
RECORDS = ("results.json", "history.csv", "timing.csv", "best.json", "forked_from.json", "*.png",
           MARKERS)
RUN_FILES = ("settings.json", "results.json", "history.csv")  # a run directory holds one
SKIPPED_DIRS = ("checkpoints",)


def archive(subdir: str, source: str = SOURCE, archive_dir: str = ARCHIVE) -> int:
    """Archives `source/subdir` into `archive_dir`; returns the number of files copied."""
    root = os.path.join(source, subdir)
    if not os.path.isdir(root):
        print(f"archive_runs: no directory {root} (give subdirectories of {source})",
              file=sys.stderr)
        sys.exit(2)
    copied = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        archived_dir = os.path.join(archive_dir, os.path.relpath(dirpath, source))
        if _training(dirpath, filenames) and _finished(archived_dir):
            continue  # keep the finished records until this run finishes
        for name in filenames:
            if name.startswith(".") or not any(fnmatch.fnmatch(name, p) for p in RECORDS):
                continue
            src = os.path.join(dirpath, name)
            dst = os.path.join(archive_dir, os.path.relpath(src, source))
            if os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(dst))
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dst)  # a reader never sees half a record
                copied += 1
            except FileNotFoundError:
                pass  # the run replaced the file while we looked; the next archive takes it
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return copied


def _finished(run_dir: str) -> bool:
    """Whether `run_dir` holds a finished run: results.json with status "completed",
    made with the budget its settings.json (if any) names, not on its way to a larger one."""
    try:
        return results.completed_metrics(run_dir, results.saved_settings(run_dir)) is not None
    except (OSError, ValueError):
        return False  # no run, or a results.json being written


def _training(run_dir: str, filenames) -> bool:
    """Whether `run_dir` is a run directory whose run has not finished."""
    return ("settings.json" in filenames or "results.json" in filenames) and not _finished(run_dir)


def restore(subdir: str, source: str = SOURCE, archive_dir: str = ARCHIVE) -> int:
    """Copies `archive_dir/subdir`'s finished runs and markers back into `source`
    where absent; returns the number of files copied. runs/ is newer than the
    archive: a run directory there that already holds a run (settings.json,
    results.json or history.csv: one training, say) gets nothing, so a finished
    results.json never lands beside another run's history, and no file is replaced."""
    root = os.path.join(archive_dir, subdir)
    if not os.path.isdir(root):
        return 0  # nothing archived yet: a table's first sitting
    copied = 0
    for dirpath, _, filenames in os.walk(root):
        target = os.path.join(source, os.path.relpath(dirpath, archive_dir))
        finished = _finished(dirpath) and not any(
            os.path.exists(os.path.join(target, name)) for name in RUN_FILES)
        for name in filenames:
            if name.startswith(".") or not (finished or fnmatch.fnmatch(name, MARKERS)):
                continue  # hidden files are records being archived
            dst = os.path.join(target, name)
            if os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, name), dst)
            copied += 1
    return copied


def main(args):
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args[:1] == ["--restore"]:
        if not args[1:]:
            print("archive_runs: --restore needs the subdirectories to restore (e.g. copy)",
                  file=sys.stderr)
            sys.exit(2)
        copied = sum(restore(s) for s in args[1:])
        print(f"archive_runs: {copied} files of finished runs restored from {ARCHIVE} into {SOURCE}")
        return
    copied = sum(archive(s) for s in (args or ["."]))
    runs = sum("results.json" in files for _, _, files in os.walk(ARCHIVE))
    print(f"archive_runs: {copied} files copied; {runs} runs recorded in {ARCHIVE}")


if __name__ == "__main__":
    main(sys.argv[1:])
