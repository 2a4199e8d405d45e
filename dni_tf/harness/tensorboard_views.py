"""TensorBoard views beyond plain scalars: custom-scalar layouts and hparams.

* `write_scalar_layout(tags, model)`: a Custom Scalars layout for one run,
  written into the default summary writer. Scalars are grouped in a category
  per study (loss, accuracy and each of the algorithm's own diagnostics, one
  chart per metric and split: `accuracy, train` next to `accuracy, test`, as
  TensorBoard colours curves by run, not by tag) and, for metrics
  logged per decoupled layer (`train/sg_cosine_1`, `train/sg_loss_2`, ...), in
  a category per layer, plus one chart per metric comparing the layers.
  `dni_tf.harness.callbacks.EvaluationLogger` calls it once per `fit()`, after the
  first evaluation, when the run's tags are known. TensorBoard merges the
  layouts of every run under `--logdir`, skipping duplicate charts.
* `log_sweep(sweep_root, runs)`: the HParams plugin's view of a sweep: each
  run's hyper-parameter values and final metrics, and the experiment (every
  hyper-parameter's values and the metrics). A final metric that is the last
  point of one of the run's curves (`test_accuracy` and `test/accuracy`,
  `kept_fraction` and `train/kept_fraction`) is shown through that curve, so it
  adds no chart; only metrics that exist only at the end of a run (e.g. pruned
  accuracies, a full-set evaluation) are logged as `final/<name>`. Run
  bookkeeping (`NOT_METRICS`: steps, wall time, ...) is left out. The studies'
  sweep functions call it after their runs; calling it again (a resumed sweep)
  replaces what it wrote before.

Layout: every run writes its event files directly into its run directory, so
`tensorboard --logdir SWEEP_ROOT` names each run by its configuration folder
(`keep_prob_0.5`) and nothing is written at the sweep root (the experiment
summary goes into the first run's folder). Runs written by earlier versions
into `RUN_DIR/tensorboard/` are moved up by `adopt_legacy_events`.

Tags follow `EvaluationLogger`: `train/<metric>` and `<eval prefix>/<metric>`.
"""

from __future__ import annotations

import glob
import math
import numbers
import os
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

# Study names shown as category titles, by the class of the trained model.
STUDY_TITLES = {
    "GradientDropping": "gradient dropping",
    "ThresholdUpdates": "threshold updates",
    "DNIClassifier": "feed-forward DNI",
    "TruncatedBPTT": "recurrent DNI",
    "MultiNetwork": "multi-network DNI",
}
# Per-layer metrics (name -> chart title); `k` is the decoupling point: the
# output of layer k.
LAYER_METRICS = {
    "sg_cosine": "cosine similarity, synthetic vs true gradient",
    "sg_norm_ratio": "norm ratio |synthetic| / |true gradient|",
    "sg_loss": "synthetic-gradient regression loss",
    "input_loss": "synthetic-input regression loss",
}
_LAYER_TAG = re.compile(r"^(?P<group>[^/]+)/(?P<metric>%s)_(?P<layer>\d+)$"
                        % "|".join(sorted(LAYER_METRICS, key=len, reverse=True)))
HPARAMS_SUFFIX = ".hparams"
EXPERIMENT_SUFFIX = ".hparams_experiment"
LEGACY_DIR = "tensorboard"  # where event files went before they went into the run folder
# Final values that describe the run rather than measure it (they stay in
# results.json); `test_error` is 1 - test accuracy, shown as test/accuracy.
NOT_METRICS = frozenset({"step", "steps", "best_step", "wall_seconds_this_call", "num_weights",
                         "characters_trained", "curriculum_length", "test_error"})


def column_tag(column: str) -> str:
    """The scalar tag of a history column: `train_loss` -> `train/loss`."""
    group, _, name = column.partition("_")
    return f"{group}/{name}"


