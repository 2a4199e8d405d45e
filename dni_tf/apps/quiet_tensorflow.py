"""Imported first by every program: TensorFlow without its start-up lines.

Unless the user set `TF_CPP_MIN_LOG_LEVEL` (then nothing is hidden), sets it to
2 (C++ warnings and errors only: no CPU feature guard line) and imports
TensorFlow with its INFO lines filtered out of stderr: TensorFlow 2.21 prints
the oneDNN notice through Abseil's C++ logging, which ignores
`TF_CPP_MIN_LOG_LEVEL`. Everything else written to stderr meanwhile (warnings,
errors) is passed on.
"""

import os
import re
import sys
import tempfile

_NOTICE = re.compile(r"^(I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] |WARNING: All log messages "
                     r"before absl::InitializeLog\(\) is called are written to STDERR)")


def _import_quietly() -> None:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: import as is
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not _NOTICE.match(line)))
            sys.stderr.flush()


if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "tensorflow" not in sys.modules:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    _import_quietly()
