"""Entry points of issue 4: copy_task, language_model, multi_network (flags, resume, tables)."""

import dataclasses
import glob
import json
import os

import pandas as pd
import pytest

from conftest import count_traces
from dni_tf.errors import UsageError
from dni_tf.harness import results, timing, training
from dni_tf.studies import recurrent_dni as study



@pytest.mark.parametrize("field, value", [("task", "sort"), ("method", "rtrl"),
                                          ("truncation", 0), ("max_length", 0),
                                          ("eval_every", 0), ("update", "per_epoch"),
                                          ("episodes", "shuffled"), ("sampling", "all"),
                                          ("bootstrap_scale", -0.1), ("sg_scale", -0.1)])
def test_copy_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        study.CopyTaskConfig(**{field: value}).validate()


def test_copy_defaults_are_the_papers_setting_and_diagnostics_need_a_module():
    cfg = study.CopyTaskConfig()
    assert (cfg.update, cfg.episodes, cfg.sampling, cfg.bootstrap_scale, cfg.sg_scale) == (
        "per_window", "continuous", "uniform", 0.1, 0.1)
    with pytest.raises(ValueError, match="diagnostics"):
        study.CopyTaskConfig(method="bptt", diagnostics=True).validate()
    study.CopyTaskConfig(sg_scale=0.0).validate()  # the injection ablation is allowed
    model, _ = study.build_copy_model(study.CopyTaskConfig(hidden_size=4, batch_size=3))
    # One endless stream cut every T steps, bootstrapping across episodes (discounted).
    assert model.stateful and model.update == "per_window" and model.bootstrap_scale == 0.1
    assert model.continuous and not model.episodic
    stream, _ = study.build_copy_model(study.CopyTaskConfig(hidden_size=4, episodes="stream"))
    assert stream.stateful and stream.episodic and not stream.continuous  # cut at episode ends
    reset, _ = study.build_copy_model(study.CopyTaskConfig(hidden_size=4, episodes="reset"))
    assert not reset.stateful


def test_repeat_copy_diagnostics_run_logs_per_window_quality(tmp_path):
    cfg = study.CopyTaskConfig(task="repeat_copy", method="dni_aux", truncation=2,
                               hidden_size=6, batch_size=3, steps=2, eval_every=1,
                               eval_batches=1, max_length=5, max_repeats=2, threshold=100.0,
                               check_every=1, num_bits=2, diagnostics=True)
    metrics = study.run_copy_task(cfg, str(tmp_path))
    assert metrics["max_repeats_solved"] >= 1 and metrics["max_length_solved"] >= 1
    history = results.load_history(str(tmp_path))
    for column in ("sg_cosine_mean", "sg_norm_ratio_mean", "curriculum_repeats"):
        assert column in history and history[column].notna().all()
    assert glob.glob(str(tmp_path / "sg_quality" / "events.out.tfevents.*"))


def test_diagnostics_measure_m_on_the_carried_stream_state(tmp_path):
    """In the stream M is trained on carried states, so the diagnostic starts its batch
    from the training state, not from zero (which would be off M's distribution)."""
    import numpy as np
    import tensorflow as tf
    from dni_tf.data import sequence_tasks
    cfg = study.CopyTaskConfig(method="dni", truncation=2, hidden_size=4, batch_size=3,
                               num_bits=2, diagnostics=True, episodes="stream")
    model, curriculum = study.build_copy_model(cfg)
    curriculum.length.assign(2)  # 5 steps: three windows, two window ends compared
    x, y, mask = sequence_tasks.copy_batch(tf.constant([cfg.seed + 2_000_003, 0], tf.int64),
                                           cfg.batch_size, 2, cfg.num_bits)
    model(x)
    rng = np.random.default_rng(0)
    for v in model.synthetic_gradient.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    carried = rng.normal(size=model.train_state.shape).astype("float32")
    model.train_state.assign(carried)
    row = study.SyntheticGradientDiagnostics(cfg, curriculum, str(tmp_path))(model)
    expected = model.synthetic_gradient_quality(x, y, mask, state=carried)
    from_zero = model.synthetic_gradient_quality(x, y, mask)
    assert row["sg_cosine_mean"] == pytest.approx(float(np.mean(expected["cosine"])), abs=1e-6)
    assert row["sg_cosine_mean"] != pytest.approx(float(np.mean(from_zero["cosine"])), abs=1e-3)
    reset, reset_curriculum = study.build_copy_model(dataclasses.replace(cfg, episodes="reset"))
    reset_curriculum.length.assign(2)
    reset(x)
    for v, w in zip(reset.synthetic_gradient.weights, model.synthetic_gradient.weights):
        v.assign(w)
    for v, w in zip(reset.core.weights + reset.head.weights,
                    model.core.weights + model.head.weights):
        v.assign(w)
    row = study.SyntheticGradientDiagnostics(cfg, reset_curriculum, str(tmp_path / "r"))(reset)
    assert row["sg_cosine_mean"] == pytest.approx(float(np.mean(from_zero["cosine"])), abs=1e-6)


