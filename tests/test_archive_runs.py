"""Tests for scripts/archive_runs.py: which run files survive into docs/run_records."""

import importlib.util
import os

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "archive_runs", os.path.join(os.path.dirname(__file__), "..", "scripts", "archive_runs.py"))
archive_runs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(archive_runs)


def _write(path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_records_are_kept_and_bulk_is_left(tmp_path):
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    cell = runs / "copy" / "seed0" / "dni_T3"
    for name in ("results.json", "history.csv", "timing.csv", "best.json", "curves.png"):
        _write(cell / name)
    _write(runs / "copy" / "seed0" / "dni_aux_T3.identical_to_dni")
    for name in ("best.weights.h5", "events.out.tfevents.1.v2", ".tmp-curves.png"):
        _write(cell / name)
    _write(cell / "checkpoints" / "history.csv")  # inside checkpoints/: never archived
    assert archive_runs.archive("copy", str(runs), str(archive)) == 6
    kept = sorted(os.path.relpath(os.path.join(d, f), archive)
                  for d, _, files in os.walk(archive) for f in files)
    assert kept == ["copy/seed0/dni_T3/best.json", "copy/seed0/dni_T3/curves.png",
                    "copy/seed0/dni_T3/history.csv", "copy/seed0/dni_T3/results.json",
                    "copy/seed0/dni_T3/timing.csv", "copy/seed0/dni_aux_T3.identical_to_dni"]
    # Unchanged records are not copied again; a changed one replaces its copy; a record
    # gone from runs/ (a later sitting) stays archived.
    assert archive_runs.archive("copy", str(runs), str(archive)) == 0
    _write(cell / "history.csv", "step\n1\n")
    (cell / "best.json").unlink()
    assert archive_runs.archive("copy", str(runs), str(archive)) == 1
    assert (archive / "copy/seed0/dni_T3/history.csv").read_text() == "step\n1\n"
    assert (archive / "copy/seed0/dni_T3/best.json").exists()


def test_a_missing_directory_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        archive_runs.archive("nope", str(tmp_path), str(tmp_path / "a"))
    assert exit_info.value.code == 2
    assert "no directory" in capsys.readouterr().err


def test_a_fresh_machine_gets_back_finished_runs_only(tmp_path):
    runs, archive = tmp_path / "runs", tmp_path / "archive"
    done, partial = archive / "copy" / "seed0" / "dni_T3", archive / "copy" / "seed0" / "bptt_T8"
    _write(done / "results.json", '{"status": "completed", "metrics": {}}')
    _write(done / "history.csv", "step\n50000\n")
    _write(partial / "history.csv", "step\n2500\n")  # stopped mid-run: no results.json
    _write(done / ".tmp-results.json")  # being archived: never restored
    _write(archive / "copy" / "seed0" / "dni_aux_T3.identical_to_dni")
    assert archive_runs.restore("copy", str(runs), str(archive)) == 3
    restored = sorted(os.path.relpath(os.path.join(d, f), runs)
                      for d, _, files in os.walk(runs) for f in files)
    assert restored == ["copy/seed0/dni_T3/history.csv", "copy/seed0/dni_T3/results.json",
                        "copy/seed0/dni_aux_T3.identical_to_dni"]
    # runs/ is newer: a cell already training there gets no finished results.json beside
    # its own history (it would be read back as finished, and archived as a mix).
    _write(archive / "copy" / "seed1" / "dni_T3" / "results.json",
           '{"status": "completed", "metrics": {}}')
    _write(runs / "copy" / "seed1" / "dni_T3" / "history.csv", "step\n2500\n")
    assert archive_runs.restore("copy", str(runs), str(archive)) == 0
    assert not (runs / "copy/seed1/dni_T3/results.json").exists()
    assert archive_runs.restore("nothing_yet", str(runs), str(archive)) == 0


def test_a_run_training_on_never_replaces_its_finished_records(tmp_path):
    """On a fresh machine a finished 20,000-step cell asked for 50,000 starts again
    from step 0 (no checkpoints): until it finishes, the archive keeps the finished
    run's records, not the new run's first rows beside the old results.json."""
    import json

    runs, archive = tmp_path / "runs", tmp_path / "archive"
    cell = runs / "copy" / "seed0" / "dni_T5"
    done = json.dumps({"status": "completed", "config": {"steps": 20000}, "metrics": {}})
    _write(cell / "results.json", done)
    _write(cell / "history.csv", "step\n20000\n")
    assert archive_runs.archive("copy", str(runs), str(archive)) == 2
    _write(cell / "settings.json", json.dumps({"steps": 50000}))  # trained on, from step 0
    _write(cell / "history.csv", "step\n2500\n")
    _write(runs / "copy" / "seed0" / "table.png")  # the seed's table is still archived
    assert archive_runs.archive("copy", str(runs), str(archive)) == 1
    assert (archive / "copy/seed0/dni_T5/history.csv").read_text() == "step\n20000\n"
    # Finished at 50,000: its records replace the old ones.
    _write(cell / "results.json", done.replace("20000", "50000"))
    _write(cell / "history.csv", "step\n50000\n")
    assert archive_runs.archive("copy", str(runs), str(archive)) == 2
    assert (archive / "copy/seed0/dni_T5/history.csv").read_text() == "step\n50000\n"
    # A new run with no finished record is archived while it trains, as before.
    _write(runs / "copy" / "seed1" / "dni_T5" / "settings.json", json.dumps({"steps": 50000}))
    _write(runs / "copy" / "seed1" / "dni_T5" / "history.csv", "step\n2500\n")
    assert archive_runs.archive("copy", str(runs), str(archive)) == 1