def adopt_legacy_events(run_dir: str) -> None:
    """Moves event files from `run_dir/tensorboard/` (the old layout) into `run_dir`.

    A run resumed from, or a sweep re-logged over, a workdir written before the
    event files went into the run folder then shows as one run named by its
    configuration, with its earlier curves.
    """
    legacy = os.path.join(run_dir, LEGACY_DIR)
    paths = glob.glob(os.path.join(legacy, "events.out.tfevents.*"))
    for path in paths:
        if path.endswith((HPARAMS_SUFFIX, EXPERIMENT_SUFFIX)):
            os.remove(path)  # log_sweep writes these again
        else:
            os.replace(path, os.path.join(run_dir, os.path.basename(path)))
    if paths and not os.listdir(legacy):
        os.rmdir(legacy)


def study_title(model) -> str:
    """The category title for `model`: its study, else the model's name."""
    title = STUDY_TITLES.get(type(model).__name__)
    if title:
        return title
    if any(type(layer).__name__.startswith("Targeted") for layer in getattr(model, "layers", ())):
        return "targeted dropout"
    return getattr(model, "name", type(model).__name__)


def scalar_layout(tags: Iterable[str], study: str):
    """The `layout_pb2.Layout` for a run with these scalar tags (see module doc)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    study_charts: "OrderedDict[str, List[str]]" = OrderedDict()
    layer_charts: Dict[int, Dict[str, List[str]]] = {}
    for tag in tags:
        match = _LAYER_TAG.match(tag)
        if match:
            layer = int(match["layer"])
            layer_charts.setdefault(layer, {}).setdefault(match["metric"], []).append(tag)
            continue
        group, _, metric = tag.partition("/")
        # One chart per metric and split: runs are told apart by colour, so the
        # train and evaluation curves of one run would share a colour.
        study_charts.setdefault(f"{metric}, {group}" if metric else tag, []).append(tag)

    def chart(title, tag_list):
        regex = "|".join(f"^{re.escape(t)}$" for t in sorted(set(tag_list)))
        return layout_pb2.Chart(title=title,
                                multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    categories = [layout_pb2.Category(
        title=study, chart=[chart(f"{study}: {title}", t)
                            for title, t in sorted(study_charts.items())])]
    if layer_charts:
        # One chart per metric with every layer, then a category per layer.
        by_metric: "OrderedDict[str, List[str]]" = OrderedDict()
        for layer in sorted(layer_charts):
            for metric, t in layer_charts[layer].items():
                by_metric.setdefault(metric, []).extend(t)
        categories.append(layout_pb2.Category(
            title=f"{study}: every decoupled layer",
            chart=[chart(f"{study}: {LAYER_METRICS[m]}, every layer", t)
                   for m, t in by_metric.items()]))
        for layer in sorted(layer_charts):
            categories.append(layout_pb2.Category(
                title=f"{study}: decoupled layer {layer}",
                chart=[chart(f"{study}: layer {layer} {LAYER_METRICS[m]}", t)
                       for m, t in layer_charts[layer].items()]))
    return layout_pb2.Layout(category=categories)


def write_scalar_layout(tags: Iterable[str], model, step: int = 0) -> None:
    """Writes the custom-scalar layout for `tags` into the default summary writer."""
    from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

    layout = scalar_layout(tags, study_title(model))
    tf.summary.experimental.write_raw_pb(
        custom_scalar_summary.pb(layout).SerializeToString(), step=step)


def _hparam_value(value: Any):
    """A value the hparams plugin accepts: bool, number or string."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Number):
        return float(value)
    return str(value)


def _final_metrics(metrics: Mapping[str, Any], skip: Iterable[str]) -> Dict[str, float]:
    """The finite numbers among `metrics`, except hparam names and `NOT_METRICS`."""
    skip = set(skip) | NOT_METRICS
    return {name: float(value) for name, value in metrics.items()
            if name not in skip and isinstance(value, numbers.Number)
            and not isinstance(value, bool) and math.isfinite(float(value))}


