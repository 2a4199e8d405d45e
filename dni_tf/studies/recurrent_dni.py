"""Recurrent DNI studies (section 3.2): Copy / Repeat Copy and PTB characters.

`run_copy_task(config, workdir)` trains one `TruncatedBPTT` model under the
length curriculum and writes results.json (`max_length_solved`, ...),
history.csv (with the curriculum position), TensorBoard and checkpoints.
`run_language_model(config, workdir)` trains a stateful model on contiguous PTB
character streams, keeps the weights with the best validation BPC (early
stopping), and reports validation and test BPC of those weights.
`run_table(run_fn, config, workdir, methods, truncations)` runs method x T, each
in `workdir/<method>_T<T>/` (resumable), and writes `table.csv` (long form),
`table.md` (methods x T, the paper's layout) and `table.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Optional, Sequence

import keras
import pandas as pd
import tensorflow as tf
from absl import logging

from dni_tf.harness import cli, plots, results, tensorboard_views
from dni_tf.data import sequence_tasks, text
from dni_tf.truncated_bptt import (METHODS, UPDATES, ResetEvalState, TruncatedBPTT,
                                   pooled_update_scores)
from dni_tf.harness.fast_path import FastPathOptions, evaluation_periods
from dni_tf.harness.config import check_fields, option
from dni_tf.harness.training import SweepProgress, train_and_evaluate

# Two studies live here; each writes its name into results.json.
COPY_STUDY, LANGUAGE_STUDY = "copy_task", "language_model"
_PAPER = ("Jaderberg et al. 2016, *Decoupled Neural Interfaces using Synthetic Gradients*, "
          "arXiv 1608.05343, section 3.2")
COPY_PUBLISHED = results.Published(
    title="Recurrent DNI: Copy and Repeat Copy", source=_PAPER,
    claims=("DNI lets an RNN with a short truncation window T solve much longer Copy / "
            "Repeat Copy sequences than BPTT with the same T (longest length solved under "
            "a curriculum).",),
    setup={"sg_scale": 0.1})
LANGUAGE_PUBLISHED = results.Published(
    title="Recurrent DNI: Penn Treebank characters", source=_PAPER,
    claims=("DNI improves test bits per character over BPTT at equal T (early stopping on "
            "validation).",),
    setup={"sg_scale": 0.1})
# "stream": one stream of episodes per batch row with the core state carried from
# episode to episode (a stateful model), windows restarting at every episode and
# the bootstrap cut at its end; "continuous": the same stream cut into windows of
# T steps wherever episodes end (the paper's infinitely unrolled RNN, section 2.2),
# bootstrapping across episodes; "reset": every episode starts from a zero state.
EPISODES = ("stream", "continuous", "reset")
# Copy / Repeat Copy batches are generated in memory, every sequence up to
# 2 * max_length + 1 (Copy) or max_length * (max_repeats + 1) + 2 (Repeat
# Copy) steps long, and truncated BPTT keeps the core's activations for every
# step of a window: more sequences per batch than this only exhausts memory.
MAX_GENERATED_BATCH = 4096


def _optimizer(cfg):
    # Clipping happens in the model (core and synthetic gradient module apart).
    return keras.optimizers.Adam(cfg.learning_rate)


@dataclasses.dataclass
class SyntheticGradientOptions:
    """The settings of the synthetic gradients, shared by the Copy and PTB studies."""

    sg_scale: float = option(0.1, "Scale of synthetic gradients entering the core (0: M is "
                             "trained but nothing enters the core, an ablation).", low=0.0)
    # A discount in an endless stream (PTB, Copy's default continuous stream): with the
    # undiscounted target (1) the module regresses onto the sum of all future gradients,
    # finite only if the windows' Jacobians contract; it diverged on PTB at T=2 within 250
    # updates and on the Copy stream at once (docs/recurrent_dni.md). 1 is usable where
    # every episode's end cuts the bootstrap (Copy with --episodes=stream or reset).
    bootstrap_scale: float = option(0.1, "Scale of the next synthetic gradient inside the "
                                    "module's regression target: a discount on credit from "
                                    "later windows (1 = undiscounted: diverged in endless "
                                    "streams; usable with Copy's --episodes=stream or reset).",
                                    low=0.0)
    aux_weight: float = option(1.0, "Weight of the dni_aux auxiliary loss.", low=0.0)
    clip_norm: float = option(1.0, "Gradient-norm clip, applied to the core and the synthetic "
                              "gradient module separately (0 = none).", low=0.0)
    # M's own learning rate. At the core's rate (1) Adam moves M's output far past its
    # targets, and where the state is carried (Copy's episode stream, PTB) the
    # synthetic gradients drive the cell state up without bound: dni collapsed on Copy
    # at T=2 and diverged on PTB at T=5. At 0.01 both trained, and Copy at T=3 solved
    # as much as at 1 (docs/recurrent_dni.md, "The module's learning rate in a
    # carried stream").
    sg_lr_scale: float = option(0.01, "The synthetic-gradient module's learning rate "
                                "relative to the core's (1 ran away in carried streams).",
                                low=0.0, low_open=True)


# --------------------------------------------------------------- Copy tasks
@dataclasses.dataclass
class CopyTaskConfig(SyntheticGradientOptions, FastPathOptions):
    """One Copy / Repeat Copy run; defaults are a small CPU budget."""

    task: str = option("copy", "Task.", choices=sequence_tasks.TASKS)
    method: str = option("bptt", "Training method; several (or several --truncation) = the "
                         "method x T table.", choices=METHODS, grid=True)
    truncation: int = option(3, "Truncation window T (time steps); several = the table.",
                             low=1, grid=True)
    hidden_size: int = option(64, "LSTM units.", low=1)
    steps: int = option(3000, "Training batches.", low=1)
    batch_size: int = option(32, "Sequences per batch.", low=1)
    learning_rate: float = option(3e-3, "Adam learning rate.", low=0.0, low_open=True)
    num_bits: int = option(8, "Bits per vector.", low=1)
    min_length: int = option(1, "First curriculum length.", low=1)
    max_length: int = option(100, "Longest curriculum length.", low=1)
    max_repeats: int = option(3, "Repeat Copy: the repeats curriculum's cap.", low=1)
    threshold: float = option(0.15, "Solved when mean bit errors per sequence < this.",
                              low=0.0, low_open=True)
    check_every: int = option(50, "Curriculum check period (batches).", low=1)
    eval_every: int = option(500, "Evaluate every this many steps.", low=1)
    eval_batches: int = option(4, "Held-out batches per evaluation.", low=1)
    update: str = option("per_window", "per_window (an optimizer step every T steps) or "
                         "per_batch (windows' gradients summed, one step per batch).",
                         choices=UPDATES)
    episodes: str = option("continuous", "continuous (one stream of episodes, state carried, "
                           "cut every T steps wherever episodes end: the paper's unrolled "
                           "RNN), stream (the same, but windows restart at every episode and "
                           "its end cuts the bootstrap) or reset (every episode from a zero "
                           "state).", choices=EPISODES)
    sampling: str = option("uniform", "uniform (each batch's length, and repeats, drawn up to "
                           "the curriculum's) or current (always the curriculum's).",
                           choices=sequence_tasks.SAMPLINGS)
    diagnostics: bool = option(False, "Log per-window cosine and norm ratio of the synthetic "
                               "gradient vs full BPTT's future gradient, at the state and in "
                               "the core's weights (dni, dni_aux).")
    seed: int = option(0, "Seed for initialisation and data.", low=0)

    def validate(self) -> None:
        """Raises UsageError / ValueError naming the flag and the allowed values."""
        check_fields(self)
        if self.max_length < self.min_length:
            raise ValueError(f"max_length: must be >= min_length ({self.min_length}), "
                             f"got {self.max_length}")
        if self.diagnostics and self.method == "bptt":
            raise ValueError("diagnostics: needs --method=dni or dni_aux (bptt has no "
                             "synthetic gradients to compare)")
        if self.batch_size > MAX_GENERATED_BATCH:
            steps = (2 * self.max_length + 1 if self.task == "copy"
                     else self.max_length * (self.max_repeats + 1) + 2)
            raise ValueError(
                f"batch_size={self.batch_size} is out of range: allowed [1, "
                f"{MAX_GENERATED_BATCH}] (each batch of {self.task} sequences is generated in "
                f"memory, up to {steps} steps per sequence at --max_length={self.max_length})")
        self.check_fast_path()

    def jit_unsupported(self):
        return "the curriculum changes the sequence length from batch to batch"

    def steps_per_execution_unsupported(self):
        return ("each batch is built from the curriculum after the previous step, at its own "
                "sequence length")


def build_copy_model(cfg: CopyTaskConfig):
    """(model, curriculum): a compiled TruncatedBPTT holding its curriculum."""
    keras.utils.set_random_seed(cfg.seed)
    cfg.apply_mixed_precision()
    curriculum = sequence_tasks.Curriculum(
        cfg.min_length, cfg.max_length, cfg.threshold, cfg.check_every,
        max_repeats=cfg.max_repeats if cfg.task == "repeat_copy" else 1, name="curriculum")
    in_dim, out_dim = sequence_tasks.task_channels(cfg.task, cfg.num_bits)
    carried = cfg.episodes != "reset"
    continuous = cfg.episodes == "continuous"
    model = TruncatedBPTT(out_dim, cfg.truncation, method=cfg.method,
                          hidden_size=cfg.hidden_size, loss_type="bernoulli",
                          sg_scale=cfg.sg_scale, bootstrap_scale=cfg.bootstrap_scale,
                          update=cfg.update, aux_weight=cfg.aux_weight, stateful=carried,
                          batch_size=cfg.batch_size if carried else None,
                          episodic=not continuous, continuous=continuous,
                          curriculum=curriculum, clip_norm=cfg.clip_norm,
                          sg_lr_scale=cfg.sg_lr_scale, seed=cfg.seed)
    model.build((None, None, in_dim))
    model.compile(optimizer=_optimizer(cfg), **cfg.resolve(model).compile_kwargs())
    return model, curriculum


def run_copy_task(cfg: CopyTaskConfig, workdir: str, extra_config: Optional[dict] = None) -> dict:
    """Trains one run under the curriculum; returns its final metrics."""
    cfg.validate()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if cfg.episodes != "reset" and replicas > 1:
        raise cli.UsageError(f"--episodes={cfg.episodes} carries the state of every batch "
                             f"row, which {replicas} replicas cannot split: use --episodes=reset "
                             f"--update=per_batch, or --distribution=none")
    if cfg.update == "per_window" and replicas > 1:
        # Per-window updates under several replicas unroll the window loop, which
        # needs static lengths; the curriculum changes them.
        raise cli.UsageError("--update=per_window with several replicas needs a static "
                             "sequence length, which the curriculum does not give: use "
                             "--update=per_batch or --distribution=none")
    model, curriculum = build_copy_model(cfg)
    kwargs = dict(num_bits=cfg.num_bits, max_repeats=cfg.max_repeats)
    train = sequence_tasks.task_dataset(cfg.task, cfg.batch_size, curriculum, seed=cfg.seed,
                                        sampling=cfg.sampling, **kwargs)
    # Evaluated at the curriculum's level itself (not below it).
    evaluation = sequence_tasks.task_dataset(cfg.task, cfg.batch_size, curriculum,
                                             seed=cfg.seed + 1_000_003,
                                             num_batches=cfg.eval_batches, **kwargs)
    diagnostics = (SyntheticGradientDiagnostics(cfg, curriculum, workdir)
                   if cfg.diagnostics else None)

    def curriculum_metrics(m):
        row = {"curriculum_length": int(curriculum.length.value),
               "max_length_solved": int(curriculum.max_solved.value)}
        if cfg.task == "repeat_copy":
            row.update(curriculum_repeats=int(curriculum.repeats.value),
                       max_repeats_solved=int(curriculum.max_repeats_solved.value))
        if diagnostics is not None:
            row.update(diagnostics(m))
        return row

    last = train_and_evaluate(model, train, evaluation, steps=cfg.steps,
                              eval_every=cfg.eval_every, workdir=workdir,
                              extra_metrics=curriculum_metrics,
                              callbacks=[ResetEvalState()] if model.stateful else [],
                              label=f"{cfg.task} {cfg.method} T={cfg.truncation}",
                              settings=dataclasses.asdict(cfg)).final
    metrics = {**{k: v for k, v in last.items() if k != "step"}, "steps": cfg.steps,
               "max_length_solved": int(curriculum.max_solved.value),
               "curriculum_length": int(curriculum.length.value)}
    if cfg.task == "repeat_copy":
        metrics["max_repeats_solved"] = int(curriculum.max_repeats_solved.value)
    config = {**dataclasses.asdict(cfg), **(extra_config or {})}
    results.save_results(workdir, config, metrics, study=COPY_STUDY)
    return metrics


def level_batch(cfg: CopyTaskConfig, curriculum, seed):
    """One `(x, y, mask)` batch of `cfg.task` at the curriculum's current level (L, and R
    for Repeat Copy), from the stateless `seed` [2] int64; for diagnostics and analyses."""
    length = int(curriculum.length.value)
    if cfg.task == "copy":
        return sequence_tasks.copy_batch(seed, cfg.batch_size, length, cfg.num_bits)
    return sequence_tasks.repeat_copy_batch(seed, cfg.batch_size, length,
                                            int(curriculum.repeats.value), cfg.num_bits,
                                            cfg.max_repeats)


def stream_segment(cfg: CopyTaskConfig, curriculum, seed, prefix=None, episodes: int = 4):
    """A stretch of the continuous stream (`--episodes=continuous`), cut where training cuts.

    `episodes` level episodes (`level_batch`, seeds `[seed[0], seed[1] * episodes + i]`)
    end to end after `prefix` (steps the stream holds over: the model's pending steps, or
    the previous segment's leftover), cut after the last whole window of T steps, so
    every window of the segment is one of training's windows and its first state is a
    window end. Returns `((x, y, mask), leftover)`; the leftover (fewer than T steps) is
    the next segment's prefix.
    """
    seed = tf.convert_to_tensor(seed, tf.int64)
    parts = [level_batch(cfg, curriculum, tf.stack([seed[0], seed[1] * episodes + i]))
             for i in range(episodes)]
    if prefix is not None:
        parts.insert(0, prefix)
    stream = [tf.concat([tf.cast(p[j], tf.float32) for p in parts], axis=1) for j in range(3)]
    whole = stream[0].shape[1] // cfg.truncation * cfg.truncation
    return tuple(v[:, :whole] for v in stream), tuple(v[:, whole:] for v in stream)


def diagnostic_batch(cfg: CopyTaskConfig, curriculum, model: TruncatedBPTT, seed):
    """`((x, y, mask), state, leftover)`: where to score M, as it is trained.

    Episodic settings: one level batch from the training state (None with
    `--episodes=reset`: zeros); leftover None. Continuous stream: the model's pending
    steps, then four episodes, cut at training's window ends (`stream_segment`), from
    the training state (the state at the last window end); leftover: the steps cut
    off, for a caller that streams on.
    """
    state = model.train_state.value if model.stateful else None
    if not model.continuous:
        return level_batch(cfg, curriculum, seed), state, None
    p = int(model.pending_steps.numpy())
    pending = (model.pending_x[:, :p], model.pending_y[:, :p], model.pending_mask[:, :p])
    segment, leftover = stream_segment(cfg, curriculum, seed, prefix=pending)
    return segment, state, leftover


class SyntheticGradientDiagnostics:
    """`--diagnostics`: synthetic gradient vs the true future gradient, per window.

    At every evaluation, a fixed-seed batch at the curriculum's current level
    (`diagnostic_batch`: one episode, or in the continuous stream the pending
    steps and four episodes cut where training cuts its windows) is run from the
    state training has carried to that point (the stream's states, which are what
    M is trained on; a zero state with `--episodes=reset`); for every window end,
    the cosine and the norm ratio ||M(s)|| / ||true|| between M's prediction and
    the gradient of the later windows' losses from full BPTT over the same sequence
    (`TruncatedBPTT.synthetic_gradient_quality`) go to TensorBoard
    (`sg_quality/cosine_window_<k>`, `sg_quality/norm_ratio_window_<k>`, in
    `<workdir>/sg_quality`); so does the cosine between the weight changes the two
    make through their window (`sg_quality/update_cosine_window_<k>`, summed over
    the batch, where per-example noise cancels: M can lean away from full BPTT
    there while the state-space cosine reads zero). History columns: the means
    over windows (and window 0's, the furthest from the end), and the weight-space
    cosine and norm ratio pooled over windows (`pooled_update_scores`).
    """

    def __init__(self, cfg: CopyTaskConfig, curriculum, workdir: str):
        self.cfg = cfg
        self.curriculum = curriculum
        self.workdir = workdir
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "sg_quality"))

    def __call__(self, model) -> dict:
        cfg = self.cfg
        # In the stream M only ever sees carried states (and, in the continuous stream,
        # windows cut at any offset of an episode): measuring it from a zero state or on
        # windows aligned with episodes would judge it off the distribution it learns on.
        (x, y, mask), state, _ = diagnostic_batch(
            cfg, self.curriculum, model, tf.constant([cfg.seed + 2_000_003, 0], tf.int64))
        quality = model.synthetic_gradient_quality(x, y, mask, state=state, weight_space=True)
        cosine, ratio = quality["cosine"].numpy(), quality["norm_ratio"].numpy()
        update_cosine = quality["update_cosine"].numpy()
        done = len(results.load_history(self.workdir)) if os.path.exists(
            os.path.join(self.workdir, results.HISTORY_FILE)) else 0
        step = min((done + 1) * cfg.eval_every, cfg.steps)
        with self.writer.as_default(step=step):
            for k, (c, r, u) in enumerate(zip(cosine, ratio, update_cosine)):
                tf.summary.scalar(f"sg_quality/cosine_window_{k}", float(c))
                tf.summary.scalar(f"sg_quality/norm_ratio_window_{k}", float(r))
                tf.summary.scalar(f"sg_quality/update_cosine_window_{k}", float(u))
        self.writer.flush()
        if not len(cosine):  # one window: nothing lies beyond it
            return {}
        pooled_cosine, pooled_ratio = pooled_update_scores(
            update_cosine, quality["update_norm"], quality["update_true_norm"])
        return {"sg_cosine_mean": float(cosine.mean()), "sg_norm_ratio_mean": float(ratio.mean()),
                "sg_cosine_window_0": float(cosine[0]), "sg_update_cosine": pooled_cosine,
                "sg_update_norm_ratio": pooled_ratio}


# --------------------------------------------------------- language model
@dataclasses.dataclass
class LanguageModelConfig(SyntheticGradientOptions, FastPathOptions):
    """One PTB character run: stateful core, `chunk_length` characters per row per step.

    Each training batch holds chunk_length / truncation windows, so runs with
    different T see the same characters and make the same number of updates.
    """

    # At 0.01 (Copy's default) dni ran away on PTB at T=5 in one seed of three (seed 1:
    # cell norm 6 million, test BPC 2.72); at 0.001 all three seeds trained, level with
    # bptt (docs/recurrent_dni.md, "PTB: the module's rate at three seeds").
    sg_lr_scale: float = option(0.001, "The synthetic-gradient module's learning rate "
                                "relative to the core's (0.01 ran away in one PTB seed of "
                                "three, 1 in every carried stream).", low=0.0, low_open=True)
    method: str = option("bptt", "Training method; several (or several --truncation) = the "
                         "method x T table.", choices=METHODS, grid=True)
    truncation: int = option(5, "Truncation window T (characters); several = the table.",
                             low=1, grid=True)
    hidden_size: int = option(128, "LSTM units.", low=1)
    steps: int = option(2000, "Training batches.", low=1)
    batch_size: int = option(32, "Contiguous streams per batch.", low=1)
    chunk_length: int = option(40, "Characters per row per training batch, a multiple of "
                               "--truncation: chunk_length / T windows per batch.", low=1)
    learning_rate: float = option(3e-3, "Adam learning rate.", low=0.0, low_open=True)
    eval_every: int = option(250, "Validate every this many steps.", low=1)
    eval_length: int = option(200, "Characters per row per evaluation batch.", low=1)
    eval_batches: int = option(0, "Validation batches used during training (0 = all); the "
                               "final validation and test BPC always use the whole split.",
                               low=0)
    patience: int = option(0, "Stop after this many evaluations without a better validation "
                           "BPC (0 = never stop early).", low=0)
    update: str = option("per_window", "per_window (an optimizer step every T characters) or "
                         "per_batch (windows' gradients summed, one step per batch).",
                         choices=UPDATES)
    data_dir: Optional[str] = option(None, "Directory with ptb/ptb.char.*.txt; default "
                                     "$DNI_TF_DATA_DIR.")
    seed: int = option(0, "Seed for initialisation.", low=0)

    def validate(self) -> None:
        """Raises UsageError / ValueError naming the flag and the allowed values."""
        check_fields(self)
        if self.chunk_length % self.truncation:
            raise ValueError(f"chunk_length: must be a multiple of truncation ({self.truncation}), "
                             f"got {self.chunk_length}")
        self.check_fast_path()

    def fast_path_periods(self):
        return evaluation_periods(self.steps, self.eval_every)


def check_stream_sizes(cfg: LanguageModelConfig, corpus: text.CharCorpus) -> None:
    """UsageError unless every split fills at least one batch of `batch_size` rows.

    Each split is cut into `batch_size` contiguous rows; a training row needs
    `chunk_length` + 1 characters, a validation or test row `eval_length` + 1.
    """
    needs = {"train": ("chunk_length", cfg.chunk_length), "valid": ("eval_length", cfg.eval_length),
             "test": ("eval_length", cfg.eval_length)}
    sizes = {split: len(corpus.split(split)) for split in needs}
    for split, (flag, length) in needs.items():
        if (sizes[split] - 1) // length < 1:
            raise cli.UsageError(
                f"--{flag}={length} is out of range: the {split} split "
                f"({os.path.join(corpus.source, f'ptb.char.{split}.txt')}) holds "
                f"{sizes[split]} characters, too few for one row of {length} + 1")
    limit = min((sizes[split] - 1) // length for split, (_, length) in needs.items())
    cli.check_batch_size(
        cfg.batch_size, limit,
        f"each of the batch_size rows needs --chunk_length={cfg.chunk_length} + 1 training "
        f"and --eval_length={cfg.eval_length} + 1 validation/test characters; the splits "
        f"hold {sizes['train']} / {sizes['valid']} / {sizes['test']}")


def build_language_model(cfg: LanguageModelConfig, vocab_size: int) -> TruncatedBPTT:
    keras.utils.set_random_seed(cfg.seed)
    cfg.apply_mixed_precision()
    model = TruncatedBPTT(vocab_size, cfg.truncation, method=cfg.method,
                          hidden_size=cfg.hidden_size, loss_type="categorical",
                          vocab_size=vocab_size, sg_scale=cfg.sg_scale,
                          bootstrap_scale=cfg.bootstrap_scale, update=cfg.update,
                          aux_weight=cfg.aux_weight, stateful=True, batch_size=cfg.batch_size,
                          clip_norm=cfg.clip_norm, sg_lr_scale=cfg.sg_lr_scale, seed=cfg.seed)
    model.build()
    model.compile(optimizer=_optimizer(cfg), **cfg.resolve(model).compile_kwargs())
    return model


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights with the lowest validation BPC; stops after `patience` worse evals.

    The best value survives a resume through `best.json` beside the weights.
    """

    def __init__(self, workdir: str, patience: int = 0, key: str = "val_bpc"):
        super().__init__()
        self.path = os.path.join(workdir, "best.weights.h5")
        self.info_path = os.path.join(workdir, "best.json")
        self.patience = patience
        self.key = key

    def _info(self):
        if os.path.exists(self.info_path):
            with open(self.info_path) as f:
                return json.load(f)
        return {"best": math.inf, "epoch": -1}

    def on_epoch_end(self, epoch, logs=None):
        value = float((logs or {}).get(self.key, math.inf))
        info = self._info()
        if value < info["best"]:
            tmp = self.path + ".tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, self.path)
            results.write_json(self.info_path, {"best": value, "epoch": epoch})
        elif self.patience and epoch - info["epoch"] >= self.patience:
            logging.info("early stopping: %s has not improved for %d evaluations",
                         self.key, self.patience)
            self.model.stop_training = True


def evaluate_bpc(model: TruncatedBPTT, dataset) -> float:
    """BPC of a stateful model over a whole stream, from a zero state."""
    model.reset_eval_state()
    return float(model.evaluate(dataset, verbose=0, return_dict=True)["bpc"])


def run_language_model(cfg: LanguageModelConfig, workdir: str,
                       extra_config: Optional[dict] = None) -> dict:
    """Trains on PTB characters; returns best validation BPC and its test BPC."""
    cfg.validate()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        raise cli.UsageError(f"PTB trains one stateful stream per batch row, which {replicas} "
                             f"replicas cannot split: use --distribution=none")
    corpus = text.load_ptb_chars(cfg.data_dir)
    check_stream_sizes(cfg, corpus)  # before any training
    model = build_language_model(cfg, corpus.vocab_size)
    train = text.stream_dataset(corpus.train, cfg.batch_size, cfg.chunk_length, repeat=True)
    max_batches = cfg.eval_batches or None
    valid = text.stream_dataset(corpus.valid, cfg.batch_size, cfg.eval_length,
                                max_batches=max_batches)
    best = BestWeights(workdir, cfg.patience)
    last = train_and_evaluate(model, train, valid, steps=cfg.steps, eval_every=cfg.eval_every,
                              workdir=workdir, eval_prefix="val",
                              callbacks=[ResetEvalState(), best],
                              label=f"ptb {cfg.method} T={cfg.truncation}",
                              settings=dataclasses.asdict(cfg)).final
    if os.path.exists(best.path):
        model.load_weights(best.path)
    valid_full = text.stream_dataset(corpus.valid, cfg.batch_size, cfg.eval_length)
    test = text.stream_dataset(corpus.test, cfg.batch_size, cfg.eval_length)
    metrics = {"val_bpc": evaluate_bpc(model, valid_full), "test_bpc": evaluate_bpc(model, test),
               "best_step": min((best._info()["epoch"] + 1) * cfg.eval_every, cfg.steps),
               "train_bpc": last.get("train_bpc"), "steps": cfg.steps,
               "characters_trained": cfg.steps * cfg.batch_size * cfg.chunk_length}
    metrics["bpc"] = metrics["test_bpc"]
    config = {**dataclasses.asdict(cfg), **(extra_config or {})}
    results.save_results(workdir, config, metrics, study=LANGUAGE_STUDY)
    return metrics


# ------------------------------------------------------------------ tables
def run_cell(run_fn: Callable, cfg, workdir: str, extra_config: Optional[dict] = None) -> dict:
    """`run_fn(cfg, workdir, extra_config)`, or the metrics of the finished run there.

    A run finished with `cfg` is read back, not trained again: its checkpoints
    may be gone (a fresh machine restores only the records, scripts/archive_runs.py
    --restore). One finished with a smaller `steps` is trained on (from step 0,
    with a warning, where its checkpoints are gone), and one with other settings
    is a usage error (`results.completed_metrics`).
    """
    metrics = results.completed_metrics(workdir, dataclasses.asdict(cfg))
    if metrics is not None:
        logging.info("%s: finished with these settings, read back from results.json "
                     "(raise --steps to train on)", workdir)
        return metrics
    return run_fn(cfg, workdir, extra_config)


def run_grid(run_fn: Callable, cfg, workdir: str, grid: dict, value: str,
             extra_config: Optional[dict] = None, **table_options) -> None:
    """An entry point's run: one cell directly in `workdir` (`run_cell`) when `grid`
    (`config.grid_from_flags`) holds one method and one T, else their table
    (`run_table(..., value, **table_options)`, a folder per cell)."""
    if len(grid["method"]) * len(grid["truncation"]) > 1:
        run_table(run_fn, cfg, workdir, grid["method"], grid["truncation"], value,
                  extra_config=extra_config, **table_options)
    else:
        run_cell(run_fn, cfg, workdir, extra_config)


def run_table(run_fn: Callable, cfg, workdir: str, methods: Sequence[str],
              truncations: Sequence[int], value: str, extra_config: Optional[dict] = None,
              lower_is_better: bool = False, curve: Optional[str] = None) -> pd.DataFrame:
    """Runs `run_fn(config, subdir)` for each method x T; writes the combined table.

    Finished runs (results.json present with status completed) are read back,
    not rerun, so rerunning the command resumes the table; a finished run with a
    smaller `steps` is trained on to the new budget, and one with other settings
    is an error (`results.completed_metrics`). The table also shows the other
    finished `<method>_T<T>` cells in `workdir` made with the same settings (a
    table built one T at a time stays whole); cells made with other settings,
    the budget included, are left out of it. With `curve` (a
    history column), also writes the combined `history.csv` (method and T
    columns added) and `curves.png` (that column against step, a panel per T).
    """
    if len(set(methods)) != len(methods) or len({int(t) for t in truncations}) != len(truncations):
        raise ValueError(f"methods {list(methods)} and truncations {list(truncations)} must "
                         "each be distinct: two cells would share one run folder")
    done = []  # (method, T, run folder, metrics) of every cell the table shows
    cells = [(method, int(t)) for method in methods for t in truncations]
    for method, t in SweepProgress(cells, lambda cell: f"{cell[0]} T={cell[1]}"):
        run_cfg = dataclasses.replace(cfg, method=method, truncation=t)
        subdir = os.path.join(workdir, f"{method}_T{t}")
        done.append((method, t, subdir, run_cell(run_fn, run_cfg, subdir, extra_config)))
    done += _other_finished_cells(cfg, workdir, set(cells))
    runs = [(subdir, {"method": method, "T": t}, metrics, results.load_history(subdir))
            for method, t, subdir, metrics in done]
    tensorboard_views.log_sweep(workdir, runs)
    table = pd.DataFrame([{**cell, value: metrics[value]} for _, cell, metrics, _ in runs])
    write_table(table, workdir, value, lower_is_better)
    if curve:
        combined = pd.concat([history.assign(**cell) for _, cell, _, history in runs],
                             ignore_index=True)
        results.write_csv(os.path.join(workdir, "history.csv"), combined)
        if curve in combined:
            plots.learning_curves(combined, "step", "method", os.path.join(workdir, "curves.png"),
                                  y=curve, col="T")
    return table


def _other_finished_cells(cfg, workdir: str, asked):
    """(method, T, run folder, metrics) of the finished cells in `workdir` beyond `asked`,
    made with `cfg`."""
    for method in METHODS:
        prefix = f"{method}_T"
        for name in sorted(os.listdir(workdir)):
            digits = name[len(prefix):]
            if not (name.startswith(prefix) and digits.isdigit()
                    and os.path.isdir(os.path.join(workdir, name))):
                continue
            t = int(digits)
            if (method, t) in asked:
                continue
            run_cfg = dataclasses.replace(cfg, method=method, truncation=t)
            subdir = os.path.join(workdir, name)
            try:
                metrics = results.completed_metrics(subdir, dataclasses.asdict(run_cfg))
            except cli.UsageError:
                continue  # made with other settings: another table's cell
            if metrics is not None:
                yield method, t, subdir, metrics


def write_table(table: pd.DataFrame, workdir: str, value: str, lower_is_better: bool) -> None:
    """table.csv (long), table.md (methods x T) and table.png."""
    results.write_csv(os.path.join(workdir, "table.csv"), table)
    wide = table.pivot(index="method", columns="T", values=value)
    order = [m for m in METHODS if m in wide.index]
    wide = wide.loc[order]
    header = "| method | " + " | ".join(f"T={t}" for t in wide.columns) + " |"
    lines = [header, "|" + "---|" * (len(wide.columns) + 1)]
    for method, row in wide.iterrows():
        cells = ["-" if pd.isna(v) else f"{v:.3f}" if not float(v).is_integer() else f"{v:g}"
                 for v in row.values]  # "-": a cell not (yet) in the table
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    note = "lower is better" if lower_is_better else "higher is better"
    results.atomic_write_text(os.path.join(workdir, "table.md"),
                              f"{value} ({note})\n\n" + "\n".join(lines) + "\n")
    import seaborn as sns  # plotting only
    frame = table.copy()
    frame["T"] = frame["T"].astype(str)
    with plots.numbers_as_categories():
        grid = sns.catplot(data=frame, x="T", y=value, hue="method", kind="bar", height=3.5,
                           aspect=1.4, hue_order=order)
    grid.set_axis_labels("truncation T", value.replace("_", " "))
    plots.save_figure(grid.figure, os.path.join(workdir, "table.png"))
