"""The event files of a short sweep hold the scalars, the custom-scalar layout and hparams.

One tiny feed-forward DNI grid (dni and cdni, three layers, diagnostics on,
two steps on digits) is trained once for the module; the tests read its event
files with `tf.compat.v1.train.summary_iterator`, and the run names with
TensorBoard's own `EventMultiplexer` (as `tensorboard --logdir SWEEP` lists them).
"""

from __future__ import annotations

import glob
import json
import os
import re

import pandas as pd
import pytest
import tensorflow as tf

from dni_tf.harness import results, tensorboard_views

METHODS = ("dni", "cdni")
# One xdist worker runs this module: the `sweep` fixture trains once, not once per worker.
pytestmark = pytest.mark.xdist_group("tensorboard_sweep")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from dni_tf.studies.dni_feedforward import DNIConfig, run_grid

    root = str(tmp_path_factory.mktemp("dni_sweep"))
    # Graph mode: the logging is the point here; XLA's compiles were half the fixture's time.
    config = DNIConfig(dataset="digits", layers=3, width=8, steps=2, eval_every=1, batch_size=32,
                       learning_rate=1e-3, diagnostics=True, jit_compile=False)
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


def runs_as_tensorboard_lists_them(logdir: str):
    """{run name: {scalar tag: [(step, value), ...]}}, read the way TensorBoard reads a logdir."""
    from tensorboard.backend.event_processing import plugin_event_multiplexer

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    found = {}
    for run in multiplexer.Runs():
        accumulator = multiplexer.GetAccumulator(run)
        scalars = accumulator.PluginTagToContent("scalars")
        found[run] = {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                            for e in accumulator.Tensors(tag)] for tag in scalars}
    return found


def scalar(value) -> float:
    return float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value


def test_runs_are_named_by_their_configuration_with_none_at_the_sweep_root(sweep):
    runs = runs_as_tensorboard_lists_them(sweep)
    assert set(runs) == {f"fcn3_{m}" for m in METHODS}
    assert not glob.glob(os.path.join(sweep, "events.out.tfevents.*"))
    assert not glob.glob(os.path.join(sweep, "*", tensorboard_views.LEGACY_DIR))


def test_a_run_writes_its_event_files_into_its_own_folder(tmp_path):
    """While a sweep trains (before `log_sweep`), its runs already show by configuration."""
    import keras

    from dni_tf.harness.callbacks import EvaluationLogger

    run = tmp_path / "keep_prob_0.5"
    logger = EvaluationLogger(str(run), eval_every=10)
    logger.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    for epoch in range(2):
        logger.on_epoch_end(epoch, {"loss": 1.0 - epoch / 4, "val_loss": 2.0})
    logger.writer.close()
    assert runs_as_tensorboard_lists_them(str(tmp_path)) == {
        "keep_prob_0.5": {"train/loss": [(10, 1.0), (20, 0.75)], "test/loss": [(10, 2.0), (20, 2.0)]}}


def test_scalars_of_every_metric_including_per_layer_diagnostics(sweep):
    tags = set(runs_as_tensorboard_lists_them(sweep)["fcn3_dni"])
    for expected in ("train/loss", "train/accuracy", "test/loss", "test/accuracy",
                     "train/sg_loss_1", "train/sg_loss_2", "train/sg_cosine_1",
                     "train/sg_cosine_2", "train/sg_norm_ratio_1", "train/sg_norm_ratio_2"):
        assert expected in tags


def test_no_single_point_charts_and_no_final_group(sweep):
    for run, tags in runs_as_tensorboard_lists_them(sweep).items():
        assert not [t for t in tags if t.startswith("final/")], run
        single = {tag for tag, points in tags.items() if len(points) < 2}
        assert not single, f"{run}: one-point charts {sorted(single)} (two evaluations ran)"


def layout_of(run_dir: str):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layouts = [value for tag, _, value, _ in events(run_dir) if tag == metadata.CONFIG_SUMMARY_TAG]
    assert len(layouts) == 1, "one layout per fit(), although there were two evaluations"
    return layout_pb2.Layout.FromString(tf.make_ndarray(layouts[0].tensor).item())


def test_custom_scalar_layout_groups_per_study_and_per_layer(sweep):
    run = os.path.join(sweep, "fcn3_cdni")
    layout = layout_of(run)
    charts = {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
              for category in layout.category}
    logged = {tag for tag, *_ in events(run)}

    def tags_shown(category, chart):
        pattern = re.compile(charts[category][chart][0])
        return {t for t in logged if pattern.search(t)}

    study = "feed-forward DNI"
    assert tags_shown(study, f"{study}: accuracy, train") == {"train/accuracy"}
    assert tags_shown(study, f"{study}: accuracy, test") == {"test/accuracy"}
    for layer in (1, 2):
        category = f"{study}: decoupled layer {layer}"
        chart = f"{study}: layer {layer} {tensorboard_views.LAYER_METRICS['sg_cosine']}"
        assert tags_shown(category, chart) == {f"train/sg_cosine_{layer}"}
    every_layer = f"{study}: {tensorboard_views.LAYER_METRICS['sg_cosine']}, every layer"
    assert tags_shown(f"{study}: every decoupled layer", every_layer) == {
        "train/sg_cosine_1", "train/sg_cosine_2"}


