"""Mutation check: known-wrong edits to the library must each fail some test.

Each mutant replaces one exact snippet of a library file with a deliberately
wrong one, runs the tests that should notice, and restores the file. A mutant
"survives" when those tests still pass: then the suite no longer guards the
behaviour the mutant names. Every mutant listed here must be killed.

    python scripts/mutants.py            # all mutants (a few minutes on two cores)
    python scripts/mutants.py --list     # names only
    python scripts/mutants.py NAME ...   # the named ones (substring match)

Exit status: 0 when every mutant was killed, 1 when any survived, 2 when a
snippet is no longer in its file (the list needs updating with the code).
Not run by CI (it reruns tests many times); run it after changing an algorithm.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from typing import List, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # relative to the repository root
    original: str      # must occur exactly once in the file
    mutated: str
    tests: Sequence[str]  # pytest node ids (files or tests) that must fail


MUTANTS: List[Mutant] = [
    # -- gradient dropping -------------------------------------------------
    Mutant("gradient dropping: variable granularity drops whole layers",
           "dni_tf/gradient_dropping.py",
           "self._groups = list(range(len(variables)))", "self._groups = layer_groups(variables)",
           ["tests/test_gradient_dropping.py::test_variable_granularity_drops_kernel_and_bias_independently"]),
    Mutant("gradient dropping: masks multiply (a dropped NaN stays NaN)",
           "dni_tf/gradient_dropping.py",
           "ops.where(m, g * (1.0 / self.keep_prob) if self.rescale else g,\n"
           "                          ops.zeros_like(g))",
           "g * ops.cast(m, g.dtype) * (1.0 / self.keep_prob if self.rescale else 1.0)",
           ["tests/test_gradient_dropping.py::test_a_dropped_non_finite_gradient_never_reaches_the_weights"]),
    Mutant("gradient dropping: rescale ignored",
           "dni_tf/gradient_dropping.py",
           "g * (1.0 / self.keep_prob) if self.rescale else g", "g",
           ["tests/test_gradient_dropping.py::test_rescale_multiplies_kept_gradients_and_zeroes_the_rest"]),
    Mutant("gradient dropping: element rescale ignored",
           "dni_tf/gradient_dropping.py",
           "g * (1.0 / self.keep_prob) if self.rescale else g",
           "g * (1.0 / self.keep_prob) if self.rescale and self.granularity != 'element' else g",
           ["tests/test_gradient_dropping.py::test_rescale_multiplies_kept_gradients_and_zeroes_the_rest"]),
    Mutant("gradient dropping: freeze restores the variable but not its Adam slots",
           "dni_tf/gradient_dropping.py",
           "for target, old_value in zip([v, *slot], old):", "for target, old_value in zip([v], old):",
           ["tests/test_gradient_dropping.py::test_freeze_leaves_adam_moments_of_dropped_variables_untouched"]),
    Mutant("gradient dropping: a lost replica's gradient multiplied by 0, not selected away",
           "dni_tf/gradient_dropping.py",
           "ops.where(mine, g * ops.cast(weight, g.dtype), ops.zeros_like(g))",
           "g * ops.cast(weight, g.dtype)",
           ["tests/test_gradient_dropping.py::test_replica_granularity_drops_a_lost_replicas_non_finite_gradient"]),
    Mutant("gradient dropping: keep_prob compared the wrong way round",
           "dni_tf/gradient_dropping.py",
           "group_kept = self._uniform((num_groups,)) < self.keep_prob",
           "group_kept = self._uniform((num_groups,)) >= self.keep_prob",
           ["tests/test_gradient_dropping.py::test_keep_prob_one_is_exactly_plain_backprop"]),
    # -- threshold updates -------------------------------------------------
    Mutant("threshold: sparse backward never gates (notify mask never set)",
           "dni_tf/threshold_updates.py",
           "layer.notify_mask.assign(ops.cast(unit, layer.notify_mask.dtype))", "pass",
           ["tests/test_threshold_updates.py::test_sparse_backward_stops_the_layers_below_when_nothing_upstream_fires"]),
    Mutant("threshold: non-finite gradients not counted",
           "dni_tf/threshold_updates.py",
           "self.nonfinite_step_count.assign_add(ops.cast(self._nonfinite, \"int64\"))", "pass",
           ["tests/test_threshold_updates.py::test_non_finite_gradient_is_counted_as_divergence",
            "tests/test_threshold_updates.py::test_training_stops_on_a_non_finite_gradient_and_keeps_the_last_good_checkpoint"]),
    Mutant("threshold: accumulator not reset when it fires",
           "dni_tf/threshold_updates.py",
           "remaining = ops.where(fired, 0.0, total)", "remaining = total",
           ["tests/test_threshold_updates.py"]),
    Mutant("threshold: only positive accumulators fire",
           "dni_tf/threshold_updates.py",
           "fired = ops.greater(ops.abs(total), self.threshold)",
           "fired = ops.greater(total, self.threshold)",
           ["tests/test_threshold_updates.py"]),
    Mutant("threshold: fires at |acc| >= T instead of > T",
           "dni_tf/threshold_updates.py",
           "fired = ops.greater(ops.abs(total), self.threshold)",
           "fired = ops.greater_equal(ops.abs(total), self.threshold)",
           ["tests/test_threshold_updates.py"]),
    Mutant("threshold: normalized accumulation without bias correction",
           "dni_tf/threshold_updates.py",
           "increment = g / (ops.sqrt(v_new / correction) + self.epsilon)",
           "increment = g / (ops.sqrt(v_new) + self.epsilon)",
           ["tests/test_threshold_updates.py"]),
    Mutant("threshold: decay accumulation does not decay",
           "dni_tf/threshold_updates.py",
           "increment, total = g, self.decay * acc + g", "increment, total = g, acc + g",
           ["tests/test_threshold_updates.py"]),
    # -- shared ----------------------------------------------------------------
    Mutant("random streams: floats drawn by TensorFlow (other numbers under XLA)",
           "dni_tf/random_streams.py",
           "return _unit(words(shape, seed))",
           "return tf.random.stateless_uniform(shape, seed=seed, alg=\"philox\")",
           ["tests/test_random_streams.py::test_xla_draws_the_same_numbers_as_graph_mode",
            "tests/test_conformance.py::test_jit_compile"]),
    Mutant("divergence guard ignores nonfinite_* counts",
           "dni_tf/callbacks.py",
           "if key.startswith(\"nonfinite_\") and np.any(value > 0):",
           "if False:",
           ["tests/test_threshold_updates.py::test_training_stops_on_a_non_finite_gradient_and_keeps_the_last_good_checkpoint"]),
    # -- feed-forward DNI ----------------------------------------------------
    Mutant("dni: module target B times too small", "dni_tf/dni_feedforward.py",
           "target = input_grads[k] * units / scale", "target = input_grads[k] / scale",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: module target B times too large", "dni_tf/dni_feedforward.py",
           "target = input_grads[k] * units / scale",
           "target = input_grads[k] * units * units / scale",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: BP(lambda) true-gradient term in batch-mean units", "dni_tf/dni_feedforward.py",
           "self.lambda_mix * true_grads[k] * units", "self.lambda_mix * true_grads[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: bootstrapped target not unscaled by sg_scale", "dni_tf/dni_feedforward.py",
           "scale = 1.0 if k == num_points - 1 else self.sg_scale", "scale = 1.0",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: sg_scale not applied to the layers' synthetic gradient",
           "dni_tf/dni_feedforward.py",
           "cotangents = [self.sg_scale * p / units for p in sg_preds]",
           "cotangents = [p / units for p in sg_preds]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: complete unlock feeds the real activation, not I(x)",
           "dni_tf/dni_feedforward.py",
           "h = tf.stop_gradient(pred)", "h = real",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: diagnostics against the bootstrapped target, not the true gradient",
           "dni_tf/dni_feedforward.py",
           "true = true_grads[k] * units", "true = targets[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: batch-mean units instead of per-example units", "dni_tf/dni_feedforward.py",
           "units = batch * float(replicas)", "units = float(replicas)",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    # -- recurrent DNI -------------------------------------------------------
    Mutant("recurrent dni: synthetic gradient read at the window's first state",
           "dni_tf/truncated_bptt.py",
           "sg_next = tf.stop_gradient(self._predict_sg(new_s))",
           "sg_next = tf.stop_gradient(self._predict_sg(s))",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
    Mutant("recurrent dni: module regressed at the window's last state",
           "dni_tf/truncated_bptt.py",
           "regression_loss(self._predict_sg(s), state_grad)",
           "regression_loss(self._predict_sg(new_s), state_grad)",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
    # The core still gets 0.1 * M; only the gradient reaching s_k (M's target) changes.
    Mutant("recurrent dni: bootstrap dropped from the module target",
           "dni_tf/truncated_bptt.py",
           "objective += inject * surrogate_objective(new_s, self.sg_scale * sg_next, batch)",
           "objective += inject * surrogate_objective(self._run_core(xs, tf.stop_gradient(s), "
           "self._valid(k, t, n, batch))[1], self.sg_scale * sg_next, batch)",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
    Mutant("recurrent dni: bootstrap in the module target left unscaled",
           "dni_tf/truncated_bptt.py",
           "objective += inject * surrogate_objective(new_s, self.sg_scale * sg_next, batch)",
           "objective += inject * (surrogate_objective(new_s, sg_next, batch) - "
           "surrogate_objective(self._run_core(xs, tf.stop_gradient(s), "
           "self._valid(k, t, n, batch))[1], (1.0 - self.sg_scale) * sg_next, batch))",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
    Mutant("recurrent dni: synthetic gradient injected unscaled", "dni_tf/truncated_bptt.py",
           "self.sg_scale * sg_next", "sg_next",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
    Mutant("recurrent dni: episode end regressed onto nothing", "dni_tf/truncated_bptt.py",
           "end = tf.where(is_last, 1.0, 0.0)", "end = tf.where(is_last, 0.0, 0.0)",
           ["tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"]),
]


def _run_tests(tests: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", *tests],
        cwd=REPO_ROOT, capture_output=True, text=True)


def check(mutant: Mutant) -> str:
    """'killed', 'survived' or 'stale' (the original snippet is not in the file once)."""
    path = os.path.join(REPO_ROOT, mutant.path)
    with open(path) as f:
        source = f.read()
    if source.count(mutant.original) != 1:
        return "stale"
    try:
        with open(path, "w") as f:
            f.write(source.replace(mutant.original, mutant.mutated))
        result = _run_tests(mutant.tests)
    finally:
        with open(path, "w") as f:
            f.write(source)
    # pytest exit 1: tests failed (killed); 0: all passed (survived); else an error.
    if result.returncode == 0:
        return "survived"
    if result.returncode == 1:
        return "killed"
    return f"error (pytest exit {result.returncode}): " + result.stdout.strip().splitlines()[-1:][0] \
        if result.stdout.strip() else f"error (pytest exit {result.returncode})"


def main(argv: Sequence[str]) -> int:
    if "--list" in argv:
        for mutant in MUTANTS:
            print(mutant.name)
        return 0
    wanted = [a for a in argv if not a.startswith("-")]
    selected = [m for m in MUTANTS if not wanted or any(w in m.name for w in wanted)]
    if not selected:
        print(f"no mutant matches {' '.join(wanted)}; --list shows them", file=sys.stderr)
        return 2
    outcomes = {}
    for i, mutant in enumerate(selected, 1):
        start = time.time()
        outcomes[mutant.name] = outcome = check(mutant)
        print(f"[{i}/{len(selected)}] {outcome:8s} {mutant.name} ({time.time() - start:.0f} s)",
              flush=True)
    survived = [n for n, o in outcomes.items() if o == "survived" or o.startswith("error")]
    stale = [n for n, o in outcomes.items() if o == "stale"]
    print(f"{len(selected) - len(survived) - len(stale)}/{len(selected)} killed"
          + (f"; survived or errored: {', '.join(survived)}" if survived else "")
          + (f"; stale snippets: {', '.join(stale)}" if stale else ""))
    return 2 if stale else (1 if survived else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