def test_continuous_diagnostics_score_m_on_training_windows(tmp_path):
    """In the continuous stream training cuts windows at any offset of an episode, after
    the steps it holds over: the diagnostic runs those pending steps, then four episodes,
    cut at a window end, from the carried state (not one episode aligned to a window)."""
    import numpy as np
    import tensorflow as tf
    from dni_tf.data import sequence_tasks
    cfg = study.CopyTaskConfig(method="dni", truncation=3, hidden_size=4, batch_size=3,
                               num_bits=2, diagnostics=True)
    model, curriculum = study.build_copy_model(cfg)
    assert model.continuous
    curriculum.length.assign(2)  # 5-step episodes
    rng = np.random.default_rng(1)
    model(np.zeros([3, 5, 3], "float32"))
    for v in model.synthetic_gradient.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    carried = rng.normal(size=model.train_state.shape).astype("float32")
    model.train_state.assign(carried)
    pending = [rng.normal(size=v.shape).astype("float32")
               for v in (model.pending_x, model.pending_y, model.pending_mask)]
    pending[1], pending[2] = (pending[1] > 0).astype("float32"), np.ones([3, 3], "float32")
    for v, value in zip((model.pending_x, model.pending_y, model.pending_mask), pending):
        v.assign(value)
    model.pending_steps.assign(1)
    row = study.SyntheticGradientDiagnostics(cfg, curriculum, str(tmp_path))(model)
    # By hand: 1 pending step + 4 x 5 episode steps = 21 steps, 7 whole windows of 3.
    episodes = [sequence_tasks.copy_batch(tf.constant([cfg.seed + 2_000_003, i], tf.int64),
                                          3, 2, 2) for i in range(4)]
    stream = [np.concatenate([pending[j][:, :1]] + [e[j].numpy() for e in episodes], 1)
              for j in range(3)]
    assert stream[0].shape[1] == 21
    expected = model.synthetic_gradient_quality(*stream, state=carried)
    assert len(expected["cosine"]) == 6
    assert row["sg_cosine_mean"] == pytest.approx(float(np.mean(expected["cosine"])), abs=1e-6)
    assert row["sg_norm_ratio_mean"] == pytest.approx(float(np.mean(expected["norm_ratio"])),
                                                      rel=1e-5)
    # The weight-space scores, pooled over the six windows (their changes concatenated).
    weights = model.synthetic_gradient_quality(*stream, state=carried, weight_space=True)
    norm, true_norm = weights["update_norm"].numpy(), weights["update_true_norm"].numpy()
    assert row["sg_update_cosine"] == pytest.approx(
        np.sum(weights["update_cosine"].numpy() * norm * true_norm)
        / np.sqrt(np.sum(norm ** 2) * np.sum(true_norm ** 2)), rel=1e-4, abs=1e-6)
    assert row["sg_update_norm_ratio"] == pytest.approx(
        np.sqrt(np.sum(norm ** 2) / np.sum(true_norm ** 2)), rel=1e-4)
    one_episode = model.synthetic_gradient_quality(*episodes[0], state=carried)
    assert row["sg_cosine_mean"] != pytest.approx(float(np.mean(one_episode["cosine"])),
                                                  abs=1e-3)
    # 22 steps (two pending) are cut after 21: the 22nd starts the next segment.
    model.pending_steps.assign(2)
    (x, _, _), state, leftover = study.diagnostic_batch(
        cfg, curriculum, model, tf.constant([cfg.seed + 2_000_003, 0], tf.int64))
    assert x.shape[1] == 21 and leftover[0].shape[1] == 1
    np.testing.assert_array_equal(x[:, :2], pending[0][:, :2])
    np.testing.assert_array_equal(leftover[0][:, 0], episodes[3][0][:, -1])


