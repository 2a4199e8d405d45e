"""Every notebook in notebooks/ runs in a real Jupyter kernel, and its install cell works.

End to end: each notebook is executed by nbclient in its own `python3`
(ipykernel) kernel, started in notebooks/ as Jupyter would, with matplotlib's
backend left to the kernel (inline, as in Jupyter and Colab). The tiny values of
`TINY_PARAMETERS` are injected in a new cell right after the cell tagged
`parameters` (as papermill does). Only `%tensorboard --logdir` is not run: it
starts a TensorBoard server that would outlive the kernel. The executed notebook
must have no error output, an inline PNG for every `plt.show()`, its result
table, and the files its run writes.

The install cell (the first code cell, identical in every notebook) is plain
Python; it is run in a separate interpreter without site-packages (`-I -S`, so
dni_tf is not importable unless a branch makes it so) with `subprocess.run`
replaced by a fake pip, once per branch: already importable, inside a
checkout, Colab without a repository URL, Colab with one, and a failing pip.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

nbformat = pytest.importorskip("nbformat")

from conftest import REPO_ROOT  # noqa: E402

NOTEBOOK_DIR = os.path.join(REPO_ROOT, "notebooks")
STUDIES = ("gradient_dropping", "threshold_updates", "dni_feedforward", "recurrent_dni",
           "targeted_dropout")
# Seconds per notebook on two shared CPU cores: a kernel start and TensorFlow import
# (~10-15 s) plus the tiny run (~5-20 s).
TIME_LIMIT_S = 180

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
# Each notebook names its real source in its introduction.
SOURCES = {
    "gradient_dropping": "Effective learning while misplacing gradient updates",
    "threshold_updates": "Backprop without synchronization",
    "dni_feedforward": "arXiv:1608.05343",
    "recurrent_dni": "arXiv:1608.05343",
    "targeted_dropout": "arXiv:1905.13678",
}
TENSORBOARD_MAGIC = "%tensorboard --logdir {WORKDIR}"


def notebook_path(study: str) -> str:
    return os.path.join(NOTEBOOK_DIR, f"{study}.ipynb")


def read(study: str):
    return nbformat.read(notebook_path(study), as_version=4)


def code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


def parameters_cell(notebook):
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one code cell must be tagged 'parameters'"
    assert cells[0].cell_type == "code"
    return cells[0]


def assigned_names(source: str) -> set:
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def install_cell_source() -> str:
    return code_cells(read(STUDIES[0]))[0].source


# --- static checks --------------------------------------------------------------------------

def test_one_notebook_per_study_and_nothing_else():
    found = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert found == sorted(STUDIES)


def test_install_cell_is_the_first_code_cell_and_identical_in_every_notebook():
    sources = {study: code_cells(read(study))[0].source for study in STUDIES}
    reference = sources[STUDIES[0]]
    for study, source in sources.items():
        assert source == reference, f"{study}.ipynb's install cell differs from {STUDIES[0]}'s"
    assert 'REPO_URL = ""  # @param {type:"string"}' in reference.splitlines()
    assert "DNI_TF_REPO_URL" in reference
    assert "!" not in "".join(line.lstrip()[:1] for line in reference.splitlines()), \
        "plain Python only: no shell lines that hide pip's exit status"


@pytest.mark.parametrize("study", STUDIES)
def test_notebook_is_committed_clean_and_complete(study):
    notebook = read(study)
    nbformat.validate(notebook)
    for cell in code_cells(notebook):
        assert not cell.outputs and cell.execution_count is None, \
            "commit notebooks without outputs"
    sources = [c.source for c in code_cells(notebook)]
    assert sum(TENSORBOARD_MAGIC in s for s in sources) == 1
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert "$$" in markdown, "the explanation needs its equation"
    assert SOURCES[study] in notebook.cells[0].source, "the introduction must cite its source"
    for private in ("shared/", "design.md", "seed 00", "seeds 00", "Seed 00"):
        assert private not in markdown, f"{private!r}: cite the public source, not project notes"
    parameters = parameters_cell(notebook)
    assert "WORKDIR" in assigned_names(parameters.source)
    assert set(TINY_PARAMETERS[study]) <= assigned_names(parameters.source), \
        "the test overrides a parameter the notebook no longer has"


# --- the install cell's branches ------------------------------------------------------------

# Runs the install cell (argv[1]) in the current directory with a fake pip that records
# its arguments and prints FAKE_PIP_OUTPUT, exiting with FAKE_PIP_RC. Prints one JSON line:
# the pip calls, the error raised (if any) and whether dni_tf is importable afterwards.
INSTALL_DRIVER = textwrap.dedent("""
    import importlib.util, json, os, subprocess, sys, types
    if os.environ.get("FAKE_IMPORTABLE_FROM"):  # a dni_tf there, whatever is installed
        sys.path.insert(0, os.environ["FAKE_IMPORTABLE_FROM"])
    if os.environ.get("FAKE_COLAB"):
        sys.modules["google.colab"] = types.ModuleType("google.colab")
    calls = []
    def fake_run(args, **kwargs):
        calls.append(list(args))
        return subprocess.CompletedProcess(args, int(os.environ.get("FAKE_PIP_RC", "0")),
                                           stdout=os.environ.get("FAKE_PIP_OUTPUT", ""))
    subprocess.run = fake_run
    error = None
    try:
        exec(compile(open(sys.argv[1]).read(), "install cell", "exec"), {"__name__": "__main__"})
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps({"calls": calls, "error": error,
                      "importable": importlib.util.find_spec("dni_tf") is not None}))
