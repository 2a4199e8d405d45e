"""Runs one entry point on many argument lists in one process (one TensorFlow import).

    python tests/cli_driver.py experiments.gradient_drop < cases.json

stdin: a JSON list of argument lists. For each, the flags are reset to their
defaults and `dni_tf.harness.cli.run(main)` runs as `python -m MODULE ARGS` would.
Prints, after the marker line, a JSON list of {"code", "stderr"}: the exit
code and what the run wrote to stderr (an escaped exception counts as a
traceback with code -1).
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

from absl import flags

# Run as a script, this file's folder (tests/) heads sys.path, not the checkout,
# so `experiments` would only be found through an install of this very checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARKER = "=== cli_driver results ==="


def main():
    module = importlib.import_module(sys.argv[1])
    from dni_tf.harness import cli

    results = []
    for argv in json.load(sys.stdin):
        flags.FLAGS.unparse_flags()
        stderr = io.StringIO()
        code = 0
        sys.argv = [module.__name__, *argv]
        with contextlib.redirect_stderr(stderr):
            try:
                cli.run(module.main)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # noqa: BLE001 - reported to the test as a traceback
                traceback.print_exc()
                code = -1
        results.append({"code": code, "stderr": stderr.getvalue()})
    print(MARKER)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
