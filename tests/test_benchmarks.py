"""benchmarks/: every benchmark script imports against the current package.

The benchmarks are run by hand (their speed targets live there, not in tests), so
nothing else notices when a rename in dni_tf breaks one of them.
"""

import os
import subprocess
import sys

import pytest

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


def test_gpu_check_without_a_gpu_stops_with_one_line_and_benchmarks_nothing(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU: the script would run its benchmarks")
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ON_CPU"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TensorFlow sees no GPU here")
    assert sorted(os.listdir(tmp_path / "out")) == ["machine.txt"]
    assert "built with CUDA" in (tmp_path / "out" / "machine.txt").read_text()
