"""Copies every run's small records from runs/ into docs/run_records/ (tracked).

A table built over several sittings must survive the machine, and run
directories do not (checkpoints and weights are too large to commit). This
keeps, per run directory, what the report and the tables read: results.json,
history.csv, best.json, the run's figures and the table queues' marker files;
never checkpoints, weights or TensorBoard events (rerun a cell for those).

    python scripts/archive_runs.py [SUBDIR ...]     e.g.  python scripts/archive_runs.py copy ptb256

With no argument everything under runs/ is archived. Rerun it whenever a cell
finishes: a record newer in runs/ replaces the archived one, and an archived
record with no counterpart in runs/ is kept (a later sitting starts with an empty
runs/). scripts/reproduction_report.sh reads the archive.
"""

import fnmatch
import os
import shutil
import sys

SOURCE = os.environ.get("RUNS", "runs")
ARCHIVE = "docs/run_records"
RECORDS = ("results.json", "history.csv", "best.json", "*.png", "*.identical_to_dni")
SKIPPED_DIRS = ("checkpoints",)


def archive(subdir: str) -> int:
    root = os.path.join(SOURCE, subdir)
    if not os.path.isdir(root):
        sys.exit(f"archive_runs: no directory {root}")
    copied = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            if not any(fnmatch.fnmatch(name, pattern) for pattern in RECORDS):
                continue
            src = os.path.join(dirpath, name)
            dst = os.path.join(ARCHIVE, os.path.relpath(src, SOURCE))
            if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + ".tmp-archive"
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)  # a reader never sees half a record
            copied += 1
    return copied


def main(subdirs):
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    copied = sum(archive(s) for s in (subdirs or ["."]))
    runs = sum("results.json" in files for _, _, files in os.walk(ARCHIVE))
    print(f"archive_runs: {copied} files copied; {runs} runs recorded in {ARCHIVE}")


if __name__ == "__main__":
    main(sys.argv[1:])
