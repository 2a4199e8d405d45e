"""The reproduction report: our finished runs beside the published results.

    markdown = build_report(["runs/gd_mnist", "runs/mnist_fcn"], "REPORT.md")
    write_report(["runs/gd_mnist", "runs/mnist_fcn"], "REPORT.md", copy_figures=True)

Each run directory given is what one command wrote: either a sweep root with
its own `results.json` (gradient dropping, threshold updates, the feed-forward
DNI grid, targeted dropout, or any single run) or a table root whose
configurations each have a `results.json` in a subdirectory (Copy / PTB
tables, multi-network comparisons). The study is the one `results.json`
names. For each study the report gives the published claims and numbers with
their source (each study module's `PUBLISHED`), and per run
directory: its budget, how its setup differs from the published one, our
numbers beside the published ones, its figures (linked, or copied beside the
report) and its full configuration. Run directories of one study whose settings
differ only in the seed also get an "across seeds" table: each number's mean
and range over the seeds, marked where some seeds lack it (a table being
completed over several sittings).

What the caller must know: a directory without a `results.json` in it or in
an immediate subdirectory, or one whose study cannot be recognised, raises
`ReportError` (one line, naming the directory). Unfinished sweeps are reported
with whatever their `results.json` files hold; their status is shown.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd

from dni_tf.harness import results, timing
from dni_tf.studies import (dni_feedforward, gradient_drop, multi_network, recurrent_dni,
                            targeted_dropout, threshold_updates)


class ReportError(ValueError):
    """A run directory cannot be reported; the message names it."""


# ------------------------------------------------------------ published results
# Each study module owns its published facts (`PUBLISHED`) and writes its name
# (`STUDY`) into results.json.
Published = results.Published

PUBLISHED: Dict[str, Published] = {
    gradient_drop.STUDY: gradient_drop.PUBLISHED,
    threshold_updates.STUDY: threshold_updates.PUBLISHED,
    dni_feedforward.STUDY: dni_feedforward.PUBLISHED,
    recurrent_dni.COPY_STUDY: recurrent_dni.COPY_PUBLISHED,
    recurrent_dni.LANGUAGE_STUDY: recurrent_dni.LANGUAGE_PUBLISHED,
    multi_network.STUDY: multi_network.PUBLISHED,
    targeted_dropout.STUDY: targeted_dropout.PUBLISHED,
}
STUDY_ORDER = tuple(PUBLISHED)


def study_of(saved: Mapping[str, Any]) -> Optional[str]:
    """The study that wrote a results.json (a key of `PUBLISHED`), or None."""
    return saved.get("study") if saved.get("study") in PUBLISHED else None


# ------------------------------------------------------------------ run sets
@dataclasses.dataclass
class RunSet:
    """What one `--runs` directory holds.

    `root` is its own results.json (None for a table root); `children` maps
    immediate subdirectory names to their results.json; `history` is its own
    history.csv (empty if none).
    """

    path: str
    study: str
    root: Optional[dict]
    children: Dict[str, dict]
    history: pd.DataFrame
    figures: List[str]

    @property
    def config(self) -> dict:
        """The run's configuration; for a table root, the settings its runs share."""
        if self.root is not None:
            return self.root.get("config", {})
        configs = [c.get("config", {}) for c in self.children.values()]
        return {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs[1:])}

    @property
    def varied(self) -> List[str]:
        """Settings that differ between a table root's runs (empty for a sweep root)."""
        if self.root is not None:
            return []
        configs = [c.get("config", {}) for c in self.children.values()]
        keys = sorted({k for c in configs for k in c} - {"flags"})  # flags repeat the settings
        return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]

    def child_history(self, name: str) -> pd.DataFrame:
        return results.load_history(os.path.join(self.path, name))


