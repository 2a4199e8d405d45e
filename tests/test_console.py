"""The first hour at the console: the `dni-tf` command, plain output, no flag the user never set.

* `dni-tf --help` lists the subcommands; a bad flag is one `error:` line, exit 2.
* The commands of issue 18, with their default `--eval_every` and a `--steps`
  that it does not divide, train and evaluate at the last step.
* Their output has no TensorFlow start-up lines (oneDNN notice, CPU feature
  guard) and no absl prefixes (`I1130 09:01:45.461307 139825585863552 callbacks.py:287]`).

`dni-tf` is the installed console script; where it is not on PATH the same
dispatcher runs as `python -m dni_tf.apps`.
"""

import os
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT

from dni_tf import apps

DNI_TF = [shutil.which("dni-tf")] if shutil.which("dni-tf") else [sys.executable, "-m", "dni_tf.apps"]
# An INFO line with absl's prefix (Python's absl logging or TensorFlow's C++ logging).
INFO_PREFIX = re.compile(r"^I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]")


def _env():
    env = dict(os.environ, DNI_TF_USE_TFDS="0")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the default a user has (conftest sets it)
    env.pop("TF_CONFIG", None)
    return env


def _run(command, timeout=300):
    return subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_subcommand():
    proc = _run([*DNI_TF, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("gradient-drop", "threshold-updates", "dni-feedforward", "copy-task",
                 "language-model", "multi-network", "targeted-dropout", "report"):
        assert re.search(rf"^  {name} ", proc.stdout, re.M), (name, proc.stdout)
    assert set(apps.COMMANDS) == {"gradient-drop", "threshold-updates", "dni-feedforward",
                                  "copy-task", "language-model", "multi-network",
                                  "targeted-dropout", "report"}


def test_a_bad_flag_or_subcommand_is_one_line_and_exit_code_2(tmp_path):
    proc = _run([*DNI_TF, "gradient-drop", f"--workdir={tmp_path}", "--bad_flag=1"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: Unknown command line flag 'bad_flag'"]
    proc = _run([*DNI_TF, "gradient-dropping"], timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: dni-tf: unknown subcommand 'gradient-dropping': choose from ")


def test_a_subcommand_shows_its_own_flags_in_help():
    proc = _run([*DNI_TF, "copy-task", "--help"])  # absl's --help exits with code 1
    assert proc.returncode in (0, 1), proc.stderr
    assert "Copy / Repeat Copy" in proc.stdout and "--truncation" in proc.stdout


# The commands of issue 18, which stopped with a usage error about --eval_every
# (default 500 or 5000) when --steps was not a multiple; smaller --steps here.
COMMANDS = {
    "dni-feedforward": (["dni-feedforward", "--dataset=digits", "--steps=3"], "", 3),
    "copy-task": (["copy-task", "--steps=3", "--hidden_size=8"], "", 3),
    "threshold-updates": (["threshold-updates", "--dataset=digits", "--steps=3",
                           "--thresholds=0,1e-2"], "threshold_0", 3),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_with_the_default_eval_every_run_and_print_plain_lines(name, tmp_path):
    argv, run_dir, last_step = COMMANDS[name]
    subcommand, *flags = argv
    module = apps.COMMANDS[subcommand][0]
    # One through the installed command, the others as from a checkout.
    command = ([*DNI_TF, *argv] if name == "threshold-updates"
               else [sys.executable, "-m", f"experiments.{module}", *flags])
    proc = _run([*command, f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = pd.read_csv(tmp_path / run_dir / "history.csv")
    assert history["step"].tolist() == [last_step]
    output = (proc.stdout + proc.stderr).splitlines()
    # TensorFlow's start-up lines. (C++ errors stay: on CPUs without AVX-512
    # TensorFlow 2.21 logs "E... util.cc:131] oneDNN supports DT_BOOL only ...".)
    assert not [line for line in output if "oneDNN custom operations" in line
                or "cpu_feature_guard" in line or "absl::InitializeLog" in line]
    assert not [line for line in output if INFO_PREFIX.match(line)]
    progress = [line for line in output if " steps/s ETA " in line]
    assert progress and all(re.match(rf"^\[[^\]]+\] step \d+/{last_step} \(\d+%\) ", line)
                            for line in progress), progress
