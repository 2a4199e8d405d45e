"""TensorBoard views beyond plain scalars: custom-scalar layouts and hparams.

* `write_scalar_layout(tags, model)`: a Custom Scalars layout for one run,
  written into the default summary writer. Scalars are grouped in a category
  per study (loss, accuracy and each of the algorithm's own diagnostics, with
  the train and evaluation curves of a metric in one chart) and, for metrics
  logged per decoupled layer (`train/sg_cosine_1`, `train/sg_loss_2`, ...), in
  a category per layer, plus one chart per metric comparing the layers.
  `dni_tf.callbacks.EvaluationLogger` calls it once per `fit()`, after the
  first evaluation, when the run's tags are known. TensorBoard merges the
  layouts of every run under `--logdir`, skipping duplicate charts.
* `log_sweep(sweep_root, runs)`: the HParams plugin's view of a sweep: the
  experiment (every hyper-parameter's values and the metrics) in
  `sweep_root`, and in each run's `tensorboard/` directory its hyper-parameter
  values and its final metrics as `final/<name>` scalars. The studies' sweep
  functions call it after their runs; calling it again (a resumed sweep)
  replaces what it wrote before.

Tags follow `EvaluationLogger`: `train/<metric>` and `<eval prefix>/<metric>`.
"""

from __future__ import annotations

import glob
import math
import numbers
import os
import re
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

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
        _, _, metric = tag.partition("/")
        study_charts.setdefault(metric or tag, []).append(tag)

    def chart(title, tag_list):
        regex = "|".join(f"^{re.escape(t)}$" for t in sorted(set(tag_list)))
        return layout_pb2.Chart(title=title,
                                multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    categories = [layout_pb2.Category(
        title=study, chart=[chart(f"{study}: {metric}", t) for metric, t in study_charts.items()])]
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


def _final_scalars(metrics: Mapping[str, Any], skip: Iterable[str]) -> Dict[str, float]:
    skip = set(skip)
    return {name: float(value) for name, value in metrics.items()
            if name not in skip and isinstance(value, numbers.Number)
            and not isinstance(value, bool) and math.isfinite(float(value))}


def _replace_hparams_events(directory: str):
    """A writer for `directory` after deleting the event files an earlier call wrote."""
    for path in glob.glob(os.path.join(directory, f"events.out.tfevents.*{HPARAMS_SUFFIX}")):
        os.remove(path)
    return tf.summary.create_file_writer(directory, filename_suffix=HPARAMS_SUFFIX)


def log_sweep(sweep_root: str,
              runs: Sequence[Tuple[str, Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """Logs a sweep for TensorBoard's HParams dashboard.

    Args:
      sweep_root: the directory TensorBoard is pointed at for this sweep; the
        experiment summary is written there.
      runs: one `(run_dir, hparams, final_metrics)` per run: `run_dir` is the
        run's directory (its `tensorboard/` holds its scalars), `hparams` maps
        names to bool/number/string values (others become strings),
        `final_metrics` maps names to values; the finite numbers among them
        (except hparam names) are logged as `final/<name>` at the run's last
        history step and are the metrics of the HParams table.
    """
    from tensorboard.plugins.hparams import api as hp

    from dni_tf import results

    if not runs:
        return
    values: "OrderedDict[str, set]" = OrderedDict()
    metric_names: "OrderedDict[str, None]" = OrderedDict()
    for _, hparams, final in runs:
        for name, value in hparams.items():
            values.setdefault(name, set()).add(_hparam_value(value))
        for name in _final_scalars(final, hparams):
            metric_names[name] = None
    domains, stringified = {}, set()
    for name, seen in values.items():
        if len({type(v) for v in seen}) > 1:  # Discrete needs values of one type
            seen = {str(v) for v in seen}
            stringified.add(name)
        domains[name] = hp.HParam(name, hp.Discrete(sorted(seen)))
    writer = _replace_hparams_events(sweep_root)
    with writer.as_default():
        hp.hparams_config(hparams=list(domains.values()),
                          metrics=[hp.Metric(f"final/{name}", display_name=name)
                                   for name in metric_names])
    writer.close()
    for run_dir, hparams, final in runs:
        history = results.load_history(run_dir)
        step = int(history["step"].max()) if len(history) else 0
        writer = _replace_hparams_events(os.path.join(run_dir, "tensorboard"))
        with writer.as_default(step=step):
            hp.hparams({domains[name]: (str(_hparam_value(value)) if name in stringified
                                         else _hparam_value(value))
                        for name, value in hparams.items()},
                       trial_id=os.path.relpath(run_dir, sweep_root))
            for name, value in _final_scalars(final, hparams).items():
                tf.summary.scalar(f"final/{name}", value)
        writer.close()
