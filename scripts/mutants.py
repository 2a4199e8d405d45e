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
           "dni_tf/harness/callbacks.py",
           "if key.startswith(\"nonfinite_\") and np.any(value > 0):",
           "if False:",
           ["tests/test_threshold_updates.py::test_training_stops_on_a_non_finite_gradient_and_keeps_the_last_good_checkpoint"]),
    Mutant("config: NaN passes a range check",
           "dni_tf/harness/config.py",
           "        if not math.isfinite(value):",
           "        if False:",
           ["tests/test_config.py"]),
    Mutant("config: checks across fields run for the first grid run only",
           "dni_tf/harness/config.py",
           "for combination in itertools.product(*grid.values()) if grid else [()]:",
           "for combination in [()]:",
           ["tests/test_config.py::test_checks_across_fields_run_for_every_grid_combination"]),
    Mutant("config: a preset overrides a flag given on the command line",
           "dni_tf/harness/config.py",
           "if name in preset and not flag_values[name].present:",
           "if name in preset:",
           ["tests/test_config.py::test_a_preset_fills_in_what_the_command_line_does_not_give"]),
    # -- targeted dropout ------------------------------------------------------
    Mutant("targeted dropout: one mask for every step (seed ignores the step)",
           "dni_tf/targeted_dropout.py",
           "return tf.stack([tf.constant(self.seed % (2**31 - 1), tf.int32), step])",
           "return tf.stack([tf.constant(self.seed % (2**31 - 1), tf.int32), 0 * step])",
           ["tests/test_targeted_dropout.py::test_unit_and_weight_masks_are_fresh_every_step"]),
    Mutant("targeted dropout: weights outside the target set dropped too",
           "dni_tf/targeted_dropout.py",
           "drop = target & bernoulli_mask(kernel.shape, alpha, self._seed())",
           "drop = (target | (tf.abs(kernel) < 2 * threshold[None, :])) & "
           "bernoulli_mask(kernel.shape, alpha, self._seed())",
           ["tests/test_targeted_dropout.py::test_drop_rate_inside_the_target_set_is_alpha"]),
    Mutant("targeted dropout: units outside the target set dropped too",
           "dni_tf/targeted_dropout.py",
           "drop = target & bernoulli_mask([self.units], alpha, self._seed())",
           "drop = bernoulli_mask([self.units], alpha, self._seed())",
           ["tests/test_targeted_dropout.py::test_drop_rate_inside_the_target_set_is_alpha"]),
    Mutant("targeted dropout: targets dropped with probability 1 - alpha",
           "dni_tf/targeted_dropout.py",
           "return tf.cast(halves, tf.int32) < cutoff",
           "return tf.cast(halves, tf.int32) >= cutoff",
           ["tests/test_targeted_dropout.py::test_drop_rate_inside_the_target_set_is_alpha"]),
    Mutant("targeted dropout: unit variant zeroes the bias of dropped units",
           "dni_tf/targeted_dropout.py",
           "            if bias is not None and self.drop_bias:\n"
           "                bias = bias * keep\n"
           "        self.step.assign_add(1)",
           "            if bias is not None:\n"
           "                bias = bias * keep\n"
           "        self.step.assign_add(1)",
           ["tests/test_targeted_dropout.py::test_unit_variant_drops_kernel_columns_and_never_touches_the_bias"]),
    Mutant("targeted dropout: ramp without the 0.95 gamma midpoint (gamma linear)",
           "dni_tf/targeted_dropout.py",
           "RAMP_MIDPOINT_FRACTION = 0.95", "RAMP_MIDPOINT_FRACTION = 0.5",
           ["tests/test_targeted_dropout.py::test_gamma_schedule_hand_computed"]),
    Mutant("targeted dropout: the paper's ramp also ramps alpha",
           "dni_tf/targeted_dropout.py",
           "if ramp == \"official\":", "if True:",
           ["tests/test_targeted_dropout.py::test_gamma_schedule_hand_computed"]),
    Mutant("targeted dropout: target count rounded up",
           "dni_tf/targeted_dropout.py",
           "tf.floor(tf.cast(fraction, tf.float32) * n + 1e-6)",
           "tf.math.ceil(tf.cast(fraction, tf.float32) * n - 1e-6)",
           ["tests/test_targeted_dropout.py::test_gamma_schedule_hand_computed"]),
    Mutant("targeted dropout: remove_targets evaluation is the dense layer",
           "dni_tf/targeted_dropout.py",
           "elif self.evaluation == \"remove_targets\":", "elif False:",
           ["tests/test_targeted_dropout.py::test_remove_targets_evaluation_equals_a_hand_pruned_copy",
            "tests/test_targeted_dropout.py::test_remove_targets_sweep_at_zero_equals_weight_pruning_at_gamma"]),
    Mutant("targeted dropout: remove_targets removes one weight too many per column",
           "dni_tf/targeted_dropout.py",
           "keep = tf.abs(self._kernel_value()) >= self.ranked_threshold()[None, :]",
           "keep = tf.abs(self._kernel_value()) > self.ranked_threshold()[None, :]",
           ["tests/test_targeted_dropout.py::test_remove_targets_evaluation_equals_a_hand_pruned_copy"]),
    Mutant("targeted dropout: radix select skips the last bit",
           "dni_tf/targeted_dropout.py",
           "for bit in range(30, -1, -1):", "for bit in range(30, 0, -1):",
           ["tests/test_targeted_dropout.py::test_radix_select_threshold_equals_sorting"]),
    # -- feed-forward DNI ----------------------------------------------------
    Mutant("dni: module target B times too small", "dni_tf/dni_feedforward.py",
           "target = arriving[k] * units / scales[k]", "target = arriving[k] / scales[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: module target B times too large", "dni_tf/dni_feedforward.py",
           "target = arriving[k] * units / scales[k]",
           "target = arriving[k] * units * units / scales[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: target_mix true-gradient term in loss units", "dni_tf/dni_feedforward.py",
           "self.target_mix * true_grads[k] * units", "self.target_mix * true_grads[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: bootstrapped target not unscaled by sg_scale", "dni_tf/dni_feedforward.py",
           "1.0 if (k == num_points - 1 or lam > 0.0) else self.sg_scale", "1.0",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: sg_scale not applied to the layers' synthetic gradient", "dni_tf/dni_feedforward.py",
           "cotangents = [(1.0 - lam) * self.sg_scale * p / units for p in sg_preds]",
           "cotangents = [(1.0 - lam) * p / units for p in sg_preds]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: BP(lambda) synthetic term not weighted by 1 - lambda", "dni_tf/dni_feedforward.py",
           "cotangents = [(1.0 - lam) * self.sg_scale * p / units for p in sg_preds]",
           "cotangents = [self.sg_scale * p / units for p in sg_preds]",
           ["tests/test_dni_feedforward.py::test_bp_lambda_one_is_backprop_for_any_sg_scale"]),
    Mutant("dni: BP(lambda) passes nothing from above (only the targets mix)", "dni_tf/dni_feedforward.py",
           "h = _scale_backward(h, lam)", "h = tf.stop_gradient(h)",
           ["tests/test_dni_feedforward.py::test_bp_lambda_one_is_backprop_for_any_sg_scale"]),
    Mutant("dni: BP(lambda) module targets built from scaled synthetic gradients", "dni_tf/dni_feedforward.py",
           "output_gradients=[*[(1.0 - lam) * p / units for p in sg_preds]",
           "output_gradients=[*[(1.0 - lam) * self.sg_scale * p / units for p in sg_preds]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: complete unlock feeds the real activation, not I(x)", "dni_tf/dni_feedforward.py",
           "h = tf.stop_gradient(pred)", "h = tf.stop_gradient(h)",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: complete unlock real-chain targets replaced by the chained ones", "dni_tf/dni_feedforward.py",
           "r = tf.stop_gradient(self._run_block(i, r, training=True))",
           "r = tf.stop_gradient(outputs[i])",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: complete unlock moving statistics left to the synthetic inputs", "dni_tf/dni_feedforward.py",
           "for v, value in saved_moving:", "for v, value in []:",
           ["tests/test_dni_feedforward.py::test_complete_unlock_moving_statistics_follow_the_real_chain"]),
    Mutant("dni: diagnostics against the bootstrapped target, not the true gradient", "dni_tf/dni_feedforward.py",
           "true = true_grads[k] * units", "true = targets[k]",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: summed-update cosine against the used gradient, not the true one", "dni_tf/dni_feedforward.py",
           "outputs[j], block_vars[j], output_gradients=true_grads[j],",
           "outputs[j], block_vars[j], output_gradients=cotangents[j],",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: batch-mean units instead of per-example units", "dni_tf/dni_feedforward.py",
           "units = batch * float(replicas)", "units = float(replicas)",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: per-example units instead of batch-mean units", "dni_tf/dni_feedforward.py",
           "units = tf.constant(float(replicas))", "units = batch * float(replicas)",
           ["tests/test_dni_feedforward.py::test_one_step_matches_a_hand_computed_dni_step"]),
    Mutant("dni: auto units the same for dni and cdni", "dni_tf/dni_feedforward.py",
           'return "batch_mean" if method == "dni" else "per_example"', 'return "per_example"',
           ["tests/test_dni_feedforward.py::test_auto_defaults_pick_the_point_and_units_per_method"]),
    Mutant("dni: pre-ReLU FCN split drops the ReLU", "dni_tf/dni_feedforward.py",
           "        if pre and i > 0:\n            parts.append(keras.layers.ReLU())\n",
           "",
           ["tests/test_dni_feedforward.py::test_decoupling_points_move_but_the_network_function_does_not"]),
    Mutant("dni: sparse updates step skipped blocks too", "dni_tf/dni_feedforward.py",
           "tf.cond(selected, update, lambda: tf.constant(False))", "update()",
           ["tests/test_dni_feedforward.py::test_sparse_updates_count_each_blocks_own_steps_and_follow_the_global_lr"]),
    Mutant("dni: sample weights silently dropped", "dni_tf/dni_feedforward.py",
           "if sample_weight is not None and self.points:", "if False:",
           ["tests/test_dni_feedforward.py::test_sample_weight_class_weight_and_a_summed_loss_are_refused"]),
    Mutant("dni: a sum-reduced loss accepted", "dni_tf/dni_feedforward.py",
           "if reduction is not None and reduction not in _GOOD_REDUCTIONS:", "if False:",
           ["tests/test_dni_feedforward.py::test_sample_weight_class_weight_and_a_summed_loss_are_refused"]),
    Mutant("dni: input_norm offset with the wrong sign", "dni_tf/dni_feedforward.py",
           "keras.layers.Rescaling(1.0 / std, offset=-mean / std)",
           "keras.layers.Rescaling(1.0 / std, offset=mean / std)",
           ["tests/test_dni_feedforward.py::test_fcn_input_norm_output_norm_init_and_batch_norm_options"]),
    Mutant("dni: output_norm ignored", "dni_tf/dni_feedforward.py",
           "    if output_norm:  # batch norm's offset replaces the bias\n        last.append(norm())\n",
           "",
           ["tests/test_dni_feedforward.py::test_fcn_input_norm_output_norm_init_and_batch_norm_options"]),
    Mutant("dni: torch init as He-uniform", "dni_tf/dni_feedforward.py",
           'VarianceScaling(1.0 / 3.0, "fan_in", "uniform", seed=seed)',
           'VarianceScaling(2.0, "fan_in", "uniform", seed=seed)',
           ["tests/test_dni_feedforward.py::test_fcn_input_norm_output_norm_init_and_batch_norm_options"]),
    Mutant("dni: bn_momentum not passed on", "dni_tf/dni_feedforward.py",
           "keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon)",
           "keras.layers.BatchNormalization(epsilon=bn_epsilon)",
           ["tests/test_dni_feedforward.py::test_fcn_input_norm_output_norm_init_and_batch_norm_options"]),
    Mutant("dni: sg_lr_scale ignored", "dni_tf/dni_feedforward.py",
           "v.assign(old + self.sg_lr_scale * (v.value - old))", "pass",
           ["tests/test_dni_feedforward.py::test_sg_lr_scale_multiplies_only_the_modules_steps"]),
    Mutant("dni: sg_lr_scale applied to every weight", "dni_tf/dni_feedforward.py",
           "scaled_modules = [(v, tf.identity(v.value)) for v in module_vars]",
           "scaled_modules = [(v, tf.identity(v.value)) for v in self.trainable_variables]",
           ["tests/test_dni_feedforward.py::test_sg_lr_scale_multiplies_only_the_modules_steps"]),
    Mutant("dni: sg_lr_scale reads the modules after the update", "dni_tf/dni_feedforward.py",
           "                                      *[old for _, old in scaled_modules]]):\n"
           "            self.optimizer.apply([tf.identity(grad_of[id(v)]) for v in free], free)\n",
           "                                      ]):\n"
           "            self.optimizer.apply([tf.identity(grad_of[id(v)]) for v in free], free)\n"
           "        scaled_modules = [(v, tf.identity(v.value)) for v, _ in scaled_modules]\n",
           ["tests/test_dni_feedforward.py::test_sg_lr_scale_multiplies_only_the_modules_steps"]),
    Mutant("dni study: sg_lr_scale not passed to the model", "dni_tf/studies/dni_feedforward.py",
           "sg_lr_scale=config.sg_lr_scale, method=config.method", "method=config.method",
           ["tests/test_dni_feedforward.py::test_study_config_reaches_the_model"]),
    Mutant("dni study: input statistics not used", "dni_tf/studies/dni_feedforward.py",
           "input_norm=input_norm if config.input_norm else None", "input_norm=None",
           ["tests/test_dni_feedforward.py::test_study_config_reaches_the_model"]),
    Mutant("dni study: Adam epsilon left at Keras' default", "dni_tf/studies/dni_feedforward.py",
           "                                                  epsilon=config.adam_epsilon),",
           "                                                  ),",
           ["tests/test_dni_feedforward.py::test_study_config_reaches_the_model"]),
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