def load_run_set(path: str) -> RunSet:
    """Reads one run directory; raises ReportError naming it when it cannot be reported."""
    if not os.path.isdir(path):
        raise ReportError(f"--runs={path}: not a directory")
    try:
        root = results.load_results(path)
        children = {}
        for name in sorted(os.listdir(path)):
            child = os.path.join(path, name)
            if os.path.isdir(child):
                loaded = results.load_results(child)
                if loaded is not None:
                    children[name] = loaded
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"--runs={path}: unreadable results.json ({exc})") from None
    if root is None and not children:
        raise ReportError(f"--runs={path}: no {results.RESULTS_FILE} in it or in its immediate "
                          "subdirectories (not a finished run?)")
    saved = root if root is not None else next(iter(children.values()))
    study = study_of(saved)
    if study is None:
        raise ReportError(f"--runs={path}: cannot tell which study wrote it (its results.json "
                          "names no study; configuration keys: "
                          f"{', '.join(sorted(saved.get('config') or {})) or 'none'})")
    figures = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
    return RunSet(path, study, root, children, results.load_history(path), figures)


# ---------------------------------------------------------- per-study tables
def _percent(value) -> Optional[float]:
    return None if value is None or _missing(value) else round(100.0 * float(value), 2)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _accuracy_at(history: pd.DataFrame, step: int, where: Optional[pd.Series] = None):
    """Test accuracy (%) at the evaluation `step`, or None if it was not evaluated."""
    if "test_accuracy" not in history:
        return None
    rows = history if where is None else history[where]
    rows = rows[rows["step"] == step]
    return _percent(rows["test_accuracy"].iloc[-1]) if len(rows) else None


def gradient_drop_history(runs: RunSet) -> pd.DataFrame:
    """The evaluations of a gradient-dropping run directory, always with `keep_prob`:
    a sweep's history.csv; a single run's, with its keep_prob; a sweep still running
    (no history at its root yet), its runs' own histories."""
    history = runs.history
    if not len(history) and runs.root is None:
        frames = [runs.child_history(name).assign(keep_prob=float(child["config"]["keep_prob"]))
                  for name, child in runs.children.items()
                  if "keep_prob" in child.get("config", {})]
        frames = [f for f in frames if len(f)]
        history = pd.concat(frames, ignore_index=True) if frames else history
    if len(history) and "keep_prob" not in history and "keep_prob" in runs.config:
        history = history.assign(keep_prob=float(runs.config["keep_prob"]))
    return history


def gradient_drop_table(runs: RunSet) -> pd.DataFrame:
    """keep_prob rows: ours at a quarter, half and all of the budget, the write-up's at 20k.

    A sweep still running (results.json only in its keep_prob runs so far) gets a
    row per run begun, with what it has reached; an unfinished run has no final."""
    config = runs.config
    steps = int(config.get("steps", 0))
    history = gradient_drop_history(runs)
    if runs.root and "by_keep_prob" in runs.root.get("metrics", {}):
        finals = {float(k): v for k, v in runs.root["metrics"]["by_keep_prob"].items()}
    elif runs.root is not None:
        finals = {float(config["keep_prob"]): runs.root["metrics"]}
    else:
        finals = {float(child["config"]["keep_prob"]): child.get("metrics", {})
                  for child in runs.children.values() if "keep_prob" in child.get("config", {})}
    evaluated = sorted(int(s) for s in history["step"].unique()) if len(history) else []
    # The evaluations nearest below a quarter and a half of the budget.
    earlier = sorted({max((s for s in evaluated if s <= steps * f), default=None)
                      for f in (0.25, 0.5)} - {None, steps})
    rows = []
    for keep_prob, metrics in sorted(finals.items(), reverse=True):
        where = (history["keep_prob"] == keep_prob) if "keep_prob" in history else None
        row = {"keep_prob": keep_prob}
        for at in earlier:
            row[f"ours at {at} %"] = _accuracy_at(history, at, where)
        row[f"ours at {steps} %"] = _percent(metrics.get("test_accuracy"))
        published = gradient_drop.SEED_TEST_ACCURACY.get(keep_prob)
        row[f"write-up at {gradient_drop.SEED_STEPS} (MNIST) %"] = _percent(published)
        row["gradients applied"] = metrics.get("kept_fraction")
        rows.append(row)
    return pd.DataFrame(rows)


def threshold_updates_table(runs: RunSet) -> pd.DataFrame:
    """One row per threshold: accuracy, updates applied vs backprop, cancellation."""
    metrics = runs.root["metrics"]
    per_threshold = ([v for k, v in metrics.items() if k.startswith("T=")]
                     if any(k.startswith("T=") for k in metrics) else [metrics])
    columns = ["threshold", "steps", "test_accuracy", "update_fraction", "cancelled_fraction",
               "notify_fraction"]
    frame = pd.DataFrame([{c: row.get(c) for c in columns} for row in per_threshold])
    frame["test_accuracy"] = frame["test_accuracy"].map(_percent)
    return frame.rename(columns={"test_accuracy": "test accuracy %",
                                 "update_fraction": "weight updates vs backprop"})


