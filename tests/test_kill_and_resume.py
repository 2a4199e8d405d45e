"""An experiment killed with SIGKILL and rerun ends exactly like an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO_ROOT

# 45 steps, evaluations every 10: the last period (steps 41-45) is short.
COMMAND = [sys.executable, "-m", "experiments.gradient_drop", "--dataset=digits",
           "--steps=45", "--eval_every=10", "--keep_probs=0.5", "--batch_size=32",
           "--deterministic"]


def _run(workdir):
    result = subprocess.run(COMMAND + [f"--workdir={workdir}"], cwd=REPO_ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _leftovers(workdir):
    """Temporary files under `workdir`: what a kill during a write leaves behind.

    Result files are written as `.tmp-*`, checkpoints as `tmp-PID.weights.h5`;
    a checkpoints folder holds nothing but `ckpt-N.weights.h5` files.
    """
    found = []
    for directory, _, files in os.walk(workdir):
        for name in files:
            temporary = name.startswith((".", "tmp")) or ".tmp" in name
            stray = (os.path.basename(directory) == "checkpoints"
                     and not re.fullmatch(r"ckpt-\d+\.weights\.h5", name))
            if temporary or stray:
                found.append(os.path.join(directory, name))
    return found


def test_leftover_check_sees_the_temporaries_of_a_killed_write(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "ckpt-0000001.weights.h5").write_bytes(b"")
    (tmp_path / "run" / "history.csv").write_text("step\n")
    assert _leftovers(str(tmp_path)) == []
    for stale in ("run/checkpoints/tmp-4242.weights.h5", "run/.tmp-k2j3history.csv",
                  "run/checkpoints/ckpt-0000002.weights.h5.corrupt"):
        (tmp_path / stale).write_bytes(b"")
        assert _leftovers(str(tmp_path)) == [str(tmp_path / stale)]
        (tmp_path / stale).unlink()


def _metrics(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["metrics"]


def test_sigkill_after_a_checkpoint_then_rerun_matches_uninterrupted(tmp_path):
    uninterrupted, killed = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    # The reference run goes on beside the run that gets killed.
    reference_log = open(tmp_path / "reference.log", "w")
    reference = subprocess.Popen(COMMAND + [f"--workdir={uninterrupted}"], cwd=REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=reference_log)

    try:
        checkpoints = os.path.join(killed, "keep_prob_0.5", "checkpoints")
        process = subprocess.Popen(COMMAND + [f"--workdir={killed}"], cwd=REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        # A finished checkpoint, not the temporary file it is written to first.
        while not (os.path.isdir(checkpoints)
                   and any(name.startswith("ckpt-") for name in os.listdir(checkpoints))):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the run ended or stalled before writing its first checkpoint")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not os.path.exists(os.path.join(killed, "results.json")), "killed too late"
        # What a kill in the middle of the next checkpoint save leaves behind:
        # the rerun removes it.
        with open(os.path.join(checkpoints, "tmp-4194304.weights.h5"), "wb") as f:
            f.write(b"half a checkpoint")

        _run(killed)
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        reference.kill()
        reference_log.close()
    for relative in ("keep_prob_0.5/history.csv", "history.csv"):
        expected = pd.read_csv(os.path.join(uninterrupted, relative))
        resumed = pd.read_csv(os.path.join(killed, relative))
        assert not resumed.duplicated(subset=[c for c in resumed if c == "step"
                                              or c == "keep_prob"]).any(), relative
        pd.testing.assert_frame_equal(resumed, expected, check_exact=True)
    assert _metrics(killed) == _metrics(uninterrupted)
    assert not _leftovers(killed)
