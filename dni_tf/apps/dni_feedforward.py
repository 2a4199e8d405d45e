r"""Decoupled Neural Interfaces on feed-forward networks (arXiv 1608.05343, Sec. 3.1).

One run:
    python -m experiments.dni_feedforward --workdir=/tmp/dni --method=cdni --layers=4

Grid mode (several --method and/or --layers values): each configuration in
`<workdir>/<model><layers>_<method>/`, then the test error table (table.csv,
table.md) and figures (test_error.png, sg_loss.png) beside them:
    python -m experiments.dni_feedforward --workdir=/tmp/dni_grid --preset=cpu \
        --method=backprop,dni,cdni --layers=3,4,5,6

Defaults follow the paper (Adam, batch 256, lr 3e-5 divided by 10 at 60% and
80% of 500k steps); --preset=cpu gives a 1.5k-step schedule of the same shape
with lr 1e-3. --preset=parity runs the known setup of issue 20 (MNIST, FCN
784-256-256-10 decoupled after the second hidden layer, modules with one hidden
layer of 256, batch 64, Adam 1e-3, the modules at 1/16 (dni) or 1/4 (cdni) of it,
10 epochs, backprop/dni/cdni x seeds 1, 2, 3, XLA) in one line:
    python -m experiments.dni_feedforward --workdir=/tmp/dni_parity --preset=parity
A cluster (--cluster; every worker task k >= 1 runs `python -m dni_tf.pipelined_cluster`
with its TF_CONFIG, this process is task 0; see docs/pipelined_dni.md, "A lost worker"):
    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]},
                "task": {"type": "worker", "index": 0}}' \
    python -m experiments.dni_feedforward --workdir=/tmp/pipe --method=cdni --layers=6 \
        --decouple=2 --execution=pipelined --cluster --preset=cpu
Flags given explicitly override the preset. Several --seed values = grid mode
(a folder per seed, the table holds the mean). Rerunning the same command
resumes.
"""

from dni_tf.apps import quiet_tensorflow  # noqa: F401 - first: before TensorFlow loads

from absl import flags

from dni_tf.harness import cli, config
from dni_tf.studies.dni_feedforward import (PRESETS, DNIConfig, check_cluster, run_grid,
                                            run_single)

flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Defaults: the paper's 500k-step "
                  "schedule, a short CPU schedule, or the parity setup (MNIST MLP "
                  "784-256-256-10, one decoupling point; architecture, schedule, methods and "
                  "seeds). Flags given explicitly win.")
cli.define_study_flags(DNIConfig)
FLAGS = flags.FLAGS


def place_blocks(run, depths):
    """Splits the CPU for /CPU:k devices and checks every placement; UsageError (exit 2)."""
    from dni_tf.pipelined_dni import check_devices, split_cpu

    cpus = [int(d.rsplit(":", 1)[1]) for d in run.devices
            if d.upper().rsplit("/", 1)[-1].replace("DEVICE:", "").startswith("CPU:")
            and d.rsplit(":", 1)[1].isdigit()]
    if cpus and max(cpus) > 0:
        split_cpu(max(cpus) + 1)
    for depth in depths:
        blocks = (len(run.decouple) if run.decouple else depth - 1) + 1
        try:
            check_devices(run.devices, blocks)
        except cli.UsageError as exc:
            raise cli.UsageError(f"--devices: {exc} ({depth} layers)") from None


def main(argv):
    del argv
    preset = PRESETS[FLAGS.preset]
    run = config.from_flags(DNIConfig, preset=preset)
    grid = config.grid_from_flags(DNIConfig, preset=preset)
    if run.devices:
        place_blocks(run, grid["layers"])
    if run.cluster:
        check_cluster(run, grid["layers"])  # TF_CONFIG, before training
    workdir = cli.prepare_workdir(FLAGS.workdir)
    extra = {"flags": cli.flag_values(), "preset": FLAGS.preset}
    with cli.distributed(workdir) as workdir:
        if len(grid["method"]) * len(grid["layers"]) * len(grid["seed"]) == 1:
            run_single(run, workdir, extra_config=extra)
        else:
            run_grid(run, grid["method"], grid["layers"], workdir, extra_config=extra,
                     seeds=grid["seed"])


if __name__ == "__main__":
    cli.run(main)