def dni_feedforward_table(runs: RunSet) -> pd.DataFrame:
    """Test error % (method x layers), the paper's layout."""
    metrics = runs.root["metrics"]
    config = runs.config
    finals = metrics.get("runs") or [{"method": config["method"], "layers": config["layers"],
                                       **metrics}]
    frame = pd.DataFrame(finals)
    table = frame.pivot_table(index="method", columns="layers", values="test_error") * 100.0
    order = [m for m in ("backprop", "dni", "cdni") if m in table.index]
    table = table.loc[order + [m for m in table.index if m not in order]]
    table.columns = [f"{d} layers, test error %" for d in table.columns]
    return table.reset_index()


# `<method>_T<T>.identical_to_<other>` in a table root: that cell was not run because
# it would train bit-identically to `<other>` at the same T (scripts/copy_table.sh:
# dni_aux below L = T); the report shows `<other>`'s value there and says so.
_IDENTICAL = re.compile(r"^(?P<method>\w+?)_T(?P<t>\d+)\.identical_to_(?P<other>\w+)$")


def identical_cells(runs: RunSet) -> List[Tuple[str, int, str]]:
    """(method, T, the method it is identical to) for each marker file in a table root."""
    if runs.root is not None or not os.path.isdir(runs.path):
        return []
    found = [_IDENTICAL.match(name) for name in sorted(os.listdir(runs.path))]
    return [(m["method"], int(m["t"]), m["other"]) for m in found if m]


def _children_table(runs: RunSet, value: str, label: str) -> pd.DataFrame:
    """method x T table of `value` from `<method>_T<T>/results.json` children (and the
    `identical_cells` markers, which take the value of the method they name)."""
    rows = []
    for name, child in runs.children.items():
        config = child.get("config", {})
        if "method" in config and "truncation" in config:
            rows.append({"method": config["method"], "T": int(config["truncation"]),
                         value: child.get("metrics", {}).get(value)})
    for method, t, other in identical_cells(runs):
        same = [r[value] for r in rows if r["method"] == other and r["T"] == t]
        if same and not any(r["method"] == method and r["T"] == t for r in rows):
            rows.append({"method": method, "T": t, value: same[0]})
    if not rows and runs.root is not None:
        config = runs.config
        rows.append({"method": config["method"], "T": int(config["truncation"]),
                     value: runs.root["metrics"].get(value)})
    frame = pd.DataFrame(rows).pivot_table(index="method", columns="T", values=value)
    frame.columns = [f"T={t}: {label}" for t in frame.columns]
    return frame.reset_index()


def copy_task_table(runs: RunSet) -> pd.DataFrame:
    return _children_table(runs, "max_length_solved", "longest length solved")


def language_model_table(runs: RunSet) -> pd.DataFrame:
    return _children_table(runs, "test_bpc", "test BPC")


def multi_network_table(runs: RunSet) -> pd.DataFrame:
    sources = runs.children or {"": runs.root}
    rows = [{"method": r["config"].get("method"), "tick ratio k": r["config"].get("tick_ratio"),
             "sg context": r["config"].get("sg_context"),
             "A odd/even accuracy %": _percent(r["metrics"].get("test_a_accuracy")),
             "B count-of-3s accuracy %": _percent(r["metrics"].get("test_b_accuracy"))}
            for r in sources.values() if r and "tick_ratio" in r.get("config", {})]
    return pd.DataFrame(rows)


_PRUNED = re.compile(r"^(?:(?P<regime>[^/]+)/)?(?P<kind>weight|unit)_pruned_(?P<fraction>[\d.]+)_accuracy$")


