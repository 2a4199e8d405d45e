"""The reproduction report (dni_tf.studies.report, dni-tf report).

Most tests write small fake run directories in the layout the studies write
(no training); one trains a two-step feed-forward DNI grid on digits and
reports it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

import pandas as pd
import pytest

from dni_tf.harness import results
from dni_tf.studies import report, targeted_dropout


def write_png(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")  # a link target only; never decoded


def fake_gradient_drop(root: str, seed: int = 0, final_0_2: float = 0.8734,
                       learning_rate: float = 1e-4, kept_fraction: bool = True,
                       **extra_config) -> None:
    """A two-keep_prob sweep of 1,000 steps, evaluated every 250, as run_sweep writes it."""
    config = {"keep_probs": [1.0, 0.2], "dataset": "mnist", "steps": 1000, "batch_size": 50,
              "learning_rate": learning_rate, "granularity": "variable",
              "dropped_state": "freeze", "rescale": False, "seed": seed,
              "flags": {"workdir": root, "seed": seed}, **extra_config}
    finals = {"1": {"test_accuracy": 0.9512, "kept_fraction": 1.0, "data_source": "fake"},
              "0.2": {"test_accuracy": final_0_2, "kept_fraction": 0.2, "data_source": "fake"}}
    if not kept_fraction:  # an older run that did not log it
        for metrics in finals.values():
            del metrics["kept_fraction"]
    rows = [{"keep_prob": p, "step": s, "test_accuracy": acc}
            for p, accs in ((1.0, (0.90, 0.93, 0.94, 0.9512)), (0.2, (0.70, 0.81, 0.85, 0.8734)))
            for s, acc in zip((250, 500, 750, 1000), accs)]
    results.write_csv(os.path.join(root, results.HISTORY_FILE), pd.DataFrame(rows))
    for p in ("1", "0.2"):
        results.save_results(os.path.join(root, f"keep_prob_{p}"), {**config, "keep_prob": float(p)},
                             finals[p], study="gradient_drop")
    results.save_results(root, config, {"by_keep_prob": finals}, study="gradient_drop")
    write_png(os.path.join(root, "results_raw.png"))


def fake_copy_table(root: str, seed: int = 0, solved=None) -> None:
    """A method x T table root: results.json only in `<method>_T<T>/`."""
    solved = solved or {("bptt", 2): 3, ("bptt", 5): 6, ("dni", 2): 7, ("dni", 5): 11}
    for (method, t), length in solved.items():
        results.save_results(
            os.path.join(root, f"{method}_T{t}"),
            {"task": "copy", "method": method, "truncation": t, "steps": 400, "batch_size": 32,
             "learning_rate": 3e-3, "sg_scale": 0.1, "seed": seed},
            {"max_length_solved": length}, study="copy_task")


def fake_targeted_dropout(root: str) -> None:
    config = {"regimes": ["none", "targeted_weight"], "dataset": "fashion_mnist",
              "hidden": [1000, 1000, 500, 200], "batch_size": 128, "learning_rate": 1e-3,
              "alpha": 0.5, "gamma": 0.5, "total_steps": 936, "steps_per_epoch": 468}
    metrics = {}
    for regime, accuracy in (("none", 0.612), ("targeted_weight", 0.777)):
        for kind in ("weight", "unit"):
            metrics[f"{regime}/{kind}_pruned_0_accuracy"] = 0.871
            metrics[f"{regime}/{kind}_pruned_80_accuracy"] = accuracy
    results.save_results(root, config, metrics, study="targeted_dropout")


@pytest.fixture
def runs(tmp_path):
    paths = {name: str(tmp_path / "runs" / name) for name in ("gd", "copy", "td")}
    fake_gradient_drop(paths["gd"])
    fake_copy_table(paths["copy"])
    fake_targeted_dropout(paths["td"])
    return paths


def section(text: str, title_start: str) -> str:
    """The report's `## ...` section whose title starts with `title_start`."""
    match = re.search(rf"^## {re.escape(title_start)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section {title_start!r}"
    return match.group(0)


def table_row(text: str, first_cells: str) -> list:
    line = next(l for l in text.splitlines() if l.startswith(f"| {first_cells} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_each_study_gets_its_section_with_our_numbers_beside_the_published(runs, tmp_path):
    out = str(tmp_path / "docs" / "REPORT.md")
    text = report.build_report([runs["td"], runs["gd"], runs["copy"]], out)

    gd = section(text, "Gradient dropping")
    header = table_row(gd, "keep_prob")
    assert header[1:4] == ["ours at 250 %", "ours at 500 %", "ours at 1000 %"]
    assert table_row(gd, "0.2")[1:5] == ["70", "81", "87.34", "89.9"]
    assert table_row(gd, "1")[3:5] == ["95.12", "99.2"]
    assert "`steps`: 1000 (published 20000), 5% of the published budget" in gd
    assert "`dropped_state`: freeze (published zero_gradient)" in gd

    copy = section(text, "Recurrent DNI: Copy")
    assert table_row(copy, "dni")[1:] == ["7", "11"]
    assert "varied: method, truncation" in copy
    assert "Same setup as published in the only settings the source gives: `sg_scale`." in copy

    td = section(text, "Targeted dropout")
    published = targeted_dropout.PUBLISHED_BASELINE["unit"][80]
    assert table_row(td, "unit | targeted_weight")[2:] == ["87.1", "77.7"]
    assert table_row(td, "unit | published: none, 20 epochs, Fashion-MNIST")[3] == f"{published:g}"
    assert "`epochs`: 2 (published 20), 10% of the published budget" in td
    # Sections follow the studies' order, whatever the order of --runs.
    assert text.index("## Gradient dropping") < text.index("## Recurrent DNI") < \
        text.index("## Targeted dropout")


def test_seeds_of_one_setting_get_a_mean_and_range_table(tmp_path):
    root = tmp_path / "runs"
    for seed, final in ((0, 0.80), (1, 0.90), (2, 0.85)):
        # Seed 2 did not log the applied fraction: its rows still match the others'.
        fake_gradient_drop(str(root / f"gd_seed{seed}"), seed=seed, final_0_2=final,
                           kept_fraction=seed != 2)
    fake_gradient_drop(str(root / "gd_other_lr"), seed=3, learning_rate=1e-3)  # not a seed
    fake_gradient_drop(str(root / "gd_seed0_again"), seed=0)  # the same seed twice
    # Runs that trained several seeds each (their `seed` is the first) are no seed group.
    fake_gradient_drop(str(root / "gd_seeds_4_5"), seed=4, seeds=[4, 5])
    fake_gradient_drop(str(root / "gd_seeds_6_7"), seed=6, seeds=[6, 7])
    # Copy: seed 1 has no dni T=5 cell yet; seed 2 only its bptt cells so far.
    fake_copy_table(str(root / "copy0"), seed=0)
    fake_copy_table(str(root / "copy1"), seed=1, solved={("bptt", 2): 2, ("bptt", 5): 6,
                                                        ("dni", 2): 8})
    fake_copy_table(str(root / "copy2"), seed=2, solved={("bptt", 2): 1, ("bptt", 5): 6})
    # Seed 0's dni_aux at T=2 was not run: it would train as dni does (marker file).
    fake_copy_table(str(root / "copy0"), seed=0, solved={("dni_aux", 5): 12})
    (root / "copy0" / "dni_aux_T2.identical_to_dni").write_text("dni reached L=1 < T=2\n")
    paths = [str(root / n) for n in ("gd_seed0", "gd_seed1", "gd_seed2", "gd_other_lr",
                                     "gd_seed0_again", "gd_seeds_4_5", "gd_seeds_6_7",
                                     "copy0", "copy1", "copy2")]
    text = report.build_report(paths, str(tmp_path / "REPORT.md"))

    gd = section(text, "Gradient dropping")
    assert gd.count("### Across seeds") == 1
    across = gd[gd.index("### Across seeds"):]
    assert "gd_seed0`, `" in across and "gd_other_lr" not in across
    assert "gd_seeds_4_5" not in across
    assert "Left out, repeating a seed above: `" in across and "gd_seed0_again` (seed 0)" in across
    assert "Seeds 0, 1, 2; every other setting equal." in across
    assert table_row(across, "0.2")[3:6] == ["85 (80 to 90)", "89.9", "0.2 (0.2 to 0.2) [2 of 3]"]
    assert table_row(across, "1")[3] == "95.12"  # equal in every seed: shown once
    assert len([l for l in across.splitlines() if l.startswith("| 0.2 |")]) == 1

    # With copied figures, the curves over seeds are drawn beside the report.
    text = report.build_report(paths, str(tmp_path / "docs" / "REPORT.md"), copy_figures=True)
    figures = tmp_path / "docs" / "REPORT_figures" / "across_seeds_gd_seed0"
    assert sorted(os.listdir(figures)) == ["results_prorated_seeds.png", "results_raw_seeds.png"]
    assert "![results_raw_seeds.png](REPORT_figures/across_seeds_gd_seed0/results_raw_seeds.png)" \
        in section(text, "Gradient dropping")

    copy = section(text, "Recurrent DNI: Copy")
    across = copy[copy.index("### Across seeds"):]
    assert "Seeds 0, 1, 2;" in across
    assert table_row(across, "bptt")[1:] == ["2 (1 to 3)", "6"]
    assert table_row(across, "dni")[1:] == ["7.5 (7 to 8) [2 of 3]", "11 (11 to 11) [1 of 3]"]
    assert table_row(across, "dni_aux")[1:] == ["7 (7 to 7) [1 of 3]", "12 (12 to 12) [1 of 3]"]
    own = copy[copy.index("copy0`"):copy.index("copy1`")]
    assert table_row(own, "dni_aux")[1:] == ["7", "12"]
    assert "dni_aux at T=2 = dni." in own


def test_seed_curves_of_single_keep_prob_runs_take_keep_prob_from_the_configuration(tmp_path):
    paths = []
    for seed in (0, 1):  # one run each (not a sweep): history.csv has no keep_prob column
        path = str(tmp_path / "runs" / f"gd_half_seed{seed}")
        config = {"keep_prob": 0.5, "dataset": "mnist", "steps": 500, "batch_size": 50,
                  "learning_rate": 1e-4, "seed": seed}
        rows = [{"step": s, "test_accuracy": 0.8 + 0.01 * seed + s / 10_000} for s in (250, 500)]
        results.write_csv(os.path.join(path, results.HISTORY_FILE), pd.DataFrame(rows))
        results.save_results(path, config, {"test_accuracy": 0.85 + 0.01 * seed,
                                            "kept_fraction": 0.5}, study="gradient_drop")
        paths.append(path)
    text = report.build_report(paths, str(tmp_path / "REPORT.md"), copy_figures=True)
    across = text[text.index("### Across seeds"):]
    assert "results_prorated_seeds.png" in across
    assert table_row(across, "0.5")[2] == "85.5 (85 to 86)"


def test_a_gradient_drop_sweep_still_running_reports_its_finished_runs(tmp_path):
    """No results.json or history.csv at the sweep's root yet: only keep_prob 1 is done."""
    paths = []
    for seed, final in ((0, 0.99), (1, 0.98)):
        root = tmp_path / "runs" / f"gd_seed{seed}"
        child = str(root / "keep_prob_1")
        config = {"keep_probs": [1.0, 0.5], "keep_prob": 1.0, "dataset": "mnist", "steps": 1000,
                  "batch_size": 50, "learning_rate": 1e-4, "seed": seed}
        results.save_results(child, config, {"test_accuracy": final, "kept_fraction": 1.0},
                             study="gradient_drop")
        results.write_csv(os.path.join(child, results.HISTORY_FILE), pd.DataFrame(
            [{"step": s, "test_accuracy": final - (1000 - s) / 10_000} for s in (250, 500, 1000)]))
        os.makedirs(root / "keep_prob_0.5")  # running: a history, no results.json yet
        paths.append(str(root))
    text = report.build_report(paths, str(tmp_path / "REPORT.md"), copy_figures=True)
    own = section(text, "Gradient dropping")
    assert table_row(own, "1")[1:4] == ["91.5", "94", "99"]  # at 250, 500 and 1000
    across = own[own.index("### Across seeds"):]
    assert table_row(across, "1")[3] == "98.5 (98 to 99)"
    assert "results_raw_seeds.png" in across


def test_a_table_whose_cells_trained_to_different_steps_says_so(tmp_path):
    root = tmp_path / "copy"
    fake_copy_table(str(root))
    for cell, last in (("bptt_T2", 400), ("dni_T2", 400), ("bptt_T5", 200), ("dni_T5", 400)):
        pd.DataFrame({"step": [100, last], "max_length_solved": [1, 2]}).to_csv(
            root / cell / "history.csv", index=False)
    text = report.build_report([str(root)], str(tmp_path / "REPORT.md"))
    assert "last evaluations at steps 200 to 400 (the runs differ)" in text
    pd.DataFrame({"step": [100, 400], "max_length_solved": [1, 2]}).to_csv(
        root / "bptt_T5" / "history.csv", index=False)
    text = report.build_report([str(root)], str(tmp_path / "REPORT.md"))
    assert "last evaluation at step 400;" in text and "the runs differ" not in text


def test_figures_are_linked_relative_to_the_report_or_copied_beside_it(runs, tmp_path):
    out = tmp_path / "docs" / "REPORT.md"
    for copy in (False, True):
        text = report.build_report([runs["gd"]], str(out), copy_figures=copy)
        (link,) = re.findall(r"!\[results_raw.png\]\(([^)]+)\)", text)
        assert not os.path.isabs(link)
        target = os.path.normpath(os.path.join(out.parent, link))
        assert os.path.exists(target)
        inside_docs = target.startswith(str(out.parent) + os.sep)
        assert inside_docs == copy, link


def test_written_atomically_and_rewritten(runs, tmp_path):
    out = tmp_path / "REPORT.md"
    out.write_text("old")
    report.write_report([runs["copy"]], str(out))
    assert out.read_text().startswith("# Reproduction report")
    assert sorted(os.listdir(tmp_path)) == ["REPORT.md", "runs"]


def make_missing(run_dir):
    pass


def make_without_results(run_dir):
    os.makedirs(os.path.join(run_dir, "child_without_results"))


def make_unknown_study(run_dir):
    results.save_results(run_dir, {"colour": "blue"}, {})


@pytest.mark.parametrize("make, message", [
    (make_missing, "not a directory"),
    (make_without_results, "no results.json in it or in its immediate subdirectories"),
    (make_unknown_study, "cannot tell which study wrote it"),
])
def test_unreportable_directories_raise_naming_them(tmp_path, make, message):
    run_dir = str(tmp_path / "run")
    make(run_dir)
    with pytest.raises(report.ReportError, match=re.escape(message)) as raised:
        report.build_report([run_dir], str(tmp_path / "R.md"))
    assert run_dir in str(raised.value) and "\n" not in str(raised.value)


def run_cli(argv):
    """`dni-tf report ARGV` in this process: (exit code, stderr)."""
    from absl import flags

    from dni_tf.harness import cli
    from dni_tf.apps import report as entry_point

    flags.FLAGS.unparse_flags()
    stderr = io.StringIO()
    old_argv, sys.argv = sys.argv, ["experiments.report", *argv]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli.run(entry_point.main)
        code = 0
    except SystemExit as exc:  # absl's app.run exits, with None on success
        code = 0 if exc.code is None else exc.code
    finally:
        sys.argv = old_argv
        flags.FLAGS.unparse_flags()
    return code, stderr.getvalue()


def test_cli_writes_the_report_and_rejects_bad_runs_with_one_line(runs, tmp_path):
    out = tmp_path / "out" / "REPORT.md"
    code, _ = run_cli([f"--runs={runs['gd']},{runs['copy']}", f"--out={out}"])
    assert code == 0 and "## Gradient dropping" in out.read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, expected in (([f"--runs={empty}", f"--out={out}"], f"--runs={empty}: no results.json"),
                           ([f"--out={out}"], "--runs is required"),
                           ([f"--runs={runs['gd']}"], "--out is required")):
        code, stderr = run_cli(argv)
        assert code == 2, argv
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr
        assert "Traceback" not in stderr


def test_a_run_is_reported_under_the_study_its_results_name(tmp_path):
    # A gradient-dropping config saved by another study is reported as that study.
    run = str(tmp_path / "run")
    results.save_results(run, {"keep_probs": [1.0], "steps": 10}, {"runs": []},
                         study="dni_feedforward")
    assert report.load_run_set(run).study == "dni_feedforward"
    results.save_results(run, {"keep_probs": [1.0], "steps": 10}, {})
    with pytest.raises(report.ReportError, match="names no study"):
        report.load_run_set(run)


def test_a_real_tiny_run(tmp_path):
    from dni_tf.studies.dni_feedforward import DNIConfig, run_grid

    workdir = str(tmp_path / "dni")
    run_grid(DNIConfig(dataset="digits", layers=2, width=8, steps=2, eval_every=2, batch_size=32,
                       learning_rate=1e-3), ["cdni"], [2], workdir)
    text = report.build_report([workdir], str(tmp_path / "REPORT.md"))
    final = results.load_results(os.path.join(workdir, "fcn2_cdni"))["metrics"]
    assert table_row(text, "cdni")[1] == f"{100 * final['test_error']:.4g}"
    assert "`steps`: 2 (published 500000)" in text
    assert "`width`: 8 (published 256)" in text
    assert "![test_error.png](dni/test_error.png)" in text


def test_an_earlier_reports_sections_are_kept_for_runs_no_longer_at_hand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_gradient_drop("runs/gd")
    fake_copy_table("runs/copy")
    report.write_report(["runs/gd", "runs/copy"], "docs/REPORT.md", copy_figures=True)
    with open("docs/REPORT.md", "a") as f:  # links that are not relative paths stay as they are
        f.write("\n### `runs/other`\n\nSee [the paper](https://arxiv.org/abs/1608.05343), "
                "[the table](#table) and [HTTPS](HTTPS://example.org/a).\n")
    # A later sitting: runs/ is gone; the Copy table's archived copy has new numbers,
    # and a new gradient-dropping run has the same folder name as the old one.
    fake_copy_table("docs/run_records/copy", solved={("bptt", 2): 4, ("dni", 2): 9})
    fake_gradient_drop("runs/seed1/gd", seed=1, final_0_2=0.5)
    for name in ("gd", "copy"):
        os.rename(f"runs/{name}", f"gone_{name}")
    for out in ("docs/REPORT.md", "elsewhere/R2.md"):
        text = report.build_report(["docs/run_records/copy", "runs/seed1/gd"], out,
                                   copy_figures=True, keep_from="docs/REPORT.md")
        gd = section(text, "Gradient dropping")
        assert "### `runs/gd`" in gd and "### `runs/seed1/gd`" in gd
        kept = gd.split("### `runs/gd`")[1].split("###")[0]
        assert "Kept from the earlier `REPORT.md`" in kept and "87.34" in kept
        (old_link,) = re.findall(r"!\[results_raw.png\]\(([^)]+)\)", kept)
        target = os.path.normpath(os.path.join(os.path.dirname(out), old_link))
        assert target == os.path.normpath("docs/REPORT_figures/gd/results_raw.png")
        assert os.path.exists(target)
        new = gd.split("### `runs/seed1/gd`")[1].split("###")[0]
        (new_link,) = re.findall(r"!\[results_raw.png\]\(([^)]+)\)", new)
        # The kept block's figure folder is not reused for the new run's figures.
        assert os.path.normpath(os.path.join(os.path.dirname(out), new_link)) != target
        # The Copy table reported anew replaces the earlier block of the same run.
        copy = section(text, "Recurrent DNI: Copy")
        assert "`runs/copy`" not in copy and "### `docs/run_records/copy`" in copy
        assert table_row(copy, "dni")[1] == "9" and copy.count("Kept from") == 1  # runs/other
        assert ("[the paper](https://arxiv.org/abs/1608.05343), [the table](#table) and "
                "[HTTPS](HTTPS://example.org/a)") in text
    assert report.build_report(["runs/seed1/gd"], "docs/R3.md").count("Kept from") == 0
    # Regenerated again from the same runs: the kept blocks keep one note each.
    report.write_report(["docs/run_records/copy", "runs/seed1/gd"], "docs/REPORT.md",
                        keep_from="docs/REPORT.md")
    again = report.build_report(["docs/run_records/copy", "runs/seed1/gd"], "docs/REPORT.md",
                                keep_from="docs/REPORT.md")
    assert again.count("Kept from") == 2 and "### `runs/gd`" in again