""")


def run_install_cell(tmp_path, cwd, *, site=False, colab=False, repo_url=None, pip_rc=0,
                     pip_output="Successfully installed dni_tf-0.1.0", importable_from=None):
    cell = tmp_path / "install_cell.py"
    cell.write_text(install_cell_source())
    env = {k: v for k, v in os.environ.items() if k not in ("DNI_TF_REPO_URL", "PYTHONPATH")}
    env.update(FAKE_PIP_RC=str(pip_rc), FAKE_PIP_OUTPUT=pip_output)
    if importable_from is not None:
        env["FAKE_IMPORTABLE_FROM"] = str(importable_from)
    if colab:
        env["FAKE_COLAB"] = "1"
    if repo_url is not None:
        env["DNI_TF_REPO_URL"] = repo_url
    # Without -S site-packages (and so the installed dni_tf) is on the path.
    flags = ["-I"] if site else ["-I", "-S"]
    done = subprocess.run([sys.executable, *flags, "-c", INSTALL_DRIVER, str(cell)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, result = done.stdout.strip().splitlines()
    return json.loads(result), "\n".join(printed)


def make_checkout(root, name="dni_tf"):
    """A directory that looks like a dni_tf checkout: setup.cfg, the package, notebooks/."""
    (root / "notebooks").mkdir(parents=True)
    (root / "setup.cfg").write_text(f"[metadata]\nname = {name}\nversion = 0.1.0\n")
    (root / "dni_tf").mkdir()
    (root / "dni_tf" / "__init__.py").write_text("")
    return root


def test_install_cell_does_nothing_when_dni_tf_is_importable(tmp_path):
    # Importable from a folder of its own, not from whatever this machine has installed
    # (an install of another checkout, or one being replaced while the tests run).
    elsewhere = make_checkout(tmp_path / "elsewhere")
    result, printed = run_install_cell(tmp_path, tmp_path, colab=True,
                                       importable_from=elsewhere)
    assert result == {"calls": [], "error": None, "importable": True}
    assert printed == "dni_tf is already importable; nothing to install."


def test_install_cell_installs_the_checkout_it_was_opened_from(tmp_path):
    checkout = make_checkout(tmp_path / "checkout")
    result, printed = run_install_cell(tmp_path, checkout / "notebooks", repo_url="https://x/y")
    assert result["error"] is None
    assert result["calls"] == [[sys.executable, "-m", "pip", "install", "-e", str(checkout)]]
    assert result["importable"], "this kernel must import dni_tf without a restart"
    assert printed == "Successfully installed dni_tf-0.1.0"


def test_install_cell_on_colab_without_a_repository_url_says_what_to_set(tmp_path):
    other = make_checkout(tmp_path / "other", name="not_dni_tf")  # a setup.cfg, not ours
    result, printed = run_install_cell(tmp_path, other / "notebooks", colab=True, repo_url="")
    assert result["calls"] == [] and not result["importable"]
    assert result["error"].startswith("RuntimeError: dni_tf is not installed: set REPO_URL")
    assert "DNI_TF_REPO_URL" in result["error"]
    assert printed == ""


@pytest.mark.parametrize("url, requirement", [
    ("https://github.com/someone/dni_tf", "git+https://github.com/someone/dni_tf"),
    ("git+https://github.com/someone/dni_tf@main", "git+https://github.com/someone/dni_tf@main"),
])
def test_install_cell_on_colab_installs_the_repository_url(tmp_path, url, requirement):
    result, _ = run_install_cell(tmp_path, tmp_path, colab=True, repo_url=url)
    assert result["error"] is None
    assert result["calls"] == [[sys.executable, "-m", "pip", "install", requirement]]


def test_install_cell_shows_pips_output_and_stops_when_pip_fails(tmp_path):
    output = "\n".join(f"line {i}" for i in range(100)) + "\nERROR: repository not found"
    result, printed = run_install_cell(tmp_path, tmp_path, colab=True, repo_url="https://x/y",
                                       pip_rc=1, pip_output=output)
    assert result["error"].startswith("RuntimeError: pip install git+https://x/y failed "
                                      "(exit code 1)")
    assert printed.splitlines()[-1] == "ERROR: repository not found"
    assert "line 80" in printed and "line 10\n" not in printed, "the tail of pip's output"


# --- end to end in a Jupyter kernel ---------------------------------------------------------

def prepared(study: str, workdir: str):
    """The notebook with the tiny parameters injected and `%tensorboard` left out."""
    notebook = read(study)
    parameters = parameters_cell(notebook)
    overrides = dict(TINY_PARAMETERS[study], WORKDIR=workdir)
    injected = nbformat.v4.new_code_cell(
        "\n".join(f"{name} = {value!r}" for name, value in overrides.items()),
        metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(notebook.cells.index(parameters) + 1, injected)
    for cell in code_cells(notebook):
        cell.source = cell.source.replace(
            TENSORBOARD_MAGIC, "pass  # (tests: no TensorBoard server)")
    return notebook


def outputs(cell, output_type):
    return [o for o in cell.get("outputs", []) if o.output_type == output_type]


@pytest.mark.timeout(TIME_LIMIT_S)
@pytest.mark.parametrize("study", STUDIES)
def test_notebook_runs_in_a_jupyter_kernel(study, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    workdir = str(tmp_path / "workdir")
    notebook = prepared(study, workdir)
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel's own default (inline), as in Jupyter
    # The kernel imports this checkout, whatever is installed: never the install cell's
    # real `pip install`, which would replace the install under the other tests' feet.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=TIME_LIMIT_S,
                                     startup_timeout=120, allow_errors=True,
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute(env=env)

    cells = code_cells(notebook)
    errors = [f"cell {i}: {e.ename}: {e.evalue}" for i, c in enumerate(cells)
              for e in outputs(c, "error")]
    assert not errors, errors
    install_output = "".join(o.text for o in outputs(cells[0], "stream"))
    assert "dni_tf is already importable" in install_output
    for cell in cells:
        shows = cell.source.count("plt.show()")
        images = [o for o in outputs(cell, "display_data") if "image/png" in o.data]
        assert len(images) == shows, \
            f"{shows} plt.show() but {len(images)} inline figures in:\n{cell.source}"
    assert sum(c.source.count("plt.show()") for c in cells) >= 1
    tables = [o for c in cells for o in outputs(c, "execute_result") if "text/html" in o.data]
    assert tables, "the run's result table (a DataFrame) is displayed"
    assert os.path.exists(os.path.join(workdir, EXPECTED_OUTPUT[study]))


def test_prepared_notebook_injects_after_the_parameters_cell():
    notebook = prepared("gradient_dropping", "/tmp/w")
    index = notebook.cells.index(parameters_cell(notebook))
    injected = notebook.cells[index + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "WORKDIR = '/tmp/w'" in injected.source and "STEPS = 2" in injected.source
    assert not any(TENSORBOARD_MAGIC in c.source for c in code_cells(notebook))