def targeted_dropout_table(runs: RunSet) -> pd.DataFrame:
    """(kind, regime) rows x pruning %, test accuracy %; the published baseline beside."""
    regime_default = runs.config.get("regime")
    cells: Dict[Tuple[str, str], Dict[float, float]] = {}
    for key, value in runs.root["metrics"].items():
        match = _PRUNED.match(key)
        if match:
            regime = match["regime"] or regime_default
            cells.setdefault((match["kind"], regime), {})[float(match["fraction"])] = \
                round(100.0 * value, 1)
    fractions = sorted({f for row in cells.values() for f in row})
    order = list(runs.config.get("regimes") or []) + ["none", "dropout", "targeted_weight",
                                                      "targeted_unit"]
    rows = []
    for kind in ("weight", "unit"):
        for (k, regime), values in sorted(cells.items(), key=lambda item: (
                order.index(item[0][1]) if item[0][1] in order else len(order), str(item[0][1]))):
            if k == kind:
                rows.append({"pruning": kind, "regime": regime,
                             **{f"{f:g}%": values.get(f) for f in fractions}})
        baseline = targeted_dropout.PUBLISHED_BASELINE[kind]
        rows.append({"pruning": kind,
                     "regime": f"published: none, {targeted_dropout.BASELINE_EPOCHS} epochs, "
                               "Fashion-MNIST",
                     **{f"{f:g}%": baseline.get(int(f)) if float(f).is_integer() else None
                        for f in fractions}})
    return pd.DataFrame(rows)


TABLES: Dict[str, Callable[[RunSet], pd.DataFrame]] = {
    "gradient_drop": gradient_drop_table,
    "threshold_updates": threshold_updates_table,
    "dni_feedforward": dni_feedforward_table,
    "copy_task": copy_task_table,
    "language_model": language_model_table,
    "multi_network": multi_network_table,
    "targeted_dropout": targeted_dropout_table,
}


# Columns that identify a row besides the first and the text columns.
TABLE_KEYS: Dict[str, Tuple[str, ...]] = {
    "multi_network": ("method", "tick ratio k", "sg context"),
}
# Settings that may differ between the seeds of one configuration.
_PER_SEED = frozenset({"seed", "seeds", "workdir", "flags", "data_dir"})


@dataclasses.dataclass
class SeedGroup:
    """Run sets of one setting, one per seed (`members`), and any that repeat a
    member's seed (`repeats`: left out of the group, named in its section)."""

    members: List[RunSet]
    repeats: List[RunSet]


def _setup(runs: RunSet, row_settings: frozenset) -> dict:
    """The settings a seed group must share: all but the per-seed ones and, for a
    table root, the settings that tell its rows apart (a seed whose table holds only
    some methods so far shares that method in its `config`)."""
    drop = _PER_SEED | (row_settings if runs.root is None else frozenset())
    return {k: v for k, v in runs.config.items() if k not in drop}


def seed_groups(run_sets: Sequence[RunSet]) -> List[SeedGroup]:
    """Run sets of one study whose settings differ only in the seed (two or more seeds).

    Members keep the order given, one per seed: a later run set repeating a seed
    is the same configuration twice and goes to `repeats`. Runs that trained
    several seeds themselves (a `seeds` list, e.g. a feed-forward DNI grid) are
    not grouped.
    """
    row_settings = {study: frozenset(k for r in run_sets if r.study == study for k in r.varied)
                    for study in {r.study for r in run_sets}}
    by_setup: Dict[str, SeedGroup] = {}
    for runs in run_sets:
        seed = runs.config.get("seed")
        if seed is None or len(runs.config.get("seeds") or []) > 1:
            continue
        setup = _setup(runs, row_settings[runs.study])
        key = json.dumps([runs.study, setup], sort_keys=True, default=str)
        group = by_setup.setdefault(key, SeedGroup([], []))
        seeds = [str(m.config.get("seed")) for m in group.members]
        (group.repeats if str(seed) in seeds else group.members).append(runs)
    return [g for g in by_setup.values() if len(g.members) >= 2]


def _spread(values: List[float], seeds: int) -> str:
    """mean (lowest to highest) over the seeds that have a value; [k of n] when some lack it."""
    if not values:
        return ""
    if len(set(values)) == 1 and len(values) == seeds:
        return f"{values[0]:.4g}"
    mean = sum(values) / len(values)
    text = f"{mean:.4g} ({min(values):.4g} to {max(values):.4g})"
    return text if len(values) == seeds else f"{text} [{len(values)} of {seeds}]"