def test_custom_scalar_charts_never_mix_train_and_test(sweep):
    """Curves are coloured by run: a chart with train and test of one run has one colour."""
    run = os.path.join(sweep, "fcn3_dni")
    logged = {tag for tag, *_ in events(run) if tag.startswith(("train/", "test/"))}
    for category in layout_of(run).category:
        for chart in category.chart:
            (regex,) = chart.multiline.tag
            shown = {t for t in logged if re.search(regex, t)}
            assert shown, chart.title
            assert len({t.partition("/")[0] for t in shown}) == 1, (chart.title, sorted(shown))


def experiment_and_sessions(sweep):
    from tensorboard.plugins.hparams import metadata

    experiments, sessions = [], {}
    for run_dir in [sweep] + sorted(glob.glob(os.path.join(sweep, "*", ""))):
        for tag, _, value, _ in events(run_dir):
            content = value.metadata.plugin_data.content
            if tag == metadata.EXPERIMENT_TAG:
                experiments.append((run_dir, metadata.parse_experiment_plugin_data(content)))
            elif tag == metadata.SESSION_START_INFO_TAG:
                name = os.path.relpath(run_dir, sweep)
                assert name not in sessions
                sessions[name] = metadata.parse_session_start_info_plugin_data(content)
    return experiments, sessions


def test_hparams_carry_each_run_values_and_final_metrics(sweep):
    experiments, sessions = experiment_and_sessions(sweep)
    assert len(experiments) == 1
    where, experiment = experiments[0]
    assert os.path.dirname(os.path.normpath(where)) == os.path.normpath(sweep), "not at the root"
    assert {h.name for h in experiment.hparam_infos} == {"method", "layers", "seed"}
    metrics = {m.name.tag: m.display_name for m in experiment.metric_infos}
    assert metrics["test/accuracy"] == "test_accuracy (final)"
    runs = runs_as_tensorboard_lists_them(sweep)
    assert set(sessions) == set(runs)
    for method in METHODS:
        run = f"fcn3_{method}"
        assert sessions[run].hparams["method"].string_value == method
        assert sessions[run].hparams["layers"].number_value == 3
        with open(os.path.join(sweep, run, "results.json")) as f:
            final = json.load(f)["metrics"]
        # TensorBoard shows a metric's last point: every final metric is one.
        shown = {metrics_name: runs[run][tag][-1] for tag, metrics_name in
                 ((t, n.replace(" (final)", "")) for t, n in metrics.items())}
        expected = {name for name, value in final.items() if isinstance(value, (int, float))
                    and name not in tensorboard_views.NOT_METRICS}
        assert expected <= set(shown)
        for name in expected:
            assert shown[name] == (2, pytest.approx(final[name], rel=1e-6)), name


def test_metrics_only_known_at_the_end_are_logged_once_and_relogging_replaces(sweep):
    runs = [(os.path.join(sweep, f"fcn3_{m}"), {"method": m, "layers": 3},
             {"test_accuracy": None, "pruned_accuracy": 0.25, "steps": 2},
             results.load_history(os.path.join(sweep, f"fcn3_{m}"))) for m in METHODS]
    tensorboard_views.log_sweep(sweep, runs)
    tensorboard_views.log_sweep(sweep, runs)
    for run_dir, _, _, _ in runs:
        written = glob.glob(os.path.join(run_dir, f"*{tensorboard_views.HPARAMS_SUFFIX}"))
        assert len(written) == 1, run_dir
    assert len(glob.glob(os.path.join(sweep, "*", f"*{tensorboard_views.EXPERIMENT_SUFFIX}"))) == 1
    tags = runs_as_tensorboard_lists_them(sweep)["fcn3_dni"]
    assert tags["final/pruned_accuracy"] == [(2, pytest.approx(0.25))]
    assert "final/steps" not in tags
    (where, experiment), = experiment_and_sessions(sweep)[0]
    assert [m.name.tag for m in experiment.metric_infos] == ["final/pruned_accuracy"]


def test_events_of_the_old_tensorboard_folder_move_into_the_run(tmp_path):
    run = tmp_path / "keep_prob_0.5"
    with tf.summary.create_file_writer(str(run / "tensorboard")).as_default():
        tf.summary.scalar("train/loss", 1.0, step=1)
    tensorboard_views.log_sweep(str(tmp_path), [(str(run), {"keep_prob": 0.5}, {},
                                                  pd.DataFrame({"step": [1]}))])
    assert set(runs_as_tensorboard_lists_them(str(tmp_path))) == {"keep_prob_0.5"}
    assert not (run / "tensorboard").exists()


def test_hparam_values_of_mixed_types_are_logged_as_strings(tmp_path):
    from tensorboard.plugins.hparams import metadata

    no_history = pd.DataFrame({"step": []})
    runs = [(str(tmp_path / "a"), {"width": 16}, {}, no_history),
            (str(tmp_path / "b"), {"width": "auto"}, {}, no_history)]
    tensorboard_views.log_sweep(str(tmp_path), runs)
    (value,) = [v for tag, _, v, _ in events(str(tmp_path / "a")) if tag == metadata.EXPERIMENT_TAG]
    (info,) = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content).hparam_infos
    assert sorted(v.string_value for v in info.domain_discrete.values) == ["16.0", "auto"]