def test_multi_network_config_validation():
    from dni_tf.studies.multi_network import MultiNetworkConfig
    with pytest.raises(ValueError, match="method"):
        MultiNetworkConfig(method="rtrl").validate()
    with pytest.raises(ValueError, match="tick_ratio"):
        MultiNetworkConfig(tick_ratio=0).validate()


def test_language_model_per_window_updates_and_xla_option():
    cfg = study.LanguageModelConfig(hidden_size=4, batch_size=2, jit_compile=True)
    model = study.build_language_model(cfg, vocab_size=5)
    assert model.jit_compile and model.update == "per_window" and model.stateful
    assert not model.episodic  # a true stream: the bootstrap crosses batches
    # ... so its target is discounted by default (undiscounted diverged on PTB at T=2),
    # as in Copy's default stream.
    assert model.bootstrap_scale == pytest.approx(0.1)
    # ... and M learns at 1/1000 of the core's rate on PTB (at 0.01 one seed of three ran
    # away at T=5) and 1/100 on Copy (at 1 the carried cell state ran away in both).
    assert model.sg_lr_scale == pytest.approx(0.001)
    assert study.CopyTaskConfig().sg_lr_scale == pytest.approx(0.01)
    with pytest.raises(ValueError, match="update"):
        study.LanguageModelConfig(update="x").validate()


def test_the_stateful_language_model_traces_its_train_step_once():
    """BuildsBeforeTracing on the stateful TruncatedBPTT of the PTB study (the conformance
    cases count traces for the non-stateful one)."""
    import numpy as np
    import tensorflow as tf

    cfg = study.LanguageModelConfig(hidden_size=8, batch_size=2, method="dni", truncation=2)
    model = study.build_language_model(cfg, vocab_size=5)
    traces = count_traces(model)
    chars = np.random.RandomState(0).randint(0, 5, (2, 8)).astype("int32")
    model.fit(tf.data.Dataset.from_tensors((chars, chars)).repeat(3), epochs=1, verbose=0)
    assert len(traces) == 1


def test_language_model_config_validation():
    with pytest.raises(ValueError, match="truncation"):
        study.LanguageModelConfig(truncation=0).validate()
    with pytest.raises(ValueError, match="method"):
        study.LanguageModelConfig(method="x").validate()


def test_copy_run_writes_results_and_resumes_with_curriculum(tmp_path):
    # threshold=100 bits: every check passes, so the length grows by one per step.
    # Every step has a new length (a new trace), so the run is kept short.
    cfg = study.CopyTaskConfig(method="dni", truncation=2, hidden_size=8, batch_size=4,
                               steps=2, eval_every=1, eval_batches=1, max_length=20,
                               threshold=100.0, check_every=1, num_bits=3)
    metrics = study.run_copy_task(cfg, str(tmp_path))
    assert metrics["max_length_solved"] == 2 and metrics["curriculum_length"] == 3
    history = results.load_history(str(tmp_path))
    assert history["curriculum_length"].tolist() == [2, 3]
    cfg.steps = 3
    metrics = study.run_copy_task(cfg, str(tmp_path))  # resumes at step 2
    assert metrics["curriculum_length"] == 4  # the curriculum position was restored
    history = results.load_history(str(tmp_path))
    assert history["step"].tolist() == [1, 2, 3]
    saved = results.load_results(str(tmp_path))
    assert saved["config"]["method"] == "dni" and saved["metrics"]["max_length_solved"] == 3
    # The directory records its settings, and refuses to resume under others.
    assert results.saved_settings(str(tmp_path)) == dataclasses.asdict(cfg)
    with pytest.raises(UsageError, match=r"--sg_lr_scale=0\.01 \(now 1\.0\)"):
        study.run_copy_task(dataclasses.replace(cfg, steps=4, sg_lr_scale=1.0), str(tmp_path))
    assert results.load_history(str(tmp_path))["step"].tolist() == [1, 2, 3]
    assert glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)


