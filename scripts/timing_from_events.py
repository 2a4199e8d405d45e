"""Writes timing.csv for runs trained before it was recorded, from their TensorBoard events.

    python scripts/timing_from_events.py runs/copy_continuous [ROOT ...]

Every directory under each ROOT that has a history.csv and event files gets
the periods its timing.csv lacks, rebuilt by `dni_tf.harness.timing.
timing_from_events` (machine "not recorded"); rows already in timing.csv are
kept. Run it where the runs trained (the events stay in runs/, the archive
keeps only timing.csv), and not on a run that is training now: its process
rewrites timing.csv from what it read when it started.
"""

import os
import sys

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dni_tf.apps.quiet_tensorflow  # noqa: E402,F401  (the event reader imports TensorFlow)
from dni_tf.harness import results, timing  # noqa: E402


def backfill(run_dir: str) -> int:
    """Adds the event-derived periods `run_dir`'s timing.csv lacks; returns how many."""
    kept = timing.load_timing(run_dir)
    rebuilt = timing.timing_from_events(run_dir)
    missing = rebuilt[~rebuilt["step"].isin(kept["step"].astype(int))]
    if not len(missing):
        return 0
    merged = pd.concat([kept, missing] if len(kept) else [missing], ignore_index=True)
    merged = merged.sort_values("step", kind="stable").reset_index(drop=True)
    results.write_csv(os.path.join(run_dir, timing.TIMING_FILE), merged)
    return len(missing)


def main(roots):
    if not roots:
        print("usage: python scripts/timing_from_events.py RUNS_DIR [RUNS_DIR ...]",
              file=sys.stderr)
        sys.exit(2)
    for root in roots:
        if not os.path.isdir(root):
            print(f"timing_from_events: {root} is not a directory", file=sys.stderr)
            sys.exit(2)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "checkpoints")
            if results.HISTORY_FILE in filenames and any(
                    f.startswith("events.out.tfevents.") for f in filenames):
                added = backfill(dirpath)
                if added:
                    print(f"{dirpath}: {added} periods from event times")


if __name__ == "__main__":
    main(sys.argv[1:])
