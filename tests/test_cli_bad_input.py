"""Every entry point, every kind of bad input: one line, exit code 2, no traceback.

Table-driven: for each entry point, wrong types, out-of-range values, unknown
names, an unwritable workdir, unusable distribution settings and missing or
corrupt data. Each case must print exactly one `error:` line on stderr naming
the problem, exit with code 2, print no traceback, and leave what was already
in the workdir intact. One process per entry point runs all of its cases
(`tests/cli_driver.py`), so the table costs one TensorFlow import per entry
point; the processes run in parallel.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# One xdist worker runs the whole table: its module fixtures start the processes once.
pytestmark = pytest.mark.xdist_group("cli_bad_input")

UNWRITABLE = "/proc/dni_tf_cannot_write_here"

# Every entry point: (arguments every case needs, its own bad cases).
# A case is (arguments, text the error line must contain).
ENTRY_POINTS = {
    "experiments.gradient_drop": (["--dataset=digits"], [
        (["--keep_probs=1.0,1.5"], "--keep_probs=1.5 is out of range: allowed [0, 1]"),
        (["--granularity=neuron"], "--granularity"),
        (["--steps=1000", "--eval_every=300"], "eval_every"),
        (["--dataset=mnist", "--data_dir={empty}"], "could not load mnist"),
        (["--dataset=mnist", "--data_dir={corrupt}"], "train-images-idx3-ubyte.gz"),
    ]),
    "experiments.threshold_updates": (["--dataset=digits"], [
        (["--thresholds=0,-1e-3"], "--thresholds=-0.001 is out of range"),
        (["--accumulation=median"], "--accumulation"),
        (["--max_delay=-1"], "--max_delay"),
        (["--statistics_every=0"], "--statistics_every"),
        (["--dataset=mnist", "--data_dir={empty}"], "could not load mnist"),
        (["--dataset=mnist", "--data_dir={corrupt}"], "train-images-idx3-ubyte.gz"),
    ]),
    "experiments.dni_feedforward": (["--dataset=digits"], [
        (["--update_prob=1.5"], "--update_prob"),
        (["--update_prob=0"], "--update_prob"),
        (["--method=magic"], "--method"),
        (["--method=backprop,sgd"], "--method"),
        (["--layers=1"], "--layers"),
        (["--layers=3", "--decouple=1,3"], "--decouple"),
        (["--unlock=partial"], "--unlock"),
        (["--dataset=mnist", "--data_dir={empty}"], "could not load mnist"),
    ]),
    "experiments.targeted_dropout": (["--dataset=digits"], [
        (["--alpha=1.5"], "--alpha"),
        (["--gamma=-0.1"], "--gamma"),
        (["--prune_fractions=-5"], "--prune_fractions"),
        (["--use_bias=maybe"], "use_bias"),
        (["--regimes=none,magic"], "--regimes"),
        (["--prune_fractions=0,50,100"], "--prune_fractions"),
        (["--dataset=fashion_mnist", "--data_dir={empty}"], "could not load fashion_mnist"),
    ]),
    "experiments.copy_task": ([], [
        (["--truncation=0"], "--truncation"),
        (["--task=sort"], "--task"),
        (["--method=rtrl"], "--method"),
        (["--table", "--table_truncations=2,x"], "--table_truncations: 'x' is not an integer"),
        (["--table", "--table_truncations=0"], "--table_truncations=0 is out of range"),
        (["--table", "--table_methods=bptt,rtrl"], "--table_methods='rtrl'"),
    ]),
    "experiments.language_model": (["--data_dir={ptb}"], [
        (["--truncation=0"], "--truncation"),
        (["--method=rtrl"], "--method"),
        (["--data_dir={empty}"], "ptb.char.train.txt"),
        (["--table", "--table_truncations=3"], "does not divide --chunk_length"),
    ]),
    "experiments.multi_network": ([], [
        (["--tick_ratio=0"], "--tick_ratio"),
        (["--method=rtrl"], "--method"),
        (["--compare", "--compare_tick_ratios=2,-1"], "--compare_tick_ratios=-1 is out of range"),
    ]),
}
# Cases every entry point must reject the same way.
COMMON_CASES = [
    (["--steps=ten"], "--steps"),
    (["--steps=-5"], "--steps"),
    (["--distribution=cluster"], "--distribution"),
    (["--distribution=multi_worker"], "TF_CONFIG"),
    (["--workdir=" + UNWRITABLE], "--workdir"),
    (["--no_such_flag=1"], "no_such_flag"),
]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "empty").mkdir()
    corrupt = root / "corrupt" / "mnist"
    corrupt.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (corrupt / f"{name}.gz").write_bytes(b"not a gzip file")
    ptb = root / "ptb" / "ptb"
    ptb.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (ptb / f"ptb.char.{split}.txt").write_text("a b c _ d e f\n" * 50)
    return {"empty": str(root / "empty"), "corrupt": str(root / "corrupt"),
            "ptb": str(root / "ptb")}


@pytest.fixture(scope="module")
def outcomes(data_dirs, tmp_path_factory):
    """Runs every case; returns {(entry point, case index): (outcome, workdir)}."""
    env = dict(os.environ, DNI_TF_USE_TFDS="0")
    env.pop("TF_CONFIG", None)
    runs = {}
    for module, (base, cases) in ENTRY_POINTS.items():
        argvs, workdirs = [], []
        for index, (args, _) in enumerate(cases + COMMON_CASES):
            workdir = tmp_path_factory.mktemp(f"{module.split('.')[1]}_{index}")
            (workdir / "keep.txt").write_text("precious")
            argv = [f"--workdir={workdir}"] + [a.format(**data_dirs) for a in base + args]
            argvs.append(argv)
            workdirs.append(workdir)
        process = subprocess.Popen([sys.executable, "tests/cli_driver.py", module],
                                   cwd=REPO_ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdin.write(json.dumps(argvs))
        process.stdin.close()
        runs[module] = (process, workdirs)
    results = {}
    for module, (process, workdirs) in runs.items():
        stdout = process.stdout.read()
        stderr = process.stderr.read()
        process.wait(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        reported = json.loads(stdout.split("=== cli_driver results ===")[1])
        for index, (outcome, workdir) in enumerate(zip(reported, workdirs)):
            results[module, index] = (outcome, workdir)
    return results


CASES = [(module, index, args, expected)
         for module, (_, cases) in ENTRY_POINTS.items()
         for index, (args, expected) in enumerate(cases + COMMON_CASES)]


@pytest.mark.parametrize("module,index,args,expected", CASES,
                         ids=[f"{m.split('.')[1]}:{' '.join(a)}" for m, _, a, _ in CASES])
def test_bad_input_gives_one_line_exit_2_and_keeps_the_workdir(outcomes, module, index,
                                                               args, expected):
    outcome, workdir = outcomes[module, index]
    stderr = outcome["stderr"]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert outcome["code"] == 2, stderr
    assert len(errors) == 1 and expected in errors[0], stderr
    assert (workdir / "keep.txt").read_text() == "precious"