def across_seeds_table(group: Sequence[RunSet]) -> pd.DataFrame:
    """The study's table with each number replaced by its mean and range over the seeds.

    Rows are matched on the first column, the columns holding text and the
    study's `TABLE_KEYS`; a row some seeds lack is averaged over those that have it.
    """
    study = group[0].study
    tables = [TABLES[study](runs) for runs in group]
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    keys = [c for c in columns if c == columns[0] or c in TABLE_KEYS.get(study, ())
            or any(isinstance(v, str) for t in tables if c in t for v in t[c])]
    stacked = pd.concat(tables, ignore_index=True)
    rows = []
    for _, rows_of_key in stacked.groupby(keys, sort=False, dropna=False):
        row = {k: rows_of_key[k].iloc[0] for k in keys}
        for column in columns:
            if column in keys:
                continue
            values = [float(v) for v in rows_of_key[column] if not _missing(v)]
            row[column] = _spread(values, len(group))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# Figures over a seed group: study -> (the history of one run directory,
# fn({seed: history}, out_dir) -> paths written).
SEED_FIGURES: Dict[str, Tuple[Callable[[RunSet], pd.DataFrame],
                              Callable[[Dict[int, pd.DataFrame], str], List[str]]]] = {
    gradient_drop.STUDY: (gradient_drop_history, gradient_drop.seed_figures),
}


def render_seed_group(group: SeedGroup, out_dir: str, figures_to: Optional[str] = None) -> str:
    """The across-seeds section; with `figures_to`, the study's seed figures are drawn
    there (for studies in `SEED_FIGURES` whose runs have histories) and linked."""
    members = group.members
    names = ", ".join(f"`{os.path.normpath(r.path)}`" for r in members)
    seeds = ", ".join(str(r.config.get("seed")) for r in members)
    lines = [f"### Across seeds: {names}", "",
             f"Seeds {seeds}; every other setting equal. Each number is the mean over the seeds "
             "(lowest to highest); [k of n] where only k of the n seeds have it yet.", ""]
    if group.repeats:
        lines += ["Left out, repeating a seed above: " + ", ".join(
            f"`{os.path.normpath(r.path)}` (seed {r.config.get('seed')})"
            for r in group.repeats) + ".", ""]
    lines.append(results.markdown_table(across_seeds_table(members), "{:.4g}"))
    history_of, draw = SEED_FIGURES.get(members[0].study, (None, None))
    histories = ({r.config.get("seed"): history_of(r) for r in members}
                 if figures_to and draw else {})
    if histories and all(len(h) for h in histories.values()):
        paths = draw(histories, figures_to)
        lines += [" ".join(f"![{os.path.basename(p)}]"
                           f"({os.path.relpath(p, out_dir).replace(os.sep, '/')})"
                           for p in paths), ""]
    return "\n".join(lines)


# ------------------------------------------------------- budget and setup
def _epochs(config: Mapping[str, Any]) -> Optional[float]:
    if config.get("total_steps") and config.get("steps_per_epoch"):
        return round(config["total_steps"] / config["steps_per_epoch"], 2)
    return config.get("epochs")


