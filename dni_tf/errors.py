"""The package's exceptions, in one bottom-level module.

The command-line programs (`dni_tf.harness.cli.run`) turn them into one `error:` line
and an exit code: 2 for bad input (`UsageError`, `DataError`,
`DistributionError`), 1 for failures at run time (`TrainingDiverged`,
`CheckpointError`, `WorkerLost`). Library callers (notebooks, tests) catch them as usual.
"""


class UsageError(ValueError):
    """Bad command-line input; the message names the flag and the allowed values."""


class DataError(RuntimeError):
    """A dataset could not be loaded; the message says why and how to fix it."""


class DistributionError(ValueError):
    """The requested strategy cannot be set up (e.g. no or malformed TF_CONFIG)."""


class TrainingDiverged(RuntimeError):
    """A training metric became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be resumed from; the message names the file."""


class WorkerLost(RuntimeError):
    """A cluster worker holding a block is gone and the run cannot go on without it."""