def test_continuous_copy_stream_resumes_exactly_with_its_pending_steps(tmp_path):
    """--episodes=continuous: episodes of 3, 5, 7, 9 steps cut into windows of 2 leave
    1, 0, 1, 0 steps pending; a run stopped after step 3 (one step pending) and resumed
    must log step 4 exactly as the uninterrupted run."""
    cfg = study.CopyTaskConfig(method="dni", truncation=2, hidden_size=8, batch_size=4,
                               steps=4, eval_every=1, eval_batches=1, max_length=20,
                               threshold=100.0, check_every=1, num_bits=3, sampling="current",
                               episodes="continuous")
    model, _ = study.build_copy_model(cfg)
    assert model.continuous and model.stateful and not model.episodic
    study.run_copy_task(cfg, str(tmp_path / "whole"))
    study.run_copy_task(dataclasses.replace(cfg, steps=3), str(tmp_path / "split"))
    study.run_copy_task(cfg, str(tmp_path / "split"))
    whole = results.load_history(str(tmp_path / "whole"))
    split = results.load_history(str(tmp_path / "split"))
    assert split["step"].tolist() == [1, 2, 3, 4]
    columns = [c for c in whole.columns if c.startswith(("train_", "test_"))]
    pd.testing.assert_frame_equal(whole[columns], split[columns])


def test_a_fork_starts_from_the_source_checkpoint_under_new_settings(tmp_path):
    """fork_run (`--fork_from`): a fork under the source's own settings trains on
    exactly as the uninterrupted run (so it carries the weights, optimizer, carried
    state, pending steps and curriculum); one under other settings differs from
    there on; the source is left as it was."""
    cfg = study.CopyTaskConfig(method="dni", truncation=2, hidden_size=8, batch_size=4,
                               steps=4, eval_every=2, eval_batches=1, max_length=20,
                               threshold=100.0, check_every=1, num_bits=3, sampling="current",
                               episodes="continuous")
    source, whole = str(tmp_path / "source"), str(tmp_path / "whole")
    study.run_copy_task(cfg, source)
    source_files = {p: os.path.getmtime(p) for p in glob.glob(source + "/**", recursive=True)}
    longer = dataclasses.replace(cfg, steps=6)
    study.run_copy_task(longer, whole)
    same, ablation = str(tmp_path / "same"), str(tmp_path / "ablation")
    assert training.fork_run(source, same) == 4
    study.run_copy_task(longer, same)
    columns = [c for c in results.load_history(whole).columns if c.startswith(("train_", "test_"))]
    pd.testing.assert_frame_equal(results.load_history(whole)[columns],
                                  results.load_history(same)[columns])
    # The ablation: 10x the learning rate from step 4 on (the compiled rate, not the
    # checkpoint's, is the one that trains).
    assert training.fork_run(source, ablation) == 4
    study.run_copy_task(dataclasses.replace(longer, learning_rate=0.03), ablation)
    forked = results.load_history(ablation)
    assert forked["step"].tolist() == [2, 4, 6]
    # The shared part's timing comes with its history rows; the fork times its own.
    forked_timing, source_timing = timing.load_timing(ablation), timing.load_timing(source)
    assert forked_timing["step"].tolist() == [2, 4, 6]
    pd.testing.assert_frame_equal(forked_timing.iloc[:2], source_timing.iloc[:2])
    pd.testing.assert_frame_equal(forked[columns].iloc[:2],
                                  results.load_history(source)[columns])
    assert forked["train_loss"].iloc[2] != results.load_history(whole)["train_loss"].iloc[2]
    with open(os.path.join(ablation, training.FORK_FILE)) as f:
        record = json.load(f)
    assert record["step"] == 4 and record["source_settings"]["learning_rate"] == 3e-3
    assert results.saved_settings(ablation)["learning_rate"] == 0.03
    assert training.fork_run(source, ablation) == 4  # a rerun resumes the fork ...
    assert results.load_history(ablation)["step"].tolist() == [2, 4, 6]  # ... as it is
    assert {p: os.path.getmtime(p)
            for p in glob.glob(source + "/**", recursive=True)} == source_files
    with pytest.raises(UsageError, match="already holds a run"):
        training.fork_run(source, whole)
    with pytest.raises(UsageError, match="was forked from"):
        training.fork_run(whole, ablation)


