"""Helpers for absl entry points: flag checks, one-line errors, exit codes.

Usage errors (bad flag values, missing data, unwritable workdir) print one line
on stderr and exit with code 2; a diverged run, or one whose checkpoints cannot
be resumed from, exits with code 1. Neither prints
a traceback.

Log lines are printed plainly (`[keep_prob=0.5] step 500/5000 (10%) ...`);
warnings and errors start with `warning:` / `error:`. `--v=1` (absl's
`--verbosity`) adds debug lines and absl's full prefixes (time, thread, file).

    from dni_tf.harness import cli, config
    cli.define_study_flags(MyStudyConfig)  # one flag per field, checked while parsing
    def main(argv):
        study = config.from_flags(MyStudyConfig)
        ...
    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import contextlib
import logging as python_logging
import os
import re
import sys
from typing import Callable, Iterator, List, Mapping, Optional, Sequence

from absl import app, flags
from absl import logging as absl_logging

from dni_tf.harness import distribution
from dni_tf.harness.distribution import STRATEGIES
from dni_tf.errors import (CheckpointError, DataError, DistributionError, TrainingDiverged,
                           UsageError, WorkerLost)


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_batch_size(batch_size: int, limit: int, reason: str, name: str = "batch_size") -> None:
    """Raises UsageError unless 1 <= batch_size <= limit; `reason` explains the limit."""
    if not 1 <= batch_size <= limit:
        raise UsageError(f"--{name}={batch_size} is out of range: allowed [1, {limit}] ({reason})")


def value_label(value: float) -> str:
    """A short, exact text for a sweep value (run folder names, table keys).

    `f"{value:g}"` when that reads back as the same number (0.5, 1e-4, 20),
    else `repr` (1.000001e-4 -> "0.0001000001"): two different values never
    share a label, so they never share a run folder.
    """
    value = float(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def prepare_workdir(workdir: str, flag_name: str = "workdir") -> str:
    """Creates `workdir` if needed and checks it is writable; returns its absolute path."""
    if not workdir:
        raise UsageError(f"--{flag_name} is required")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--{flag_name}={workdir}: not a writable directory ({exc.strerror})") from None
    return workdir


def define_study_flags(config_class, workdir_help: str = "Output directory (created; "
                       "reruns resume).") -> None:
    """The flags of a study program: one per field of `config_class`
    (`dni_tf.harness.config.define_flags`), the required `--workdir`, and the
    common `--distribution` / `--deterministic`."""
    from dni_tf.harness import config

    config.define_flags(config_class)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    define_common_flags()


def define_fork_flag() -> None:
    """`--fork_from`, for studies whose single run trains in `--workdir` itself (see
    `fork_if_asked`)."""
    flags.DEFINE_string("fork_from", None,
                        "Start this run from the newest checkpoint of the run directory "
                        "given (weights, optimizer, carried state, curriculum, step; its "
                        "history up to there) under this command's settings, in a new "
                        "--workdir; the source is only read. For ablations from a shared "
                        "point.")


def fork_if_asked(workdir: str, grid: Mapping[str, Sequence]) -> None:
    """Applies `--fork_from` to `workdir` (`dni_tf.harness.training.fork_run`); one
    run only: a table (`grid` with several values) is refused."""
    source = flags.FLAGS.fork_from
    if not source:
        return
    if any(len(values) > 1 for values in grid.values()):
        names = ", ".join(f"--{name}" for name, values in grid.items() if len(values) > 1)
        raise UsageError(f"--fork_from starts one run: give one value to {names}")
    if flags.FLAGS.distribution == "multi_worker":
        raise UsageError("--fork_from is not supported with --distribution=multi_worker "
                         "(each worker keeps its own run directory)")
    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(source):
        raise UsageError(f"--fork_from={source}: no such run directory")
    from dni_tf.harness import training

    step = training.fork_run(source, workdir)
    absl_logging.info("forked from %s at step %d", source, step)


def define_common_flags() -> None:
    """`--distribution` (see `dni_tf.harness.distribution`) and `--deterministic`."""
    flags.DEFINE_enum("distribution", "none", STRATEGIES,
                      "none: one device; mirrored: every local GPU; multi_worker: "
                      "MultiWorkerMirroredStrategy over the cluster in $TF_CONFIG.")
    flags.DEFINE_boolean("deterministic", False,
                         "Enable TensorFlow op determinism: reruns and resumed runs give "
                         "bit-identical results (some ops get slower).")


@contextlib.contextmanager
def distributed(workdir: str) -> Iterator[str]:
    """Applies `--deterministic` and `--distribution`; yields this worker's run directory.

    Enter it before loading data or building models (see `dni_tf.harness.distribution`).
    """
    import tensorflow as tf

    if flags.FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    with distribution.distributed(flags.FLAGS.distribution, workdir) as run_dir:
        yield run_dir


def flag_values(names: Optional[Sequence[str]] = None) -> dict:
    """The values of the given (default: all non-absl) flags, for results.json."""
    values = flags.FLAGS.flag_values_dict()
    if names is None:
        internal = {f.name for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
                    if module.startswith(("absl.", "tensorflow", "keras"))
                    for f in module_flags}
        names = [k for k in values if k not in internal]
    return {k: values[k] for k in names}


class ConsoleFormatter(python_logging.Formatter):
    """A log record as its message alone; warnings and errors get a short prefix."""

    def format(self, record: python_logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= python_logging.ERROR:
            return f"error: {message}"
        if record.levelno >= python_logging.WARNING:
            return f"warning: {message}"
        return message


def use_console_format() -> None:
    """Plain log lines (`ConsoleFormatter`) unless `--v`/`--verbosity` asks for more.

    absl's prefix (`I1130 09:01:45.461307 139825585863552 callbacks.py:287]`)
    is kept with `--verbosity >= 1`.
    """
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1:
        return
    absl_logging.get_absl_handler().setFormatter(ConsoleFormatter())


def _flag_error_line(exc: Exception) -> str:
    """absl's "flag --x=v: why" as one line, without repeating the flag when `why` names it."""
    line = str(exc).splitlines()[0]
    match = re.match(r"flag (--\w+)=.*?: (.*)$", line)
    if match and match.group(2).startswith(match.group(1)):
        return match.group(2)
    return line


def run(main: Callable[[List[str]], None]) -> None:
    """`absl.app.run(main)` with one-line errors and exit code 2 for usage errors.

    Log lines are printed plainly (`use_console_format`).
    """

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as exc:
            fail(_flag_error_line(exc), 2)

    def guarded_main(argv):
        use_console_format()
        if len(argv) > 1:
            fail(f"unexpected positional arguments: {' '.join(argv[1:])}", 2)
        try:
            main(argv)
        except (UsageError, DataError, DistributionError) as exc:
            fail(str(exc), 2)
        except (TrainingDiverged, CheckpointError, WorkerLost) as exc:
            fail(str(exc), 1)

    app.run(guarded_main, flags_parser=parse_flags)
