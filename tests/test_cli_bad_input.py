"""Every entry point, every kind of bad input: one line, exit code 2, no traceback.

Table-driven: for each entry point, wrong types, out-of-range values, NaN and
infinities, repeated sweep values (two runs in one folder), batch sizes the
data cannot fill, unknown names, an unwritable workdir, unusable distribution
settings and missing or corrupt data (an explicit --data_dir that is a file or
lacks the files). Each case must print exactly one `error:` line on stderr naming
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

# Added to a case that the old code let through, so that it fails fast there
# (a short run that exits 0) instead of training for long. For the same reason
# a too-large --batch_size is the smallest one rejected, not 99999999: the old
# code would try to build that batch (hundreds of GB, from the repeated data).
TINY = ["--steps=2", "--eval_every=1"]
CPU = ["--preset=cpu", *TINY]
ONE_REGIME = ["--regimes=none", "--hidden=8", *TINY]

# Every entry point: (arguments every case needs, its own bad cases).
# A case is (arguments, text the error line must contain).
ENTRY_POINTS = {
    "experiments.gradient_drop": (["--dataset=digits"], [
        (["--keep_probs=1.0,1.5"], "--keep_probs=1.5 is out of range: allowed [0, 1]"),
        (["--granularity=neuron"], "--granularity"),
        (["--dataset=mnist", "--data_dir={empty}"], "could not load mnist"),
        (["--dataset=mnist", "--data_dir={corrupt}"], "train-images-idx3-ubyte.gz"),
        (["--keep_probs=0.5,nan"], "--keep_probs=nan is not a finite number: allowed [0, 1]"),
        (["--keep_probs=1,inf"], "--keep_probs=inf is not a finite number"),
        (["--keep_probs=0.5,0.5", *TINY], "--keep_probs: 0.5 is given more than once"),
        (["--learning_rate=nan", *TINY], "--learning_rate=nan is not a finite number"),
        (["--learning_rate=inf", *TINY], "--learning_rate=inf is not a finite number"),
        (["--batch_size=1498", *TINY],
         "--batch_size=1498 is out of range: allowed [1, 1497] (digits has 1497"),
        # The fast path: an explicit request that cannot be honoured.
        (["--steps_per_execution=7", *TINY], "--steps_per_execution=7: must divide the "
                                             "evaluation/checkpoint/logging periods [1]"),
        (["--mixed_precision=fp16", *TINY], "--mixed_precision=fp16: value should be one of "
                                            "<none|bfloat16|float16>"),
        (["--jit_compile=maybe", *TINY], "--jit_compile='maybe' is not allowed: choose from "
                                         "true, false, auto"),
        (["--dataset=mnist", "--data_dir={empty}"], "missing {empty}/mnist/train-images"),
        (["--dataset=mnist", "--data_dir={file}"], "--data_dir={file} is a file, not a directory"),
    ]),
    "experiments.threshold_updates": (["--dataset=digits"], [
        (["--thresholds=0,-1e-3"], "--thresholds=-0.001 is out of range"),
        (["--accumulation=median"], "--accumulation"),
        (["--max_delay=-1"], "--max_delay"),
        (["--statistics_every=0"], "--statistics_every"),
        (["--dataset=mnist", "--data_dir={empty}"], "could not load mnist"),
        (["--dataset=mnist", "--data_dir={corrupt}"], "train-images-idx3-ubyte.gz"),
        (["--thresholds=nan", *TINY], "--thresholds=nan is not a finite number: allowed [0, inf)"),
        (["--thresholds=0,inf", *TINY], "--thresholds=inf is not a finite number"),
        (["--thresholds=1e-4,0.0001", *TINY], "--thresholds: 1e-4 and 0.0001 are the same value"),
        (["--decay=nan", *TINY], "--decay=nan is not a finite number: allowed [0, 1]"),
        (["--learning_rate=nan", *TINY], "--learning_rate=nan is not a finite number"),
        (["--noise_stddev=inf", *TINY], "--noise_stddev=inf is not a finite number"),
        (["--target_accuracy=nan", *TINY], "--target_accuracy=nan is not a finite number"),
        (["--mixed_precision=float16", *TINY], "thresholds compare unscaled gradients"),
        (["--steps=10", "--eval_every=4", "--steps_per_execution=4"],
         "--steps_per_execution=4: must divide the evaluation/checkpoint/logging periods [2]"),
        (["--batch_size=1498", *TINY],
         "--batch_size=1498 is out of range: allowed [1, 1497]"),
        (["--dataset=mnist", "--data_dir={empty}"], "missing {empty}/mnist/train-images"),
        (["--dataset=mnist", "--data_dir={file}"], "--data_dir={file} is a file, not a directory"),
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
        (["--learning_rate=inf", *CPU], "--learning_rate=inf is not a finite number"),
        (["--sg_scale=inf", *CPU], "--sg_scale=inf is not a finite number"),
        (["--lr_boundaries=0.5,nan", *CPU], "--lr_boundaries=nan is not a finite number: allowed (0, 1)"),
        (["--lr_boundaries=0.5,0.5", *CPU], "--lr_boundaries: 0.5 is given more than once"),
        (["--method=dni,dni", *CPU], "--method: 'dni' is given more than once"),
        (["--layers=3,3", *CPU], "--layers: 3 is given more than once"),
        (["--mixed_precision=float16", "--method=dni", *CPU],
         "--mixed_precision=float16: not supported here: the training step does not scale"),
        (["--method=backprop", "--devices=/CPU:0,/CPU:1", "--jit_compile", *CPU],
         "--jit_compile=true: not supported here: jit_compile with --devices"),
        (["--batch_size=1498", *CPU],
         "--batch_size=1498 is out of range: allowed [1, 1497]"),
        (["--method=dni,cdni", "--batch_size=1498", *CPU],
         "--batch_size=1498 is out of range: allowed [1, 1497]"),
        (["--dataset=mnist", "--data_dir={file}"], "--data_dir={file} is a file, not a directory"),
        (["--layers=3", "--decouple=2", "--execution=pipelined", "--devices=/CPU:0", *CPU],
         "--devices: 2 blocks need 2 devices, got 1"),
    ]),
    "experiments.targeted_dropout": (["--dataset=digits"], [
        (["--alpha=1.5"], "--alpha"),
        (["--gamma=-0.1"], "--gamma"),
        (["--prune_fractions=-5"], "--prune_fractions"),
        (["--use_bias=maybe"], "use_bias"),
        (["--regimes=none,magic"], "--regimes"),
        (["--prune_fractions=0,50,100"], "--prune_fractions"),
        (["--dataset=fashion_mnist", "--data_dir={empty}"], "could not load fashion_mnist"),
        (["--alpha=nan", *ONE_REGIME], "--alpha=nan is not a finite number: allowed [0, 1]"),
        (["--epochs=nan"], "--epochs=nan is not a finite number: allowed (0, inf)"),
        (["--epochs=inf"], "--epochs=inf is not a finite number"),
        (["--xla_regimes=none", "--jit_compile=false", *ONE_REGIME],
         "--xla_regimes: give it or --jit_compile, not both"),
        (["--steps_per_execution=2", "--steps=3", "--eval_every=3", "--regimes=none",
          "--hidden=8"], "--steps_per_execution=2: must divide the evaluation/checkpoint/"
                         "logging periods [3]"),
        (["--ramp_epochs=nan"], "--ramp_epochs=nan is not a finite number"),
        (["--prune_fractions=0,nan", *ONE_REGIME], "--prune_fractions=nan is not a finite number: allowed [0, 100)"),
        (["--prune_fractions=50,50", *ONE_REGIME], "--prune_fractions: 50 is given more than once"),
        (["--learning_rate=nan", *ONE_REGIME], "--learning_rate=nan is not a finite number"),
        (["--batch_size=1498", *ONE_REGIME],
         "--batch_size=1498 is out of range: allowed [1, 1497]"),
        (["--dataset=fashion_mnist", "--data_dir={empty}"],
         "missing {empty}/fashion_mnist/train-images-idx3-ubyte.gz"),
        (["--dataset=fashion_mnist", "--data_dir={file}"],
         "--data_dir={file} is a file, not a directory"),
    ]),
    "experiments.copy_task": ([], [
        (["--truncation=0"], "--truncation"),
        (["--task=sort"], "--task"),
        (["--method=rtrl"], "--method"),
        (["--truncation=2,x"], "--truncation: 'x' is not an integer"),
        (["--truncation=2,0"], "--truncation=0 is out of range"),
        (["--method=bptt,rtrl"], "--method='rtrl'"),
        (["--learning_rate=inf", *TINY], "--learning_rate=inf is not a finite number"),
        (["--clip_norm=nan", *TINY], "--clip_norm=nan is not a finite number"),
        (["--threshold=inf", *TINY], "--threshold=inf is not a finite number"),
        (["--jit_compile", *TINY], "--jit_compile=true: not supported here: the curriculum "
                                   "changes the sequence length"),
        (["--steps_per_execution=2", "--steps=2", "--eval_every=2"],
         "--steps_per_execution=2: not supported here: each batch is built from the curriculum"),
        (["--mixed_precision=float16", *TINY], "--mixed_precision=float16: not supported here: "
                                               "the training step does not scale the loss"),
        (["--aux_weight=-1", *TINY], "--aux_weight=-1.0 is out of range: allowed [0, inf)"),
        (["--update=per_epoch", *TINY], "--update=per_epoch: value should be one of <per_window|per_batch>"),
        (["--batch_size=4097", *TINY], "--batch_size=4097 is out of range: allowed [1, 4096] "
                                       "(each batch of copy sequences is generated in memory"),
        (["--method=bptt", "--truncation=2,2", *TINY],
         "--truncation: 2 is given more than once"),
        (["--method=bptt,bptt", "--truncation=2", *TINY],
         "--method: 'bptt' is given more than once"),
        (["--fork_from={empty}", *TINY], "--fork_from={empty}: no checkpoint to start from"),
        (["--fork_from={empty}/none", *TINY], "--fork_from={empty}/none: no such run directory"),
        (["--fork_from={empty}", "--method=bptt,dni", *TINY],
         "--fork_from starts one run: give one value to --method"),
    ]),
    "experiments.language_model": (["--data_dir={ptb}"], [
        (["--fork_from={empty}", "--truncation=2,5", *TINY],
         "--fork_from starts one run: give one value to --truncation"),
        (["--truncation=0"], "--truncation"),
        (["--method=rtrl"], "--method"),
        (["--data_dir={empty}"], "ptb.char.train.txt"),
        (["--method=bptt,dni", "--truncation=5,3"], "--chunk_length: must be a multiple of truncation (3)"),
        (["--learning_rate=inf", *TINY], "--learning_rate=inf is not a finite number"),
        (["--sg_scale=nan", *TINY], "--sg_scale=nan is not a finite number"),
        (["--steps_per_execution=3", *TINY], "--steps_per_execution=3: must divide"),
        (["--batch_size=99999999", *TINY],
         "--batch_size=99999999 is out of range: allowed [1, 1] (each of the batch_size rows"),
        (["--batch_size=1", "--eval_length=1000", *TINY], "--eval_length=1000 is out of range: "
                                                          "the valid split"),
        (["--method=bptt", "--truncation=5,5", *TINY],
         "--truncation: 5 is given more than once"),
        (["--data_dir={file}"], "data directory {file} is a file, not a directory"),
    ]),
    "experiments.multi_network": ([], [
        (["--tick_ratio=0"], "--tick_ratio"),
        (["--method=rtrl"], "--method"),
        (["--tick_ratio=2,-1"], "--tick_ratio=-1 is out of range"),
        (["--mixed_precision=float16", "--method=backprop,dni", "--dataset=digits",
          "--batch_size=4", *TINY], "--mixed_precision=float16: not supported here: the training "
                                    "step does not scale the loss"),
        (["--learning_rate=inf", "--dataset=digits", *TINY],
         "--learning_rate=inf is not a finite number"),
        (["--batch_size=19", "--dataset=digits", *TINY],
         "--batch_size=19 is out of range: allowed [1, 18] (episodes per batch"),
        (["--tick_ratio=2,2", "--dataset=digits", "--batch_size=4", *TINY],
         "--tick_ratio: 2 is given more than once"),
        (["--method=dni,dni", "--dataset=digits", "--batch_size=4", *TINY],
         "--method: 'dni' is given more than once"),
        (["--tick_ratio=1,8", "--dataset=digits", "--batch_size=10", *TINY],
         "--batch_size=10 is out of range: allowed [1, 4]"),
        (["--data_dir={file}"], "--data_dir={file} is a file, not a directory"),
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
    (root / "a_file").write_text("not a directory")
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
            "ptb": str(root / "ptb"), "file": str(root / "a_file")}


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
def test_bad_input_gives_one_line_exit_2_and_keeps_the_workdir(outcomes, data_dirs, module,
                                                               index, args, expected):
    outcome, workdir = outcomes[module, index]
    expected = expected.format(**data_dirs)
    stderr = outcome["stderr"]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert outcome["code"] == 2, stderr
    assert len(errors) == 1 and expected in errors[0], stderr
    assert (workdir / "keep.txt").read_text() == "precious"
