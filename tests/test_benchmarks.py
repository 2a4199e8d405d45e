"""benchmarks/: every benchmark script imports against the current package.

The benchmarks are run by hand (their speed targets live there, not in tests), so
nothing else notices when a rename in dni_tf breaks one of them.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One interpreter for all scripts: each defines absl flags at import, and several
# share names (--steps, ...), so each script's flags are removed after its import.
IMPORT_EACH = r"""
import glob, importlib, os, sys
from absl import flags
failed = []
for path in sorted(glob.glob(os.path.join("benchmarks", "*.py"))):
    name = "benchmarks." + os.path.basename(path)[:-3]
    before = set(flags.FLAGS)
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - reported below, one line per script
        failed.append(f"{name}: {type(error).__name__}: {error}")
    for flag in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, flag)
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports():
    scripts = [f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")]
    assert len(scripts) >= 8
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
