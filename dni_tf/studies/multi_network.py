"""The two-clock multi-network study (section 3.3) as importable code.

`run_multi_network(config, workdir)` trains one `MultiNetwork` on episodes of
k*k MNIST digits (test episodes from the test set) and writes results.json
(`test_a_accuracy`, `test_b_accuracy`, `test_b_final_accuracy`, ...),
history.csv, TensorBoard and checkpoints. `steps` counts batches of episodes
(the same data for both methods: dni makes k*k updates of A per batch, backprop
one). `run_comparison` runs both methods for each tick ratio in `<method>_k<k>/`
and writes table.csv / table.md / table.png; finished cells are read back and
unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import keras
import pandas as pd

from dni_tf.harness import cli
from dni_tf import data as data_lib
from dni_tf.harness import plots, results, tensorboard_views
from dni_tf.multi_network import METHODS, SG_CONTEXTS, MultiNetwork, episode_dataset
from dni_tf.harness.fast_path import FastPathOptions, evaluation_periods
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.training import SweepProgress, train_and_evaluate


STUDY = "multi_network"  # written into results.json: the reproduction report reads it
PUBLISHED = results.Published(
    title="Multi-network system",
    source="Jaderberg et al. 2016, *Decoupled Neural Interfaces using Synthetic Gradients*, "
           "arXiv 1608.05343, section 3.3",
    claims=("Two RNNs ticking at different rates communicate through a DNI; the slow "
            "network is trained by synthetic gradients from the fast one.",))


@dataclasses.dataclass
class MultiNetworkConfig(FastPathOptions):
    """One two-clock system's settings. On the command line `method` and
    `tick_ratio` take comma lists: one run per combination and a comparison
    table (`run_comparison`)."""

    tick_ratio: int = option(4, "k: B ticks once every k steps of A; several = comparison.",
                             low=1, grid=True)
    method: str = option("dni", "Training method; several = comparison.", choices=METHODS,
                         grid=True)
    hidden_a: int = option(64, "LSTM units of A.", low=1)
    hidden_b: int = option(64, "LSTM units of B.", low=1)
    message_size: int = option(16, "Width of A's message to B.", low=1)
    sg_context: str = option("none", "dni: what M reads besides A's message: none, or count "
                             "(the one-hot target count of B's tick, cDNI).",
                             choices=SG_CONTEXTS)
    sg_learning_rate: float = option(0.0, "dni: Adam learning rate of M (0: --learning_rate).",
                                     low=0.0)
    steps: int = option(2000, "Training batches of episodes.", low=1)
    batch_size: int = option(32, "Episodes per batch.", low=1)
    learning_rate: float = option(1e-3, "Adam learning rate.", low=0.0, low_open=True)
    eval_every: int = option(500, "Evaluate on test episodes every this many steps.", low=1)
    # Budgets in digits (0: use steps / eval_every): the same data for every k,
    # steps = digits // (batch_size * k * k).
    digits: int = option(0, "If > 0: train on this many digits (replaces --steps: steps = "
                         "digits // (batch_size * k * k), the same data for every k).", low=0)
    eval_digits: int = option(0, "If > 0: evaluate every this many training digits (replaces "
                              "--eval_every).", low=0)
    dataset: str = option("mnist", "Image dataset.", choices=("mnist", "fashion_mnist", "digits"))
    data_dir: Optional[str] = option(None, "Directory with mnist/; default $DNI_TF_DATA_DIR.")
    seed: int = option(0, "Seed.", low=0)

    def validate(self) -> None:
        """Raises UsageError / ValueError naming the flag and the allowed values."""
        check_fields(self)
        per_batch = self.batch_size * self.episode_length
        for name in ("digits", "eval_digits"):
            value = getattr(self, name)
            if value != 0 and value < per_batch:
                raise ValueError(f"{name}: must be 0 (off) or >= {per_batch} (one batch of "
                                 f"--batch_size episodes of k*k digits), got {value}")
        self.check_fast_path()

    def fast_path_periods(self):
        return evaluation_periods(self.train_steps, self.eval_steps)

    @property
    def train_steps(self) -> int:
        """Batches of episodes to train: `digits` converted, else `steps`."""
        return self.digits // (self.batch_size * self.episode_length) if self.digits else self.steps

    @property
    def eval_steps(self) -> int:
        """Batches between evaluations: `eval_digits` converted, else `eval_every`."""
        return (self.eval_digits // (self.batch_size * self.episode_length) if self.eval_digits
                else self.eval_every)

    @property
    def episode_length(self) -> int:
        return self.tick_ratio * self.tick_ratio


def check_batch_size(cfg: MultiNetworkConfig, images) -> None:
    """UsageError unless the train and test splits each fill one batch of episodes.

    An episode is `cfg.episode_length` consecutive digits; incomplete episodes
    and batches are dropped.
    """
    episode_length = cfg.episode_length
    count = min(len(images.train[1]), len(images.test[1]))
    cli.check_batch_size(
        cfg.batch_size, count // episode_length,
        f"episodes per batch: {images.name} has {len(images.train[1])} train and "
        f"{len(images.test[1])} test digits, {episode_length} per episode "
        f"(--tick_ratio squared)")


def build_model(cfg: MultiNetworkConfig, image_shape) -> MultiNetwork:
    keras.utils.set_random_seed(cfg.seed)
    cfg.apply_mixed_precision()
    model = MultiNetwork(cfg.tick_ratio, cfg.method, cfg.hidden_a, cfg.hidden_b,
                         cfg.message_size, sg_context=cfg.sg_context,
                         sg_learning_rate=cfg.sg_learning_rate or None, seed=cfg.seed)
    model.build((None, cfg.episode_length) + tuple(image_shape))
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                  **cfg.resolve(model).compile_kwargs())
    return model


def run_multi_network(cfg: MultiNetworkConfig, workdir: str, extra_config: Optional[dict] = None,
                      images=None) -> dict:
    """Trains one system; `images` (an ImageData) may be passed to skip loading."""
    cfg.validate()
    images = images or data_lib.load_image_data(cfg.dataset, cfg.data_dir)
    check_batch_size(cfg, images)
    model = build_model(cfg, images.image_shape)
    train = episode_dataset(*images.train, cfg.tick_ratio, cfg.batch_size, shuffle=True,
                            seed=cfg.seed)
    test = episode_dataset(*images.test, cfg.tick_ratio, cfg.batch_size, shuffle=False,
                           repeat=False)
    last = train_and_evaluate(model, train, test, steps=cfg.train_steps, eval_every=cfg.eval_steps,
                              workdir=workdir,
                              label=f"multi-network {cfg.method} k={cfg.tick_ratio}",
                              settings=dataclasses.asdict(cfg)).final
    metrics = {k: v for k, v in last.items() if k != "step"}
    metrics["steps"] = cfg.train_steps
    metrics["digits_seen"] = cfg.train_steps * cfg.batch_size * cfg.episode_length
    metrics["a_updates"] = int(model.optimizer.iterations.numpy())
    metrics["b_updates"] = int((model.b_optimizer or model.optimizer).iterations.numpy())
    results.save_results(workdir, {**dataclasses.asdict(cfg), **(extra_config or {})}, metrics,
                         study=STUDY)
    return metrics


def run_comparison(cfg: MultiNetworkConfig, workdir: str, methods: Sequence[str],
                   tick_ratios: Sequence[int], extra_config: Optional[dict] = None) -> pd.DataFrame:
    """Both methods for each k; finished runs are read back (rerun resumes)."""
    if len(set(methods)) != len(methods) or len({int(k) for k in tick_ratios}) != len(tick_ratios):
        raise ValueError(f"methods {list(methods)} and tick ratios {list(tick_ratios)} must "
                         "each be distinct: two cells would share one run folder")
    cells = [(k, method) for k in tick_ratios for method in methods]
    # Every cell's settings (and the batch size against the data) are checked
    # before the first cell trains.
    configs = {cell: dataclasses.replace(cfg, method=cell[1], tick_ratio=int(cell[0]))
               for cell in cells}
    for run_cfg in configs.values():
        run_cfg.validate()
    def finished(cell):  # raises when the cell's folder holds a run with other settings
        return results.completed_metrics(os.path.join(workdir, f"{cell[1]}_k{cell[0]}"),
                                         dataclasses.asdict(configs[cell]))

    pending = [cell for cell in cells if finished(cell) is None]
    images = data_lib.load_image_data(cfg.dataset, cfg.data_dir) if pending else None
    for cell in pending:
        check_batch_size(configs[cell], images)
    rows, runs = [], []
    for k, method in SweepProgress(cells, lambda cell: f"{cell[1]} k={cell[0]}"):
        subdir = os.path.join(workdir, f"{method}_k{k}")
        metrics = finished((k, method))
        if metrics is None:
            images = images or data_lib.load_image_data(cfg.dataset, cfg.data_dir)
            metrics = run_multi_network(configs[k, method], subdir, extra_config, images)
        rows.append({"method": method, "tick_ratio": int(k),
                     "test_a_accuracy": metrics["test_a_accuracy"],
                     "test_b_accuracy": metrics["test_b_accuracy"],
                     "test_b_final_accuracy": metrics["test_b_final_accuracy"]})
        runs.append((subdir, {"method": method, "tick_ratio": int(k)}, metrics,
                     results.load_history(subdir)))
    tensorboard_views.log_sweep(workdir, runs)
    table = pd.DataFrame(rows)
    results.write_csv(os.path.join(workdir, "table.csv"), table)
    lines = ["| method | k | A odd/even accuracy (test) | B count-of-3s accuracy, all ticks "
             "(test) | B at the last tick (test) |", "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.tick_ratio} | {r.test_a_accuracy:.4f} | {r.test_b_accuracy:.4f} "
              f"| {r.test_b_final_accuracy:.4f} |" for r in table.itertuples()]
    results.atomic_write_text(os.path.join(workdir, "table.md"), "\n".join(lines) + "\n")
    import seaborn as sns
    long = table.melt(id_vars=["method", "tick_ratio"], var_name="network", value_name="accuracy")
    with plots.numbers_as_categories():
        grid = sns.catplot(data=long, x="tick_ratio", y="accuracy", hue="method",
                           col="network", kind="bar", height=3.2, aspect=1.2)
    plots.save_figure(grid.figure, os.path.join(workdir, "table.png"))
    return table
