"""dni_tf.core and the layering it enables: algorithms import nothing above the core."""

import subprocess
import sys

from conftest import REPO_ROOT

ALGORITHMS = ("gradient_dropping", "threshold_updates", "synthetic_gradients", "dni_feedforward",
              "pipelined_dni", "pipelined_cluster", "truncated_bptt", "multi_network",
              "targeted_dropout", "pruning")
# What an algorithm may import from the package: the core, the random streams,
# the exceptions and the plain Keras building blocks.
ALLOWED = {"dni_tf", "dni_tf.core", "dni_tf.random_streams", "dni_tf.errors", "dni_tf.models",
           "dni_tf.models.classifiers", *(f"dni_tf.{name}" for name in ALGORITHMS)}


def test_algorithms_import_nothing_from_the_experiment_harness():
    code = (
        "import sys, tensorflow, keras\n"
        "before = set(sys.modules)\n"
        f"for name in {ALGORITHMS!r}:\n"
        "    __import__('dni_tf.' + name)\n"
        "print(' '.join(sorted(m for m in set(sys.modules) - before\n"
        "                      if m.startswith(('dni_tf', 'absl', 'pandas', 'matplotlib')))))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    assert loaded - ALLOWED == set(), f"algorithms pulled in {sorted(loaded - ALLOWED)}"
