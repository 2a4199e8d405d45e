"""Mutation check: known-wrong edits to the library must each fail some test.

Each mutant replaces one exact snippet of a library file with a deliberately
wrong one, runs the tests that should notice, and restores the file. A mutant
"survives" when those tests still pass: then the suite no longer guards the
behaviour the mutant names. Every mutant listed here must be killed.

    python scripts/mutants.py            # all mutants (a few minutes on two cores)
    python scripts/mutants.py --list     # names only
    python scripts/mutants.py NAME ...   # the named ones (substring match)
    python scripts/mutants.py --help     # this text (any other option: exit 2)

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


REF = "tests/test_truncated_bptt.py::test_one_batch_matches_hand_written_recurrent_dni"

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
    Mutant("gradient dropping: the fused element step applies without the drawn masks",
           "dni_tf/gradient_dropping.py",
           "                    apply_fn(grads, masks)\n",
           "                    apply_fn(grads, [ops.ones_like(m) for m in masks])\n",
           ["tests/test_gradient_dropping.py::test_fused_update_keeps_the_same_parts_as_graph_mode"]),
    Mutant("gradient dropping: the fused element step freezes the weights but not Adam's moments",
           "dni_tf/gradient_dropping.py",
           "                    lambda grads, masks: apply(grads, [ops.cast(m, \"bool\") for m in masks]),",
           "                    lambda grads, masks: (self.optimizer.apply(self.apply_masks(grads, [ops.cast(m, \"bool\") for m in masks]), variables)),",
           ["tests/test_gradient_dropping.py::test_fused_update_keeps_the_same_parts_as_graph_mode"]),
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
           "return tf.less(bits, tf.constant(self._bound(), tf.uint32))",
           "return tf.greater_equal(bits, tf.constant(self._bound(), tf.uint32))",
           ["tests/test_gradient_dropping.py::test_kept_fraction_matches_keep_prob_within_binomial_tolerance"]),
    Mutant("gradient dropping: element mask keeps 1 - keep_prob",
           "dni_tf/gradient_dropping.py",
           "return tf.reshape(tf.less(word, tf.constant(self._bound(), tf.uint32)), shape)",
           "return tf.reshape(tf.greater_equal(word, tf.constant(self._bound(), tf.uint32)), shape)",
           ["tests/test_gradient_dropping.py::test_element_granularity_fraction_and_rescale"]),
    Mutant("gradient dropping: fused update draws its own masks (unfused ones differ)",
           "dni_tf/gradient_dropping.py",
           "            self._update_fn = tf.function(update, jit_compile=True) if fused else update",
           "            if fused:\n"
           "                random_streams.next_seed(self.mask_generator)\n"
           "            self._update_fn = tf.function(update, jit_compile=True) if fused else update",
           ["tests/test_gradient_dropping.py::test_fused_update_keeps_the_same_parts_as_graph_mode"]),
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
           "sg_lr_scale=config.module_lr_scale(), method=config.method", "method=config.method",
           ["tests/test_dni_feedforward.py::test_study_config_reaches_the_model"]),
    # -- dni parity options (issue 20): per-method module rate, network options -----
    Mutant("dni parity: per-method module rate the same for dni and cdni",
           "dni_tf/dni_feedforward.py",
           'return {"dni": 1.0 / 16.0, "cdni": 0.25}.get(method, 1.0)',
           'return {"dni": 0.25, "cdni": 0.25}.get(method, 1.0)',
           ["tests/test_dni_feedforward.py::test_per_method_module_rate_defaults_and_the_preset"]),
    Mutant("dni parity: sg_lr_scale=None treated as 1", "dni_tf/dni_feedforward.py",
           "            sg_lr_scale = default_sg_lr_scale(method)\n",
           "            sg_lr_scale = 1.0\n",
           ["tests/test_dni_feedforward.py::test_one_step_with_parity_options_matches_the_hand_computed_step"]),
    Mutant("dni parity: sg_lr_scale rescales only the modules' output layers",
           "dni_tf/dni_feedforward.py",
           "scaled_modules = [(v, tf.identity(v.value)) for v in module_vars]",
           'scaled_modules = [(v, tf.identity(v.value)) for v in module_vars if "output" in v.path]',
           ["tests/test_dni_feedforward.py::test_one_step_with_parity_options_matches_the_hand_computed_step"]),
    Mutant("dni parity: sg_lr_scale squared", "dni_tf/dni_feedforward.py",
           "v.assign(old + self.sg_lr_scale * (v.value - old))",
           "v.assign(old + self.sg_lr_scale ** 2 * (v.value - old))",
           ["tests/test_dni_feedforward.py::test_one_step_with_parity_options_matches_the_hand_computed_step"]),
    Mutant("dni parity: input_norm ignored", "dni_tf/dni_feedforward.py",
           "    if input_norm is not None:\n        mean, std",
           "    if False:\n        mean, std",
           ["tests/test_dni_feedforward.py::test_one_step_with_parity_options_matches_the_hand_computed_step"]),
    Mutant("dni parity: bn_epsilon not passed on", "dni_tf/dni_feedforward.py",
           "keras.layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon)",
           "keras.layers.BatchNormalization(momentum=bn_momentum)",
           ["tests/test_dni_feedforward.py::test_one_step_with_parity_options_matches_the_hand_computed_step"]),
    Mutant("dni parity: study's preset gives one module rate to every method",
           "dni_tf/studies/dni_feedforward.py",
           "diagnostics=True, sg_lr_scale=None,", "diagnostics=True, sg_lr_scale=0.25,",
           ["tests/test_dni_feedforward.py::test_per_method_module_rate_defaults_and_the_preset"]),
    Mutant("dni parity: study's per-method rate ignores the method",
           "dni_tf/studies/dni_feedforward.py",
           "return default_sg_lr_scale(self.method)", 'return default_sg_lr_scale("cdni")',
           ["tests/test_dni_feedforward.py::test_per_method_module_rate_defaults_and_the_preset"]),
    Mutant("dni parity: pipelined step silently ignores sg_lr_scale", "dni_tf/pipelined_dni.py",
           "if self.own_step and self.points and self.sg_lr_scale != 1.0:", "if False:",
           ["tests/test_dni_feedforward.py::test_pipelined_execution_refuses_a_module_rate_it_would_ignore"]),
    Mutant("dni parity: study lets pipelined runs ignore the module rate",
           "dni_tf/studies/dni_feedforward.py",
           "                and self.module_lr_scale() != 1.0):", "                and False):",
           ["tests/test_dni_feedforward.py::test_pipelined_execution_refuses_a_module_rate_it_would_ignore"]),
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
           [REF]),
    Mutant("recurrent dni: module regressed at the window's last state",
           "dni_tf/truncated_bptt.py",
           "regression_loss(self._predict_sg(s), state_grad)",
           "regression_loss(self._predict_sg(new_s), state_grad)",
           [REF]),
    # The core still gets 0.1 * M; only the gradient reaching s_k (M's target) changes.
    Mutant("recurrent dni: bootstrap dropped from the module target",
           "dni_tf/truncated_bptt.py",
           "state_grad += (self.bootstrap_scale - self.sg_scale) * tape.gradient(surrogate, s)",
           "state_grad += (0.0 - self.sg_scale) * tape.gradient(surrogate, s)",
           [REF]),
    Mutant("recurrent dni: bootstrap in the module target left unscaled",
           "dni_tf/truncated_bptt.py",
           "state_grad += (self.bootstrap_scale - self.sg_scale) * tape.gradient(surrogate, s)",
           "state_grad += (1.0 - self.sg_scale) * tape.gradient(surrogate, s)",
           [REF]),
    Mutant("recurrent dni: bootstrap scaled like the injection (bootstrap_scale ignored)",
           "dni_tf/truncated_bptt.py",
           "split_bootstrap = use_sg and self.bootstrap_scale != self.sg_scale",
           "split_bootstrap = False",
           [REF]),
    Mutant("recurrent dni: synthetic gradient injected unscaled", "dni_tf/truncated_bptt.py",
           "objective += self.sg_scale * surrogate", "objective += surrogate",
           [REF]),
    Mutant("recurrent dni: episode end regressed onto nothing", "dni_tf/truncated_bptt.py",
           "end = tf.where(is_last, 1.0, 0.0)", "end = tf.where(is_last, 0.0, 0.0)",
           [REF, "tests/test_truncated_bptt.py::test_episode_end_regresses_a_nonzero_module_towards_zero"]),
    Mutant("recurrent dni: one update per batch although per_window is asked for",
           "dni_tf/truncated_bptt.py",
           "per_window = self.update == \"per_window\"", "per_window = False",
           [REF, "tests/test_truncated_bptt.py::test_per_window_updates_are_counted_and_stay_in_one_traced_step"]),
    Mutant("recurrent dni: per-window gradients computed but never applied",
           "dni_tf/truncated_bptt.py",
           "                applied = apply_fn(core_grads, sg_grads)\n"
           "                with tf.control_dependencies(applied):\n"
           "                    # The next window starts after this window's update.\n"
           "                    new_s = tf.identity(new_s)",
           "                new_c[\"core_acc\"] = c[\"core_acc\"]",
           [REF]),
    Mutant("recurrent dni: stream bootstraps nothing across batches",
           "dni_tf/truncated_bptt.py",
           "train_in = 0.0 if episodic else 1.0", "train_in = 0.0",
           [REF]),
    Mutant("recurrent dni: the Copy stream bootstraps across episodes (episodic ignored)",
           "dni_tf/truncated_bptt.py",
           "r = self.compute_gradients(x, y, mask, state, episodic=self.episodic,",
           "r = self.compute_gradients(x, y, mask, state, episodic=not self.stateful,",
           [REF]),
    Mutant("recurrent dni_aux: Aux predicts the synthetic gradient at its own window's end",
           "dni_tf/truncated_bptt.py",
           "pred = self.aux_head(prev_end)", "pred = self.aux_head(new_s)",
           [REF, "tests/test_truncated_bptt.py::test_aux_loss_and_its_target"]),
    Mutant("recurrent dni_aux: Aux loss does not train the core (prediction from a constant state)",
           "dni_tf/truncated_bptt.py",
           "pred = self.aux_head(prev_end)", "pred = self.aux_head(tf.stop_gradient(prev_end))",
           [REF]),
    Mutant("recurrent dni_aux: Aux target ignores that nothing is received at an episode's end",
           "dni_tf/truncated_bptt.py",
           "tf.square(pred - sg_next))",
           "tf.square(pred - tf.stop_gradient(self._predict_sg(new_s))))",
           [REF, "tests/test_truncated_bptt.py::test_aux_loss_and_its_target"]),
    Mutant("recurrent dni: diagnostics compare with the window's own loss too",
           "dni_tf/truncated_bptt.py",
           "new_s = new_s + tf.gather(probes, k)\n",
           "new_s = new_s\n                total += tf.reduce_sum(tf.gather(probes, k) * s)\n",
           ["tests/test_truncated_bptt.py::test_synthetic_gradient_quality_against_full_bptt"]),
    # -- sequence tasks ------------------------------------------------------
    Mutant("repeat copy curriculum: repeats never grow", "dni_tf/data/sequence_tasks.py",
           "self.repeats.assign(tf.where(tf.logical_and(solved, grow_repeats), repeats + 1, repeats))",
           "self.repeats.assign(repeats)",
           ["tests/test_sequence_tasks.py::test_repeat_curriculum_grows_length_and_repeats_alternately"]),
    Mutant("copy curriculum: uniform sampling ignores the curriculum's level",
           "dni_tf/data/sequence_tasks.py",
           "minval=1, maxval=n + 1,", "minval=n, maxval=n + 1,",
           ["tests/test_sequence_tasks.py::test_uniform_sampling_draws_levels_up_to_the_current_one"]),
    # -- multi-network (two clocks) ---------------------------------------------
    Mutant("multi-network: dni trains A on B's true gradient (synchronous, update-locked)",
           "dni_tf/multi_network.py",
           'if self.method == "backprop":\n            return self._backprop_step',
           'if self.method in ("backprop", "dni"):\n            return self._backprop_step',
           ["tests/test_multi_network.py::test_a_follows_the_synthetic_gradient_not_the_true_one"]),
    Mutant("multi-network: A ignores the synthetic gradient", "dni_tf/multi_network.py",
           "objective = a_loss + surrogate_objective(", "objective = a_loss + 0.0 * surrogate_objective(",
           ["tests/test_multi_network.py::test_a_follows_the_synthetic_gradient_not_the_true_one"]),
    Mutant("multi-network: M's target is only the reading tick's gradient", "dni_tf/multi_network.py",
           "for i, g in enumerate(grads[len(b_vars):]):",
           "for i, g in list(enumerate(grads[len(b_vars):]))[t + 1 - k:]:",
           ["tests/test_multi_network.py::test_dni_step_matches_a_hand_written_reference_with_nonzero_m"]),
    Mutant("multi-network: M's target in batch-mean units", "dni_tf/multi_network.py",
           "target = tf.concat(true_grads, axis=0) * tf.cast(batch, tf.float32)",
           "target = tf.concat(true_grads, axis=0)",
           ["tests/test_multi_network.py::test_dni_step_matches_a_hand_written_reference_with_nonzero_m"]),
    Mutant("multi-network: B's gradient cut at every tick (its memory untrained)",
           "dni_tf/multi_network.py",
           "logits_b, state_b = self.b_tick(received[t + 1 - k:], state_b)",
           "logits_b, state_b = self.b_tick(received[t + 1 - k:], "
           "[tf.stop_gradient(s) for s in state_b])",
           ["tests/test_multi_network.py::test_dni_step_matches_a_hand_written_reference_with_nonzero_m"]),
    Mutant("multi-network: cDNI reads the episode's last count", "dni_tf/multi_network.py",
           "sg_in = self.sg_input(m, counts[:, t // k])", "sg_in = self.sg_input(m, counts[:, -1])",
           ["tests/test_multi_network.py::test_dni_step_matches_a_hand_written_reference_with_nonzero_m"]),
    Mutant("multi-network: B reads only A's last message of its period", "dni_tf/multi_network.py",
           "h, new_state = self.cell_b(tf.concat(messages, axis=-1), state)",
           "h, new_state = self.cell_b(tf.concat([messages[-1]] * len(messages), axis=-1), state)",
           ["tests/test_multi_network.py::test_dni_step_matches_a_hand_written_reference_with_nonzero_m",
            "tests/test_multi_network.py::test_backprop_step_is_one_update_through_the_whole_episode"]),
    Mutant("multi-network: baseline cuts B's loss from A", "dni_tf/multi_network.py",
           "            messages.append(m)\n            if (t + 1) % self.tick_ratio == 0:",
           "            messages.append(tf.stop_gradient(m))\n"
           "            if (t + 1) % self.tick_ratio == 0:",
           ["tests/test_multi_network.py::test_backprop_step_is_one_update_through_the_whole_episode"]),
    Mutant("multi-network: A updated on B's clock only", "dni_tf/multi_network.py",
           "self.optimizer.apply(replica_mean(a_grads), a_vars)",
           "self.optimizer.apply(replica_mean(a_grads), a_vars) if (t + 1) % k == 0 else None",
           ["tests/test_multi_network.py::test_update_counts_per_batch"]),
    # -- pipelined dni ------------------------------------------------------
    Mutant("pipelined dni: block j reads this step's output (no delay)", "dni_tf/pipelined_dni.py",
           "                a = inputs[j]\n                with tf.GradientTape(persistent=True) as tape:",
           "                a = inputs[j] if j == 0 or not self.pipelined else tf.stop_gradient(outputs[j - 1])\n"
           "                with tf.GradientTape(persistent=True) as tape:",
           ["tests/test_pipelined_dni.py::test_pipeline_delay_matches_hand_reference",
            "tests/test_pipelined_dni.py::test_pipelined_blocks_share_no_data_within_a_step"]),
    Mutant("pipelined dni: labels not delayed with the activations", "dni_tf/pipelined_dni.py",
           "labels.append(tf.identity(self.buffer_y[k - 1].value))", "labels.append(y)",
           ["tests/test_pipelined_dni.py::test_pipeline_delay_matches_hand_reference"]),
    Mutant("pipelined dni: blocks update on an empty buffer during warm-up", "dni_tf/pipelined_dni.py",
           "valid.append(self.buffer_full[k - 1].value > 0)", "valid.append(tf.constant(True))",
           ["tests/test_pipelined_dni.py::test_pipeline_delay_matches_hand_reference"]),
    Mutant("pipelined dni: module target keeps the sg_scale", "dni_tf/pipelined_dni.py",
           "            scale = units / self.sg_scale\n",
           "            scale = units\n",
           ["tests/test_pipelined_dni.py::test_pipeline_delay_matches_hand_reference"]),
    Mutant("pipelined dni: module regressed on the new output, not the input of its target",
           "dni_tf/pipelined_dni.py",
           "pred = module(inputs[k], context=self._context(labels[k]), training=True)",
           "pred = module(outputs[j], context=self._context(labels[j]), training=True)",
           ["tests/test_pipelined_dni.py::test_pipeline_delay_matches_hand_reference"]),
    Mutant("pipelined dni: model-parallel backprop drops the gradient from above",
           "dni_tf/pipelined_dni.py",
           "                                              output_gradients=upstream,",
           "                                              output_gradients=tf.ones_like(upstream),",
           ["tests/test_pipelined_dni.py::test_model_parallel_backprop_equals_backprop"]),
    Mutant("pipelined dni: consumer placement ignored", "dni_tf/pipelined_dni.py",
           'return self.device_of(j + 1 if self.module_placement == "consumer" else j)',
           "return self.device_of(j)",
           ["tests/test_pipelined_dni.py::test_modules_on_the_consumer_device"]),
    Mutant("pipelined dni: buffers not written on the consumer's device", "dni_tf/pipelined_dni.py",
           "                with self.device_of(j + 1):  # buffer k feeds block k = j + 1",
           "                with self.device_of(j):  # buffer k feeds block k = j + 1",
           ["tests/test_pipelined_dni.py::test_blocks_live_on_their_devices"]),
    Mutant("pipelined dni: rejoin forgets the checkpoint", "dni_tf/pipelined_cluster.py",
           "    fresh.load_weights(checkpoint)\n", "",
           ["tests/test_pipelined_dni.py::test_lost_block_stops_while_the_others_train_and_rejoins_from_its_checkpoint"]),
    Mutant("pipelined dni: rejoin resets the surviving blocks to the checkpoint too",
           "dni_tf/pipelined_cluster.py",
           "keep = [None if on_lost_device(model, v) else v.numpy() for v in all_variables(model)]",
           "keep = [None for v in all_variables(model)]",
           ["tests/test_pipelined_dni.py::test_lost_block_stops_while_the_others_train_and_rejoins_from_its_checkpoint"]),
    # -- fast path (--jit_compile, --steps_per_execution, --mixed_precision) --------
    Mutant("fast path: the last, shorter evaluation period is not a period",
           "dni_tf/harness/fast_path.py",
           "    return (eval_every, steps % eval_every or eval_every)", "    return (eval_every, eval_every)",
           ["tests/test_fast_path.py::test_study_defaults_and_the_conv_fallback_line"]),
    Mutant("fast path: an explicit k that does not divide an evaluation period is accepted",
           "dni_tf/harness/fast_path.py",
           "    bad = [p for p in periods if p and p % steps_per_execution]", "    bad = []",
           ["tests/test_targeted_dropout_experiment.py::test_steps_per_execution_must_divide_every_evaluation_period"]),
    Mutant("fast path: a resume whose periods k does not divide keeps k",
           "dni_tf/harness/training.py",
           "    if k > 1 and remaining > 0 and any(p % k for p in periods if p):", "    if False:",
           ["tests/test_fast_path.py::test_a_period_that_k_does_not_divide_lowers_k"]),
    Mutant("fast path: synthetic-gradient modules follow the mixed (bfloat16) policy",
           "dni_tf/synthetic_gradients.py",
           '        kwargs.setdefault("dtype", "float32")\n', "",
           ["tests/test_fast_path.py::test_bfloat16_trains_each_family_and_keeps_synthetic_gradients_float32"]),
    Mutant("fast path: several steps per call under a distribution strategy",
           "dni_tf/harness/fast_path.py",
           "        distributed = under_distribution()\n", "        distributed = False\n",
           ["tests/test_fast_path.py::test_under_a_distribution_strategy_no_auto_xla_and_one_step_per_call"]),
    Mutant("fast path: an explicit XLA request is passed to a strategy over several devices",
           "dni_tf/harness/fast_path.py",
           "            if requested:\n                raise UsageError(\"--jit_compile=true: not supported with a distribution \"",
           "            if False:\n                raise UsageError(\"--jit_compile=true: not supported with a distribution \"",
           ["tests/test_fast_path.py::test_under_a_distribution_strategy_no_auto_xla_and_one_step_per_call"]),
    Mutant("fast path: a small automatic k is not explained",
           "dni_tf/harness/fast_path.py",
           "            elif spe < SMALL_STEPS_PER_EXECUTION:", "            elif False:",
           ["tests/test_fast_path.py::test_awkward_periods_give_a_small_k_and_say_why"]),
    Mutant("fast path: DNI sends float32 synthetic gradients into bfloat16 blocks",
           "dni_tf/dni_feedforward.py",
           "            cotangents = [tf.cast((1.0 - lam) * self.sg_scale * p / units, out.dtype)",
           "            cotangents = [tf.cast((1.0 - lam) * self.sg_scale * p / units, p.dtype)",
           ["tests/test_dni_feedforward.py::test_bfloat16_step_follows_the_float32_step"]),
    Mutant("fast path: XLA by default for convolutions on a CPU",
           "dni_tf/harness/fast_path.py",
           "    if any(isinstance(layer, _CONV_LAYERS) for layer in layers):", "    if False:",
           ["tests/test_fast_path.py::test_study_defaults_and_the_conv_fallback_line"]),
    Mutant("lost worker: rejoin in place resets the surviving blocks to the checkpoint too",
           "dni_tf/pipelined_cluster.py",
           "    for variable, replacement, gone in zip(old, new, on_lost):\n        if gone:\n",
           "    for variable, replacement, gone in zip(old, new, on_lost):\n        if True:\n",
           ["tests/test_pipelined_dni.py::test_study_run_drops_a_killed_worker_and_rejoins_it_from_the_checkpoint"]),
    Mutant("lost worker: the step's logs are left for Keras to read (a pending op's error escapes)",
           "dni_tf/harness/lost_workers.py",
           "                    _sync()\n                return _read(logs)\n",
           "                    _sync()\n                return logs\n",
           ["tests/test_pipelined_dni.py::test_an_error_surfacing_when_the_step_logs_are_read_reaches_the_handler"]),
    Mutant("lost worker: no periodic rejoin checkpoint (the block returns from train begin)",
           "dni_tf/harness/lost_workers.py",
           "        elif self.step % self.checkpoint_every == 0:\n            self._save()\n", "",
           ["tests/test_pipelined_dni.py::test_study_run_drops_a_killed_worker_and_rejoins_it_from_the_checkpoint"]),
    Mutant("lost worker: the lost worker is never probed during training",
           "dni_tf/harness/lost_workers.py",
           "            if time.monotonic() >= self._next_probe:", "            if False:",
           ["tests/test_pipelined_dni.py::test_study_run_drops_a_killed_worker_and_rejoins_it_from_the_checkpoint"]),
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
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:  # never fall through to "all mutants" (they rewrite files in place)
        print(f"unknown option {unknown[0]}: use --list, --help or NAME ...", file=sys.stderr)
        return 2
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