def _curve_tag(name: str, value: float, history) -> Optional[str]:
    """The tag of the run's curve whose last point is the final metric `name`, if any."""
    if not len(history):
        return None
    last = history.sort_values("step").iloc[-1]
    for column in [name] + [c for c in history.columns if c.partition("_")[2] == name]:
        if column in history.columns and column != "step" and "_" in column:
            logged = last[column]
            if isinstance(logged, numbers.Number) and math.isclose(
                    float(logged), value, rel_tol=1e-6, abs_tol=1e-9):
                return column_tag(column)
    return None


def _remove(pattern: str) -> None:
    for path in glob.glob(pattern):
        os.remove(path)


def _events_writer(directory: str, suffix: str):
    """A writer for `directory` after deleting the `suffix` event files an earlier call wrote."""
    _remove(os.path.join(directory, f"events.out.tfevents.*{suffix}"))
    return tf.summary.create_file_writer(directory, filename_suffix=suffix)


def log_sweep(sweep_root: str,
              runs: Sequence[Tuple[str, Mapping[str, Any], Mapping[str, Any], Any]]) -> None:
    """Logs a sweep for TensorBoard's HParams dashboard.

    Args:
      sweep_root: the directory TensorBoard is pointed at for this sweep.
      runs: one `(run_dir, hparams, final_metrics, history)` per run: `run_dir`
        is the run's directory (its event files are there), `hparams` maps
        names to bool/number/string values (others become strings),
        `final_metrics` maps names to values; the finite numbers among them
        (except hparam names and `NOT_METRICS`) are the metrics of the HParams
        table: shown through the run's curve whose last point they are, else
        logged as `final/<name>` at the run's last history step. `history` is
        the run's evaluation history (`TrainingOutcome.history`: a DataFrame
        with a `step` column and one column per curve).
    """
    from tensorboard.plugins.hparams import api as hp

    if not runs:
        return
    values: "OrderedDict[str, set]" = OrderedDict()
    metric_tags: "OrderedDict[str, str]" = OrderedDict()  # tag -> display name
    per_run = []
    for run_dir, hparams, final, history in runs:
        adopt_legacy_events(run_dir)
        for name, value in hparams.items():
            values.setdefault(name, set()).add(_hparam_value(value))
        final_only = {}
        for name, value in _final_metrics(final, hparams).items():
            tag = _curve_tag(name, value, history)
            if tag is None:
                final_only[name] = value
                tag = f"final/{name}"
            metric_tags.setdefault(tag, name)
        step = int(history["step"].max()) if len(history) else 0
        per_run.append((run_dir, hparams, final_only, step))
    domains, stringified = {}, set()
    for name, seen in values.items():
        if len({type(v) for v in seen}) > 1:  # Discrete needs values of one type
            seen = {str(v) for v in seen}
            stringified.add(name)
        domains[name] = hp.HParam(name, hp.Discrete(sorted(seen)))
    # Earlier layouts and sweeps: the experiment at the root, in another run.
    _remove(os.path.join(sweep_root, f"events.out.tfevents.*{HPARAMS_SUFFIX}"))
    _remove(os.path.join(sweep_root, "*", f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"))
    # The experiment goes into the first run's folder: at the sweep root it
    # would show as an extra run named `.`.
    writer = _events_writer(runs[0][0], EXPERIMENT_SUFFIX)
    with writer.as_default():
        hp.hparams_config(hparams=list(domains.values()),
                          metrics=[hp.Metric(tag, display_name=f"{name} (final)")
                                   for tag, name in metric_tags.items()])
    writer.close()
    for run_dir, hparams, final_only, step in per_run:
        writer = _events_writer(run_dir, HPARAMS_SUFFIX)
        with writer.as_default(step=step):
            hp.hparams({domains[name]: (str(_hparam_value(value)) if name in stringified
                                         else _hparam_value(value))
                        for name, value in hparams.items()},
                       trial_id=os.path.relpath(run_dir, sweep_root))
            for name, value in final_only.items():
                tf.summary.scalar(f"final/{name}", value)
        writer.close()