def budget(runs: RunSet) -> str:
    """One line: training steps (and epochs), batch size, learning rate, data, seed."""
    config = runs.config
    steps = config.get("total_steps") or config.get("steps")
    parts = []
    if steps:
        epochs = _epochs(config) if runs.study == "targeted_dropout" else None
        parts.append(f"{int(steps):,} steps" + (f" ({epochs:g} epochs)" if epochs else ""))
    evaluated = [h["step"].max() for h in
                 [runs.history] + [runs.child_history(name) for name in runs.children] if len(h)]
    if evaluated:
        low, high = int(min(evaluated)), int(max(evaluated))
        # A table built over several sittings can hold cells at different budgets.
        parts.append(f"last evaluation at step {high:,}" if low == high else
                     f"last evaluations at steps {low:,} to {high:,} (the runs differ)")
    for key, label in (("batch_size", "batch"), ("learning_rate", "lr"), ("dataset", "data"),
                       ("task", "task"), ("seed", "seed")):
        if config.get(key) is not None:
            parts.append(f"{label} {config[key]:g}" if isinstance(config[key], float)
                         else f"{label} {config[key]}")
    sources = {r["metrics"].get("data_source") for r in _all_results(runs)
               if isinstance(r.get("metrics"), Mapping) and r["metrics"].get("data_source")}
    if runs.root and "by_keep_prob" in runs.root.get("metrics", {}):
        sources |= {m.get("data_source") for m in runs.root["metrics"]["by_keep_prob"].values()}
    sources.discard(None)
    if sources:
        parts.append("data from " + ", ".join(f"`{s}`" for s in sorted(sources)))
    statuses = [r.get("status", "unknown") for r in _all_results(runs)]
    parts.append("results: " + ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))))
    return "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def wall_time_line(runs: RunSet) -> Optional[str]:
    """One line: the runs' summed wall time, the range per run, the machines, and what
    went untimed; None when no run was timed.

    Reads each run's `timing.csv` (`dni_tf.harness.timing`) against the
    evaluations in its history. Runs from before timings were recorded have no
    timing, or part of one; the line says how many runs and periods it covers.
    """
    # The runs: the subdirectories of a sweep or table (whose own history.csv
    # combines theirs), else the directory itself.
    measured = [timing.wall_time(path, history["step"])
                for path, history in ([(os.path.join(runs.path, name), runs.child_history(name))
                                       for name in runs.children]
                                      or [(runs.path, runs.history)])
                if len(history)]
    timed = [m for m in measured if m.timed]
    if not timed:
        return None
    line = f"Wall time: {_duration(sum(m.seconds for m in timed))}"
    if len(measured) > 1:
        line += (f" over {len(timed)} runs" if len(timed) == len(measured)
                 else f" over {len(timed)} of the {len(measured)} runs")
        if len(timed) > 1:
            line += (f" ({_duration(min(m.seconds for m in timed))} to "
                     f"{_duration(max(m.seconds for m in timed))} each)")
    machines = {name for m in timed for name in m.machines}
    known = sorted(machines - {timing.UNKNOWN_MACHINE})
    if known:
        line += " on " + "; ".join(known)
    if timing.UNKNOWN_MACHINE in machines:
        line += ((", partly" if known else ",") + " on a machine not recorded (periods "
                 "timed from TensorBoard event files)")
    periods, timed_periods = sum(m.periods for m in measured), sum(m.timed for m in measured)
    if timed_periods < periods:
        line += f"; only {timed_periods} of the {periods} evaluation periods were timed"
    return line + "."


def _all_results(runs: RunSet) -> List[dict]:
    return ([runs.root] if runs.root is not None else []) + list(runs.children.values())


def _same(ours, published) -> bool:
    if isinstance(published, (list, tuple)):
        return isinstance(ours, (list, tuple)) and [float(x) for x in ours] == \
            [float(x) for x in published]
    if isinstance(published, float) and isinstance(ours, (int, float)):
        return math.isclose(ours, published, rel_tol=1e-9)
    return ours == published


def setup_differences(runs: RunSet) -> List[str]:
    """How the run's setup differs from the published one, one line per setting."""
    config = dict(runs.config)
    if runs.study == "dni_feedforward" and config.get("width") is None:
        config["width"] = 256  # the library's default is the paper's width
    if runs.study == "targeted_dropout":
        config["epochs"] = _epochs(config)
    lines = []
    for key, published in PUBLISHED[runs.study].setup.items():
        ours = config.get(key)
        if ours is None or _same(ours, published):
            continue
        line = f"`{key}`: {_show(ours)} (published {_show(published)})"
        if key in ("steps", "epochs") and isinstance(ours, (int, float)) and published:
            line += f", {100.0 * ours / published:.3g}% of the published budget"
        lines.append(line)
    return lines


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def configuration_table(config: Mapping[str, Any]) -> str:
    """Every saved setting except the raw command-line flags (they repeat them)."""
    rows = [(k, _show(v)) for k, v in sorted(config.items())
            if k not in ("flags", "?", "v") and not isinstance(v, Mapping)]
    frame = pd.DataFrame(rows, columns=["setting", "value"])
    return results.markdown_table(frame)


# -------------------------------------------------------------- rendering
def _figure_links(runs: RunSet, out_dir: str, copy_to: Optional[str]) -> List[str]:
    links = []
    for name in runs.figures:
        source = os.path.join(runs.path, name)
        if copy_to is not None:
            os.makedirs(copy_to, exist_ok=True)
            target = os.path.join(copy_to, name)
            shutil.copyfile(source, target)
            source = target
        link = os.path.relpath(source, out_dir).replace(os.sep, "/")
        links.append(f"![{name}]({link})")
    return links


