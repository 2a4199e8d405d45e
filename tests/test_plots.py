"""dni_tf's figures leave matplotlib's global state alone (notebooks keep inline figures).

Run in a fresh interpreter, because the backend is process-wide and this
process has long imported matplotlib: the child selects the `svg` backend (any
backend other than Agg stands for a notebook's inline one), imports every
module that draws, draws every kind of figure the library writes, and reports
the backend and pyplot's open figures afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CHILD = textwrap.dedent("""
    import json, os, sys
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    import dni_tf.harness.plots as plots
    import dni_tf.studies.dni_feedforward, dni_tf.studies.gradient_drop  # noqa: F401
    import dni_tf.studies.multi_network, dni_tf.studies.recurrent_dni  # noqa: F401
    from dni_tf.studies import threshold_updates
    from dni_tf.studies import targeted_dropout
    report = {"after_import": matplotlib.get_backend()}
    out = sys.argv[1]

    history = pd.DataFrame({"step": [1, 2, 1, 2], "test_accuracy": [0.1, 0.2, 0.3, 0.4],
                            "keep_prob": [1.0, 1.0, 0.5, 0.5], "T": [3, 3, 5, 5]})
    # learning_curves never goes through pyplot: a pyplot figure here is a failure.
    pyplot_figure, plt.figure = plt.figure, None
    plots.learning_curves(history, "step", "keep_prob", os.path.join(out, "curves.png"))
    plots.learning_curves(history, "step", "keep_prob", os.path.join(out, "panels.png"), col="T")
    plt.figure = pyplot_figure
    # A seaborn figure-level plot (made through pyplot) is saved and closed.
    grid = sns.relplot(data=history, x="step", y="test_accuracy", kind="line")
    plots.save_figure(grid.figure, os.path.join(out, "relplot.png"))

    curves = pd.DataFrame({"threshold": [0.0, 0.01], "step": [1, 1], "test_accuracy": [0.5, 0.6],
                           "weight_updates": [10, 5]})
    summary = pd.DataFrame({"threshold": [0.0, 0.01], "update_fraction": [1.0, 0.5],
                            "test_accuracy": [0.5, 0.6]})
    threshold_updates.plot_sweep(summary, curves, out)
    table = pd.DataFrame({"kind": ["weight", "unit"], "regime": ["none", "none"],
                          "fraction": [0.0, 0.0], "accuracy": [0.9, 0.9]})
    targeted_dropout.plot_accuracy(table, os.path.join(out, "pruning.png"), baseline=False)
    magnitudes = pd.DataFrame({"magnitude": [0.1, 0.2, 0.3, 0.4], "layer": ["a", "a", "b", "b"]})
    targeted_dropout.plot_magnitudes(magnitudes, os.path.join(out, "magnitudes.png"))

    report.update(after_drawing=matplotlib.get_backend(), open_figures=plt.get_fignums())
    print(json.dumps(report))
""")


def test_importing_and_drawing_keep_the_backend_and_leave_no_pyplot_figures(tmp_path):
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"after_import": "svg", "after_drawing": "svg", "open_figures": []}
    expected = ["curves.png", "panels.png", "relplot.png", "curves.png", "accuracy_vs_sparsity.png",
                "pruning.png", "magnitudes.png"]
    for name in expected:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_a_recurrent_table_figure_logs_nothing_and_leaves_the_logger_as_it_was(tmp_path, caplog):
    """Seaborn draws T as categories by handing matplotlib strings like "2", which
    logs an INFO line per axis on every table a run writes; the table is drawn
    without it, and the logger's level is the caller's again afterwards."""
    import logging

    import pandas as pd

    from dni_tf.studies import recurrent_dni

    table = pd.DataFrame({"method": ["bptt", "dni", "bptt", "dni"], "T": [8, 8, 2, 2],
                          "max_length_solved": [3, 4, 5, 6]})
    category = logging.getLogger("matplotlib.category")
    with caplog.at_level(logging.INFO):
        recurrent_dni.write_table(table, str(tmp_path), "max_length_solved", False)
        assert category.getEffectiveLevel() == logging.INFO
    assert (tmp_path / "table.png").stat().st_size > 0
    assert not [r for r in caplog.records if r.name.startswith("matplotlib")]