def test_table_layout_and_resume(tmp_path):
    calls = []

    def fake_run(cfg, workdir, extra):
        calls.append((cfg.method, cfg.truncation))
        value = 10 * cfg.truncation + len(cfg.method)
        results.save_results(workdir, {"method": cfg.method}, {"max_length_solved": value})
        return {"max_length_solved": value}

    cfg = study.CopyTaskConfig()
    study.run_table(fake_run, cfg, str(tmp_path), ["bptt", "dni"], [2, 5], "max_length_solved")
    assert calls == [("bptt", 2), ("bptt", 5), ("dni", 2), ("dni", 5)]
    table = pd.read_csv(tmp_path / "table.csv")
    assert len(table) == 4
    markdown = (tmp_path / "table.md").read_text()
    assert "| method | T=2 | T=5 |" in markdown and "| dni | 23 | 53 |" in markdown
    assert (tmp_path / "table.png").exists()
    study.run_table(fake_run, cfg, str(tmp_path), ["bptt", "dni"], [2, 5], "max_length_solved")
    assert len(calls) == 4  # finished runs are read back, not rerun

    # One more T: the table keeps the finished cells of the earlier command, not those
    # made with other settings or not finished.
    results.save_results(str(tmp_path / "dni_T7"), dataclasses.asdict(dataclasses.replace(
        cfg, method="dni", truncation=7, learning_rate=0.1)), {"max_length_solved": 99})
    results.claim_run_directory(str(tmp_path / "dni_aux_T5"), dataclasses.asdict(
        dataclasses.replace(cfg, method="dni_aux", truncation=5)))
    study.run_table(fake_run, cfg, str(tmp_path), ["bptt"], [3], "max_length_solved")
    assert calls[4:] == [("bptt", 3)]
    markdown = (tmp_path / "table.md").read_text()
    assert "| method | T=2 | T=3 | T=5 |" in markdown, markdown
    assert "| bptt | 24 | 34 | 54 |" in markdown and "| dni | 23 | - | 53 |" in markdown
    assert len(pd.read_csv(tmp_path / "table.csv")) == 5