def render_run_set(runs: RunSet, out_dir: str, copy_to: Optional[str]) -> str:
    lines = [f"### `{os.path.normpath(runs.path)}`", "", f"Budget: {budget(runs)}.", ""]
    wall = wall_time_line(runs)
    if wall:
        lines += [wall, ""]
    differences = setup_differences(runs)
    if differences:
        lines += ["Differs from the published setup:", ""]
        lines += [f"- {d}" for d in differences] + [""]
    elif PUBLISHED[runs.study].setup:
        given = ", ".join(f"`{k}`" for k in PUBLISHED[runs.study].setup)
        lines += [f"Same setup as published in the only settings the source gives: {given}.", ""]
    lines += [results.markdown_table(TABLES[runs.study](runs), "{:.4g}")]
    identical = identical_cells(runs)
    if identical:
        lines += ["Not run, shown with the value of the run it is identical to (it would "
                  "train bit-identically; marker files in the directory): " + ", ".join(
                      f"{method} at T={t} = {other}" for method, t, other in identical) + ".",
                  ""]
    figures = _figure_links(runs, out_dir, copy_to)
    if figures:
        lines += [" ".join(figures), ""]
    title = "configuration" + (f" (shared by its runs; varied: {', '.join(runs.varied)})"
                               if runs.varied else "")
    lines += [f"<details><summary>{title}</summary>", "",
              configuration_table(runs.config), "</details>", ""]
    return "\n".join(lines)


def _figures_root(out_path: str) -> str:
    """`<out stem>_figures/` beside `out_path`: where copied figures go."""
    stem = os.path.splitext(os.path.basename(out_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(out_path)), f"{stem}_figures")


def _copy_dir(out_path: str, run_dir: str, used: set) -> str:
    """`<out stem>_figures/<run_dir's name>` beside `out_path`, unique among `used`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(run_dir)))
    candidate, index = name, 2
    while candidate in used:
        candidate, index = f"{name}_{index}", index + 1
    used.add(candidate)
    return os.path.join(_figures_root(out_path), candidate)


# ------------------------------------------------------------ an earlier report's sections
# Run directories do not survive a machine; a report regenerated from the runs at hand
# keeps, with `keep_from`, the sections of an earlier report whose runs are not among them.
_LOCATION_PREFIXES = ("docs/run_records/", "runs/")


def _run_key(path: str) -> str:
    """Where a run directory sits, whatever root it was reported from (runs/X and
    docs/run_records/X, the archive's copy, are one run)."""
    path = os.path.normpath(path).replace(os.sep, "/")
    while path.startswith("../"):
        path = path[3:]
    for prefix in _LOCATION_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def earlier_blocks(text: str) -> Dict[str, List[Tuple[frozenset, List[str]]]]:
    """Section title -> [(its runs, lines)] of each `### ` block of an earlier report
    (a run block names one run directory, an across-seeds block several)."""
    sections: Dict[str, List[Tuple[frozenset, List[str]]]] = {}
    title, block = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, block = line[3:].strip(), None
            sections.setdefault(title, [])
        elif line.startswith("### ") and title is not None:
            block = [line]
            runs = frozenset(_run_key(p) for p in re.findall(r"`([^`]+)`", line))
            sections[title].append((runs, block))
        elif block is not None:
            block.append(line)
    return sections


_KEPT_NOTE = "Kept from the earlier"


def _kept_block(lines: List[str], old_dir: str, out_dir: str, source: str) -> str:
    """An earlier report's block, its relative links re-pointed from `old_dir` to `out_dir`."""
    def relink(match):
        target = match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("/", "#")):
            return match.group(0)  # a URL, an absolute path or an anchor: not relative
        moved = os.path.relpath(os.path.join(old_dir, target), out_dir).replace(os.sep, "/")
        return f"{match.group(1)}({moved})"

    body = [re.sub(r"(!?\[[^\]]*\])\(([^)]+)\)", relink, line) for line in lines[1:]
            if not line.startswith(_KEPT_NOTE)]  # kept again: one note
    while body and not body[0].strip():
        body.pop(0)
    note = (f"{_KEPT_NOTE} `{os.path.basename(source)}`: its runs were not among this report's, so its "
            "numbers are as that report gave them.")
    return "\n".join([lines[0], "", note, "", *body]).rstrip() + "\n"


