"""An experiment killed with SIGKILL and rerun ends exactly like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO_ROOT

COMMAND = [sys.executable, "-m", "experiments.gradient_drop", "--dataset=digits",
           "--steps=40", "--eval_every=10", "--keep_probs=0.5", "--batch_size=32",
           "--deterministic"]


def _run(workdir):
    result = subprocess.run(COMMAND + [f"--workdir={workdir}"], cwd=REPO_ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


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
        while not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("the run ended or stalled before writing its first checkpoint")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not os.path.exists(os.path.join(killed, "results.json")), "killed too late"

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
    leftovers = [name for _, _, files in os.walk(killed) for name in files
                 if ".tmp" in name or name.startswith(".")]
    assert not leftovers
