"""Every notebook in notebooks/ runs end to end on tiny settings.

How they run, and why: the code cells are executed with `exec` in this pytest
process, in one namespace per notebook, after the cell tagged "parameters" with
the tiny values of `TINY_PARAMETERS` assigned right after it (as papermill
would inject them). A Jupyter kernel per notebook would pay a fresh TensorFlow
import each (~10 s on two cores, five times) and add jupyter_client/ipykernel
to the test dependencies; in-process, TensorFlow is already imported and the
five notebooks cost about as much as their tiny training runs.

The price is that IPython-only lines cannot run: `!` shell lines and `%` line
magics are checked against `ALLOWED_IPYTHON_LINES` (the Colab-only install,
`%matplotlib inline`, the TensorBoard widget, none of which does anything
useful without a notebook frontend) and replaced by `pass`; anything else is a
test failure. Figures are drawn with matplotlib's Agg backend; `plt.show` is
counted and the figures closed.
"""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")

from conftest import REPO_ROOT  # noqa: E402

NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
STUDIES = ("gradient_dropping", "threshold_updates", "dni_feedforward", "recurrent_dni",
           "targeted_dropout")
# Seconds per notebook on the two shared CPU cores (each takes ~5-10 s unloaded).
TIME_LIMIT_S = 90

# One configuration per study, two training steps, the smallest networks: the
# point is that every cell runs against the current library API, not the result.
TINY_PARAMETERS = {
    "gradient_dropping": dict(KEEP_PROBS=(0.5,), STEPS=2, EVAL_EVERY=2),
    "threshold_updates": dict(THRESHOLDS=(1e-2,), HIDDEN=(16,), STEPS=2, EVAL_EVERY=2),
    "dni_feedforward": dict(METHODS=("cdni",), LAYERS=3, WIDTH=16, STEPS=2, EVAL_EVERY=2,
                            BATCH_SIZE=64),
    "recurrent_dni": dict(METHODS=("dni",), HIDDEN_SIZE=8, STEPS=2, EVAL_EVERY=2, BATCH_SIZE=4,
                          EVAL_BATCHES=1),
    "targeted_dropout": dict(REGIMES=("targeted_weight",), HIDDEN=(16,), PRUNE_FRACTIONS=(0, 50),
                             STEPS=2, EVAL_EVERY=2),
}
# What each study leaves in WORKDIR (the notebook's run really happened).
EXPECTED_OUTPUT = {
    "gradient_dropping": "summary.csv",
    "threshold_updates": "summary.csv",
    "dni_feedforward": "table.md",
    "recurrent_dni": "table.md",
    "targeted_dropout": "pruning_accuracy.csv",
}
ALLOWED_IPYTHON_LINES = (
    re.compile(r'!pip install -q "git\+\{REPOSITORY\}"$'),
    re.compile(r"%matplotlib inline$"),
    re.compile(r"%load_ext tensorboard$"),
    re.compile(r"%tensorboard --logdir \{WORKDIR\}$"),
)


def notebook_path(study: str) -> str:
    return os.path.join(NOTEBOOK_DIR, f"{study}.ipynb")


def read(study: str):
    return nbformat.read(notebook_path(study), as_version=4)


def parameters_cell(notebook):
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one code cell must be tagged 'parameters'"
    assert cells[0].cell_type == "code"
    return cells[0]


def assigned_names(source: str) -> set:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def as_python(source: str, where: str) -> str:
    """The cell with its allowed IPython-only lines replaced by `pass` (same indentation)."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("!", "%")):
            assert any(p.match(stripped) for p in ALLOWED_IPYTHON_LINES), \
                f"{where}: IPython line not allowed in notebooks: {stripped!r}"
            line = line[:len(line) - len(stripped)] + "pass"
        lines.append(line)
    return "\n".join(lines)


def test_one_notebook_per_study_and_nothing_else():
    found = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert found == sorted(STUDIES)


@pytest.mark.parametrize("study", STUDIES)
def test_notebook_is_committed_clean_and_complete(study):
    notebook = read(study)
    nbformat.validate(notebook)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    for cell in code_cells:
        assert not cell.outputs and cell.execution_count is None, \
            "commit notebooks without outputs"
    sources = [c.source for c in code_cells]
    assert any('if "google.colab" in sys.modules:' in s and "!pip install" in s
               for s in sources), "the install cell must be guarded to run on Colab only"
    assert any("%tensorboard --logdir" in s for s in sources)
    assert any("$$" in c.source for c in notebook.cells if c.cell_type == "markdown"), \
        "the explanation needs its equation"
    parameters = parameters_cell(notebook)
    assert "WORKDIR" in assigned_names(parameters.source)
    assert set(TINY_PARAMETERS[study]) <= assigned_names(parameters.source), \
        "the test overrides a parameter the notebook no longer has"


@pytest.fixture
def notebook_sandbox():
    """Closes figures, counts plt.show calls, restores absl verbosity and Keras state."""
    import keras
    import matplotlib.pyplot as plt
    from absl import logging

    verbosity = logging.get_verbosity()
    shown = []
    original_show = plt.show
    plt.show = lambda *args, **kwargs: shown.append(len(plt.get_fignums()))
    keras.utils.clear_session()
    try:
        yield shown
    finally:
        plt.show = original_show
        plt.close("all")
        logging.set_verbosity(verbosity)
        keras.utils.clear_session()


@pytest.mark.timeout(TIME_LIMIT_S)
@pytest.mark.parametrize("study", STUDIES)
def test_notebook_runs_end_to_end(study, tmp_path, notebook_sandbox):
    notebook = read(study)
    parameters = parameters_cell(notebook)
    overrides = dict(TINY_PARAMETERS[study], WORKDIR=str(tmp_path / "workdir"))
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        where = f"{study}.ipynb cell {index}"
        exec(compile(as_python(cell.source, where), where, "exec"), namespace)
        if cell is parameters:
            namespace.update(overrides)
    assert os.path.exists(tmp_path / "workdir" / EXPECTED_OUTPUT[study])
    assert notebook_sandbox and all(notebook_sandbox), "every plt.show() must have a figure"