def _figure_dirs_named(blocks, out_path: str, old_dir: str) -> set:
    """Names of `<out stem>_figures/<name>` folders the kept blocks link to (not to reuse)."""
    figures = _figures_root(out_path)
    names = set()
    for _, lines in blocks:
        for target in re.findall(r"\]\(([^)]+)\)", "\n".join(lines)):
            parts = os.path.relpath(os.path.join(old_dir, target), figures).split(os.sep)
            if len(parts) > 1 and parts[0] != os.pardir:
                names.add(parts[0])
    return names


def build_report(run_dirs: Sequence[str], out_path: str, copy_figures: bool = False,
                 keep_from: Optional[str] = None) -> str:
    """The Markdown report for `run_dirs`, with links relative to `out_path`'s directory.

    With `copy_figures`, each run directory's PNG figures are copied to
    `<out stem>_figures/<run dir name>/` beside `out_path` (so the report can be
    committed without the runs), and seed groups with figures over seeds (gradient
    dropping's curves) get them drawn into `<out stem>_figures/across_seeds_<first
    run dir name>/`. With `keep_from` (an earlier report's path), each of its run
    and across-seeds blocks none of whose runs is in `run_dirs` is kept, after the
    new ones of its study and marked as kept (a run and its copy in
    `docs/run_records/` count as one run; its links are re-pointed, and copied
    figures never take a folder name its links use). Raises ReportError for a
    directory that cannot be reported (before copying anything).
    """
    if not run_dirs and not keep_from:
        raise ReportError("--runs: give at least one run directory")
    run_sets = [load_run_set(path) for path in run_dirs]
    out_dir = os.path.dirname(os.path.abspath(out_path))
    earlier: Dict[str, List[Tuple[frozenset, List[str]]]] = {}
    old_dir = out_dir
    if keep_from:
        try:
            with open(keep_from) as f:
                earlier = earlier_blocks(f.read())
        except OSError as exc:
            raise ReportError(f"--keep_from={keep_from}: cannot read ({exc.strerror})") from None
        old_dir = os.path.dirname(os.path.abspath(keep_from))
    reported = {_run_key(r.path) for r in run_sets}
    # A block goes when any of its runs is reported anew (the new numbers replace it).
    kept = {title: [(runs, lines) for runs, lines in blocks if not runs & reported]
            for title, blocks in earlier.items()}
    used = set().union(*(_figure_dirs_named(b, out_path, old_dir) for b in kept.values()))
    lines = ["# Reproduction report", "",
             "Our finished runs beside the published results. Each section states the source, "
             "each run its budget, how its setup differs from the published one, its numbers, "
             "figures and configuration.", ""]
    for study in STUDY_ORDER:
        members = [r for r in run_sets if r.study == study]
        published = PUBLISHED[study]
        carried = kept.pop(published.title, [])
        if not members and not carried:
            continue
        lines += [f"## {published.title}", "", f"Source: {published.source}.", "",
                  "Published claims:", ""]
        lines += [f"- {claim}" for claim in published.claims] + [""]
        for runs in members:
            copy_to = _copy_dir(out_path, runs.path, used) if copy_figures else None
            lines.append(render_run_set(runs, out_dir, copy_to))
        for group in seed_groups(members):
            figures_to = (_copy_dir(out_path, "across_seeds_" + os.path.basename(
                os.path.normpath(group.members[0].path)), used) if copy_figures else None)
            lines.append(render_seed_group(group, out_dir, figures_to))
        lines += [_kept_block(block, old_dir, out_dir, keep_from) for _, block in carried]
    for title, carried in kept.items():  # a section this version no longer writes
        if carried:
            lines += [f"## {title}", ""]
            lines += [_kept_block(block, old_dir, out_dir, keep_from) for _, block in carried]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dirs: Sequence[str], out_path: str, copy_figures: bool = False,
                 keep_from: Optional[str] = None) -> str:
    """Builds the report and writes it atomically to `out_path`; returns the path.

    `out_path` may be `keep_from` itself: the earlier report is read first."""
    text = build_report(run_dirs, out_path, copy_figures, keep_from)
    results.atomic_write_text(out_path, text)
    return out_path