def test_a_table_trains_a_finished_cell_on_to_a_longer_budget_and_refuses_other_settings(
        tmp_path):
    calls = []

    def fake_run(cfg, workdir, extra):
        calls.append((cfg.method, cfg.steps))
        results.save_results(workdir, dataclasses.asdict(cfg), {"max_length_solved": 1})
        return {"max_length_solved": 1}

    cfg = study.CopyTaskConfig(steps=100)
    study.run_table(fake_run, cfg, str(tmp_path), ["bptt", "dni"], [3], "max_length_solved")
    # dni_T3 trained with another learning rate: the table must not read it back as its cell.
    results.save_results(str(tmp_path / "dni_T3"), dataclasses.asdict(
        dataclasses.replace(cfg, method="dni", truncation=3, learning_rate=0.1)), {})
    with pytest.raises(UsageError, match=r"dni_T3 holds a finished run made with other settings: "
                                         r"--learning_rate=0\.1 \(now 0\.003\)"):
        study.run_table(fake_run, cfg, str(tmp_path), ["bptt", "dni"], [3], "max_length_solved")
    calls.clear()
    results.save_results(str(tmp_path / "dni_T3"), dataclasses.asdict(
        dataclasses.replace(cfg, method="dni", truncation=3)), {"max_length_solved": 1})
    study.run_table(fake_run, dataclasses.replace(cfg, steps=200), str(tmp_path),
                    ["bptt", "dni"], [3], "max_length_solved")
    assert calls == [("bptt", 200), ("dni", 200)]  # trained on (resumed), not read back
    # Stopped on its way to 300 steps: its settings.json names 300 (training records its
    # settings first), its results.json is still the 200-step run's. Not finished.
    calls.clear()
    longer = dataclasses.replace(cfg, steps=300)
    results.claim_run_directory(str(tmp_path / "bptt_T3"), dataclasses.asdict(
        dataclasses.replace(longer, method="bptt", truncation=3)))
    study.run_table(fake_run, longer, str(tmp_path), ["bptt"], [3], "max_length_solved")
    assert calls == [("bptt", 300)]


def test_a_finished_single_cell_is_read_back_without_its_checkpoints(tmp_path):
    """On a fresh machine a finished run has only its records (scripts/archive_runs.py
    --restore); rerunning its one-cell command must read it back, not train it again
    from step 0 over its results."""
    import subprocess
    import sys

    cfg = study.CopyTaskConfig(method="dni", truncation=3, steps=4, hidden_size=4,
                               batch_size=2, eval_every=2, eval_batches=1)
    results.save_results(str(tmp_path), dataclasses.asdict(cfg), {"max_length_solved": 7})
    done = subprocess.run(
        [sys.executable, "-m", "experiments.copy_task", f"--workdir={tmp_path}", "--method=dni",
         "--truncation=3", "--steps=4", "--hidden_size=4", "--batch_size=2", "--eval_every=2",
         "--eval_batches=1"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert done.returncode == 0, done.stderr[-2000:]
    assert results.load_results(str(tmp_path))["metrics"] == {"max_length_solved": 7}
    assert not os.path.exists(tmp_path / "history.csv")


def test_sg_lr_scale_multiplies_only_the_modules_step():
    """One window over a carried non-zero state, with a non-zero module: under
    `--sg_lr_scale=s` M's change is s times its change at 1 (Adam's step is
    proportional to its learning rate) and the core's change is the same."""
    import keras
    import numpy as np
    import tensorflow as tf

    chars = np.random.RandomState(0).randint(0, 5, (2, 8)).astype("int32")

    def trained(scale):
        cfg = study.LanguageModelConfig(hidden_size=4, batch_size=2, method="dni", truncation=8,
                                        sg_lr_scale=scale)
        model = study.build_language_model(cfg, vocab_size=5)
        rng = np.random.RandomState(1)
        for v in model.synthetic_gradient.weights:
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
        model.train_state.assign(rng.normal(0, 0.5, model.train_state.shape).astype("float32"))
        before = {"core": [v.numpy() for v in model.core_variables],
                  "sg": [v.numpy() for v in model.sg_variables]}
        keras.utils.set_random_seed(0)
        model.fit(tf.data.Dataset.from_tensors((chars, chars)), epochs=1, verbose=0)
        return {k: [v.numpy() - b for v, b in zip(getattr(model, f"{k}_variables"), before[k])]
                for k in before}

    whole, half = trained(1.0), trained(0.5)
    for a, b in zip(whole["core"], half["core"]):
        np.testing.assert_allclose(b, a, atol=1e-7)
    assert max(np.abs(d).max() for d in whole["sg"]) > 1e-4
    for a, b in zip(whole["sg"], half["sg"]):
        np.testing.assert_allclose(b, 0.5 * a, atol=1e-7)
    with pytest.raises(ValueError, match="sg_lr_scale"):
        study.LanguageModelConfig(sg_lr_scale=0.0).validate()
