"""The event files of a short sweep hold the scalars, the custom-scalar layout and hparams.

One tiny feed-forward DNI grid (dni and cdni, three layers, diagnostics on,
two steps on digits) is trained once for the module; the tests read its event
files with `tf.compat.v1.train.summary_iterator`.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import tensorflow as tf

from dni_tf import tensorboard_views

METHODS = ("dni", "cdni")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from dni_tf.studies.dni_feedforward import DNIConfig, run_grid

    root = str(tmp_path_factory.mktemp("dni_sweep"))
    config = DNIConfig(dataset="digits", layers=3, width=8, steps=2, eval_every=1, batch_size=32,
                       learning_rate=1e-3, diagnostics=True)
    run_grid(config, METHODS, [3], root)
    return root


def events(directory: str):
    """Every summary value in the event files directly in `directory`: (tag, plugin, value, step)."""
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.append((value.tag, value.metadata.plugin_data.plugin_name, value, event.step))
    return found


def scalar(value) -> float:
    return float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value


def test_scalars_of_every_metric_including_per_layer_diagnostics(sweep):
    tags = {tag for tag, *_ in events(os.path.join(sweep, "fcn3_dni", "tensorboard"))}
    for expected in ("train/loss", "train/accuracy", "test/loss", "test/accuracy",
                     "train/sg_loss_1", "train/sg_loss_2", "train/sg_cosine_1",
                     "train/sg_cosine_2", "train/sg_norm_ratio_1", "train/sg_norm_ratio_2"):
        assert expected in tags


def test_custom_scalar_layout_groups_per_study_and_per_layer(sweep):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    run = os.path.join(sweep, "fcn3_cdni", "tensorboard")
    layouts = [value for tag, _, value, _ in events(run) if tag == metadata.CONFIG_SUMMARY_TAG]
    assert len(layouts) == 1, "one layout per fit(), although there were two evaluations"
    layout = layout_pb2.Layout.FromString(tf.make_ndarray(layouts[0].tensor).item())
    charts = {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
              for category in layout.category}

    def tags_shown(category, chart):
        pattern = re.compile(charts[category][chart][0])
        logged = {tag for tag, *_ in events(run)}
        return {t for t in logged if pattern.search(t)}

    study = "feed-forward DNI"
    assert tags_shown(study, f"{study}: accuracy") == {"train/accuracy", "test/accuracy"}
    for layer in (1, 2):
        category = f"{study}: decoupled layer {layer}"
        chart = f"{study}: layer {layer} {tensorboard_views.LAYER_METRICS['sg_cosine']}"
        assert tags_shown(category, chart) == {f"train/sg_cosine_{layer}"}
    every_layer = f"{study}: {tensorboard_views.LAYER_METRICS['sg_cosine']}, every layer"
    assert tags_shown(f"{study}: every decoupled layer", every_layer) == {
        "train/sg_cosine_1", "train/sg_cosine_2"}


def test_hparams_experiment_at_the_root_and_each_run_with_its_values(sweep):
    from tensorboard.plugins.hparams import metadata

    experiments = [v for tag, plugin, v, _ in events(sweep) if tag == metadata.EXPERIMENT_TAG]
    assert len(experiments) == 1
    experiment = metadata.parse_experiment_plugin_data(
        experiments[0].metadata.plugin_data.content)
    assert {h.name for h in experiment.hparam_infos} == {"method", "layers"}
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/test_accuracy", "final/test_error"} <= metric_tags

    for method in METHODS:
        run_dir = os.path.join(sweep, f"fcn3_{method}")
        found = events(os.path.join(run_dir, "tensorboard"))
        starts = [v for tag, _, v, _ in found if tag == metadata.SESSION_START_INFO_TAG]
        assert len(starts) == 1
        info = metadata.parse_session_start_info_plugin_data(starts[0].metadata.plugin_data.content)
        assert info.hparams["method"].string_value == method
        assert info.hparams["layers"].number_value == 3
        with open(os.path.join(run_dir, "results.json")) as f:
            final = json.load(f)["metrics"]
        logged = {tag: (scalar(v), step) for tag, _, v, step in found if tag.startswith("final/")}
        assert logged["final/test_accuracy"] == pytest.approx((final["test_accuracy"], 2))
        assert set(logged) <= metric_tags


def test_logging_a_sweep_again_replaces_the_hparams(sweep):
    runs = [(os.path.join(sweep, f"fcn3_{m}"), {"method": m, "layers": 3}, {"test_error": 0.5})
            for m in METHODS]
    tensorboard_views.log_sweep(sweep, runs)
    tensorboard_views.log_sweep(sweep, runs)
    for directory in [sweep] + [os.path.join(r, "tensorboard") for r, _, _ in runs]:
        written = glob.glob(os.path.join(directory, f"*{tensorboard_views.HPARAMS_SUFFIX}"))
        assert len(written) == 1, directory
    logged = [tag for tag, *_ in events(os.path.join(sweep, "fcn3_dni", "tensorboard"))]
    assert "final/test_error" in logged and "final/test_accuracy" not in logged


def test_hparam_values_of_mixed_types_are_logged_as_strings(tmp_path):
    from tensorboard.plugins.hparams import metadata

    runs = [(str(tmp_path / "a"), {"width": 16}, {}), (str(tmp_path / "b"), {"width": "auto"}, {})]
    tensorboard_views.log_sweep(str(tmp_path), runs)
    (value,) = [v for tag, _, v, _ in events(str(tmp_path)) if tag == metadata.EXPERIMENT_TAG]
    (info,) = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content).hparam_infos
    assert sorted(v.string_value for v in info.domain_discrete.values) == ["16.0", "auto"]
