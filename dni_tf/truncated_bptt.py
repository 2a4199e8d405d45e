"""Truncated BPTT for an LSTM core, plain or with recurrent synthetic gradients.

Recurrent DNI (Jaderberg et al. 2016, section 2.2): a sequence is processed in
windows of `T` steps; the state is carried from window to window but gradients
are cut at each window boundary. Three methods:

* `bptt`: plain truncated BPTT.
* `dni`: a synthetic gradient module M reads the state `s_{k+1}` at the end of
  window k and predicts the gradient of all future losses with respect to it.
  That prediction, scaled by `sg_scale` (0.1), is added to the true gradient
  of the window's loss at `s_{k+1}`, so the core learns from beyond its window.
  M is trained by regression onto a bootstrapped target at the *next*
  window's first state (`s_{k+1}`): the true gradient of window k+1's loss
  plus `bootstrap_scale` times window k+1's synthetic gradient M(s_{k+2})
  backpropagated through it. With `bootstrap_scale` = 1 (default) this is the
  paper's target (section 2.2: delta_t is the sum of ALL future losses'
  gradients, and its bootstrapped estimate is the window's true gradient plus
  the next synthetic gradient carried back through the window), whose fixed
  point is the undiscounted future gradient; `sg_scale` only damps what
  enters the core. With `bootstrap_scale` = `sg_scale` = 0.1 (what some
  public implementations get by backpropagating the already-scaled synthetic
  gradient) credit from j windows ahead reaches the core scaled by 0.1^j. At the end
  of a finite sequence no synthetic gradient is injected and M's prediction
  there is regressed to 0 (there is no future loss), which keeps the
  bootstrap from drifting.
* `dni_aux`: `dni` plus the paper's auxiliary task: a linear head A reads
  each window-end state `s_k` and predicts the synthetic gradient the core
  will receive one window later, at `s_{k+1}` (so M's horizon plus T
  steps). Its target exists only once window k has run, so the L2 loss
  (weight `aux_weight`, mean over batch and units) is formed then; window
  k-1 is rerun from `s_{k-1}` with the current weights inside window k's
  tape, so the loss also trains the core (an auxiliary task shapes the
  representation). The first window of a batch has no previous window and
  makes no Aux loss.

Updates (`update`): "per_window" (default) applies an optimizer step after
every window inside the window loop, so window k+1 runs on weights window k
already updated: that is update unlocking for an RNN, and the `bptt`
baseline is updated every T steps too. "per_batch" sums the windows'
gradients and applies them once per batch. Under a multi-replica
`tf.distribute` strategy TensorFlow cannot all-reduce inside a while loop, so
per-window updates unroll the window loop at trace time (static lengths only).

State layout: the LSTM state is one tensor `[B, 2H]` = concat(h, c); the
synthetic gradient covers both halves. Units: M predicts the *per-example*
gradient (see `dni_tf.synthetic_gradients`), so its target is `B * dL/ds`.

Losses: window k's task loss is the masked per-step loss summed over the
window and divided by `B * min(T, N)`; the training objective is the sum of
the window losses (the per-step mean times N / T), so with `T >= N` it is the
ordinary per-step mean and its gradient equals full BPTT's, and a window's
loss has the same scale whatever the sequence length. With `stateful=True`
(contiguous streams) the state and the pending synthetic gradient carry
across batches, as in the language model. With `continuous=True` as well (the
paper's stream of Copy episodes: one infinitely unrolled RNN chunked into windows
of T steps, section 2.2) windows are cut every T steps of the stream, not at
batch starts: the steps after a batch's last whole window wait in checkpointed
variables and run at the head of the next batch, from the state that window
left, with the weights it left, as they would in one endless sequence.

`synthetic_gradient_quality(x, y, mask)` compares M's prediction at every
window end with the true future gradient from full BPTT over the same
sequence (cosine and norm ratio per window; with `weight_space=True` also
after both are backpropagated through their window into the core's weights).

Data (a `(x, y, mask)` tuple; `mask` may be omitted = all ones):
* `loss_type="bernoulli"` (Copy tasks): x float [B, N, D], y float [B, N, O]
  in {0, 1}, mask [B, N]; loss = sigmoid cross-entropy summed over the O bits.
  Metrics: `loss` (nats per step), `bit_errors` (wrong answer bits per
  sequence, masked), `sequence_error` (fraction of sequences with an error).
* `loss_type="categorical"` (characters): x int [B, N] (one-hot of
  `vocab_size` inside the model), y int [B, N]; loss = softmax cross-entropy.
  Metrics: `loss` (nats per masked character) and `bpc` (= loss / ln 2).
* Training also reports `cell_norm`, the mean norm of the LSTM cell state c
  at each batch's end: a carried state that nothing bounds can grow without
  limit (and, fed to M, drive its predictions up); see `sg_lr_scale`.

`stateful=True` (needs `batch_size`) keeps the training state and a separate
evaluation state in non-trainable variables, so contiguous streams carry state
across batches and a checkpoint restores it; `reset_eval_state()` (the
`ResetEvalState` callback does it before each evaluation) zeroes the latter.
A `curriculum` (see `dni_tf.data.sequence_tasks.Curriculum`) is updated in
`train_step` with each batch's bit errors per sequence.

Mixed precision (Keras' `mixed_bfloat16` policy): the LSTM computes in
bfloat16; the state carried between windows, the head's logits, M and the Aux
head are float32, so synthetic gradients and their targets never round to 8
mantissa bits.

XLA: `compile(jit_compile=True)` works when the sequence length is static in
the data's shape (e.g. PTB chunks: windows then have static sizes); lengths
that change from batch to batch (the Copy curriculum) cannot be compiled and
raise a ValueError saying so. Keras' default `"auto"` would turn XLA on
whenever a GPU is present, so here it means off.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from dni_tf.synthetic_gradients import regression_loss, surrogate_objective
from dni_tf.core import BuildsBeforeTracing, replica_mean

METHODS = ("bptt", "dni", "dni_aux")
UPDATES = ("per_window", "per_batch")
LOSS_TYPES = ("bernoulli", "categorical")
LN2 = math.log(2.0)


def _window(v, k, t):
    """v[:, k*t:(k+1)*t] as a slice of static size t (XLA needs it: `k` is a loop index)."""
    begin = tf.concat([[0, k * t], tf.zeros([tf.rank(v) - 2], tf.int32)], 0)
    size = tf.concat([[-1, t], -tf.ones([tf.rank(v) - 2], tf.int32)], 0)
    return tf.slice(v, begin, size)


def pooled_update_scores(cosine, norm, true_norm):
    """Per-window weight-space scores (`synthetic_gradient_quality(weight_space=True)`'s
    `update_cosine`, `update_norm`, `update_true_norm`, any equal-length 1-D arrays) ->
    (cosine, norm ratio) of the windows' weight changes concatenated: windows weigh by
    their changes' sizes, and a window with no future loss adds nothing."""
    cosine, norm, true_norm = (np.asarray(a, np.float64) for a in (cosine, norm, true_norm))
    scale = np.sqrt(np.sum(norm ** 2) * np.sum(true_norm ** 2))
    return (float(np.sum(cosine * norm * true_norm) / max(scale, 1e-12)),
            float(np.sqrt(np.sum(norm ** 2) / max(np.sum(true_norm ** 2), 1e-24))))


def bits_per_character(nats):
    """Cross-entropy in nats per character -> bits per character (divide by ln 2)."""
    return nats / LN2


class TruncatedBPTT(BuildsBeforeTracing, keras.Model):
    """LSTM core + linear output head trained with truncated BPTT (+ DNI).

    Args:
      num_outputs: output channels O (bits for Copy, vocabulary for characters).
      truncation: window length T >= 1.
      method: "bptt", "dni" or "dni_aux".
      hidden_size: LSTM units H.
      loss_type: "bernoulli" or "categorical" (see module docstring).
      vocab_size: for categorical inputs, the one-hot size of the int inputs.
      sg_scale: factor applied to synthetic gradients entering the core (0.1).
      bootstrap_scale: factor applied to the next synthetic gradient inside M's
        regression target (1.0: the paper's target, see the module docstring).
      update: "per_window" (an optimizer step after every window, the paper's
        update unlocking) or "per_batch" (the windows' gradients summed and
        applied once per batch).
      aux_weight: weight of the dni_aux auxiliary loss.
      stateful: carry state across batches (contiguous streams).
      batch_size: fixed batch size, required when stateful.
      episodic: whether every batch ends an episode (no synthetic gradient after
        its last window, M regressed to 0 there, M not trained at its first
        state). Default: `not stateful`. `stateful=True, episodic=True` is a
        stream of episodes with the state carried but the bootstrap cut at
        episode ends (the Copy stream).
      continuous: cut windows every T steps of the stream regardless of where
        batches end (the paper's one infinitely unrolled RNN, chunked into
        windows of T steps): the steps after a batch's last full window are
        kept (`pending_*` variables, checkpointed) and run at the head of the
        next batch, from the state that window left; with no window complete,
        a batch only extends them. Needs `stateful=True, episodic=False` and
        float inputs (bernoulli). Metrics then count the steps run in the
        batch (one episode's worth on average), and so does the curriculum.
      curriculum: optional Curriculum layer updated every train step.
      clip_norm: if > 0, the core's gradients and the synthetic gradient
        module's gradients are each clipped to this global norm separately
        (one joint clip would let the regression loss shrink the core's step).
      sg_lr_scale: the synthetic-gradient module M's step is the optimizer's
        step times this (its learning rate times this, for Adam and SGD); the
        Aux head, whose loss also trains the core, keeps the core's rate. Adam
        moves each of M's 2H x 2H weights by about the learning rate per step,
        so M's output moves by about lr * |s|_1 per coordinate, far more than
        its targets when the state is wide; in a carried stream the resulting
        synthetic gradients can drive the cell state c up without bound (see
        the `cell_norm` metric and docs/recurrent_dni.md).
      seed: initialiser seed.
    """

    def __init__(self, num_outputs: int, truncation: int, method: str = "bptt",
                 hidden_size: int = 64, loss_type: str = "bernoulli",
                 vocab_size: Optional[int] = None, sg_scale: float = 0.1,
                 bootstrap_scale: float = 1.0, update: str = "per_window",
                 aux_weight: float = 1.0, stateful: bool = False,
                 batch_size: Optional[int] = None, episodic: Optional[bool] = None,
                 continuous: bool = False, curriculum=None, clip_norm: float = 0.0,
                 sg_lr_scale: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if int(truncation) < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if stateful and not batch_size:
            raise ValueError("stateful=True needs batch_size")
        self.num_outputs = int(num_outputs)
        self.truncation = int(truncation)
        self.method = method
        self.hidden_size = int(hidden_size)
        self.loss_type = loss_type
        self.vocab_size = vocab_size
        self.sg_scale = float(sg_scale)
        self.bootstrap_scale = float(bootstrap_scale)
        self.update = update
        self.aux_weight = float(aux_weight)
        self.stateful = bool(stateful)
        # Whether each batch ends an episode (the bootstrap stops there), carried state or not.
        self.episodic = (not self.stateful) if episodic is None else bool(episodic)
        self.continuous = bool(continuous)
        if self.continuous and (not self.stateful or self.episodic
                                or loss_type != "bernoulli"):
            raise ValueError("continuous=True needs stateful=True, episodic=False and "
                             "loss_type='bernoulli' (a stream of float inputs)")
        self.clip_norm = float(clip_norm)
        if not sg_lr_scale > 0.0:
            raise ValueError(f"sg_lr_scale must be > 0, got {sg_lr_scale}")
        self.sg_lr_scale = float(sg_lr_scale)
        self.fixed_batch_size = batch_size
        self.curriculum = curriculum
        self.core = keras.layers.LSTM(
            self.hidden_size, return_sequences=True, return_state=True,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
            recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 1), name="core")
        # Under mixed precision only the LSTM computes in 16 bits: the head gives float32
        # logits (Keras' advice for the last layer), and the state between windows, M and
        # the Aux head stay float32 (synthetic gradients and their targets are regressions).
        self.head = keras.layers.Dense(
            self.num_outputs, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 2),
            dtype="float32", name="head")
        self.synthetic_gradient = None
        self.aux_head = None
        if method in ("dni", "dni_aux"):
            # Linear M (the paper's recurrent modules have no hidden layer),
            # zero-initialised: the first synthetic gradients are exactly zero.
            self.synthetic_gradient = keras.layers.Dense(
                2 * self.hidden_size, kernel_initializer="zeros", bias_initializer="zeros",
                dtype="float32", name="synthetic_gradient")
        if method == "dni_aux":
            # Reads a window-end state [B, 2H], predicts the next synthetic gradient [B, 2H].
            self.aux_head = keras.layers.Dense(2 * self.hidden_size, kernel_initializer="zeros",
                                               dtype="float32", name="aux_head")
        self._trackers = {name: keras.metrics.Mean(name=name) for name in self._metric_names()}

    # ----------------------------------------------------------------- setup
    def compile(self, *args, jit_compile="auto", **kwargs):
        # "auto" would enable XLA on any GPU machine, which fails for dynamic lengths.
        self._xla_requested = jit_compile is True
        super().compile(*args, jit_compile=self._xla_requested, **kwargs)

    def _metric_names(self):
        names = ["loss"]
        names += ["bit_errors", "sequence_error"] if self.loss_type == "bernoulli" else ["bpc"]
        # Mean norm of the LSTM cell state c at the batch's end: in a carried stream
        # nothing bounds c, and a growing c saturates tanh(c) and inflates M's input.
        names += ["cell_norm"]
        if self.synthetic_gradient is not None:
            names += ["sg_loss", "sg_norm", "sg_target_norm"]
        if self.aux_head is not None:
            names += ["aux_loss"]
        return names

    @property
    def metrics(self):
        return list(self._trackers.values())

    def build(self, input_shape=None):
        # Builds whatever is not built yet: Keras' symbolic build on `fit` calls the
        # model, which builds the core and head but not M or the Aux head.
        if self.loss_type == "categorical":
            feature_dim = int(self.vocab_size)
        else:
            feature_dim = int(input_shape[-1])
        h2 = 2 * self.hidden_size
        shapes = ((None, None, feature_dim), (None, None, self.hidden_size), (None, h2),
                  (None, h2))
        for layer, shape in zip(self._sublayers(), shapes):
            if layer is not None and not layer.built:
                layer.build(shape)
        if self.stateful and not hasattr(self, "train_state"):
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                # The carried state has one row per row of the global batch; each
                # replica would see only its share of the batch.
                raise ValueError(f"a stateful TruncatedBPTT carries one state row per batch "
                                 f"row and cannot be split over {replicas} replicas: train on "
                                 f"one replica, or with stateful=False")
            shape = (int(self.fixed_batch_size), h2)
            self.train_state = self.add_weight(shape=shape, initializer="zeros",
                                               trainable=False, name="train_state")
            self.eval_state = self.add_weight(shape=shape, initializer="zeros",
                                              trainable=False, name="eval_state")
            if self.continuous:
                # At most T - 1 steps wait for the next batch; T keeps the shape non-empty.
                rows, t = int(self.fixed_batch_size), self.truncation
                self.pending_x = self.add_weight(shape=(rows, t, feature_dim),
                                                 initializer="zeros", trainable=False,
                                                 name="pending_x")
                self.pending_y = self.add_weight(shape=(rows, t, self.num_outputs),
                                                 initializer="zeros", trainable=False,
                                                 name="pending_y")
                self.pending_mask = self.add_weight(shape=(rows, t), initializer="zeros",
                                                    trainable=False, name="pending_mask")
                self.pending_steps = self.add_weight(shape=(), dtype="int32",
                                                     initializer="zeros", trainable=False,
                                                     name="pending_steps")
        super().build(input_shape)

    def _sublayers(self):
        """(core, head, M, Aux head); M and the Aux head are None where the method has none."""
        return self.core, self.head, self.synthetic_gradient, self.aux_head

    def _missing_state(self) -> bool:
        """Whether a sub-layer or the carried state is not built yet (`build` adds it)."""
        return (any(layer is not None and not layer.built for layer in self._sublayers())
                or (self.stateful and not hasattr(self, "train_state")))

    def reset_states(self):
        """Zeroes the carried training and evaluation states (stateful only), and drops
        the steps waiting for the next window (continuous)."""
        if self.stateful:
            self.train_state.assign(tf.zeros_like(self.train_state))
            self.eval_state.assign(tf.zeros_like(self.eval_state))
        if self.continuous:
            self.pending_steps.assign(0)

    def reset_eval_state(self):
        if self.stateful:
            self.eval_state.assign(tf.zeros_like(self.eval_state))

    @property
    def core_variables(self):
        """Variables trained by the task loss (core, head and aux head)."""
        layers = [self.core, self.head] + ([self.aux_head] if self.aux_head is not None else [])
        return [v for layer in layers for v in layer.trainable_variables]

    @property
    def sg_variables(self):
        if self.synthetic_gradient is None:
            return []
        return list(self.synthetic_gradient.trainable_variables)

    # --------------------------------------------------------------- pieces
    def _features(self, x):
        if self.loss_type == "categorical":
            return tf.one_hot(tf.cast(x, tf.int32), int(self.vocab_size), dtype=tf.float32)
        return tf.cast(x, tf.float32)

    def _run_core(self, features, state, valid=None):
        """features [B, t, D], state [B, 2H] -> outputs [B, t, H], state [B, 2H].

        `valid` [B, t] bool marks real steps; padded steps leave the state as is.
        Under mixed precision the LSTM runs in its compute dtype (outputs too) and
        the states in and out are float32.
        """
        h = self.hidden_size
        state = tf.cast(state, self.core.compute_dtype)
        outputs, new_h, new_c = self.core(features, initial_state=[state[:, :h], state[:, h:]],
                                          mask=valid)
        return outputs, tf.cast(tf.concat([new_h, new_c], axis=-1), tf.float32)

    def _step_losses(self, logits, y):
        """Per-position loss in nats, [B, t]."""
        if self.loss_type == "bernoulli":
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(y, tf.float32),
                                                         logits=logits)
            return tf.reduce_sum(ce, axis=-1)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                              logits=logits)

    def _wrong_bits(self, logits, y, mask):
        """Masked wrong output bits per sequence, [B] (bernoulli only)."""
        wrong = tf.cast(tf.not_equal(logits > 0.0, tf.cast(y, tf.float32) > 0.5), tf.float32)
        return tf.reduce_sum(tf.reduce_sum(wrong, axis=-1) * mask, axis=1)

    def _predict_sg(self, state):
        """M(s): never backpropagates into the state (M is trained by regression only)."""
        return self.synthetic_gradient(tf.stop_gradient(state))

    def initial_state(self, batch_size):
        return tf.zeros([batch_size, 2 * self.hidden_size], tf.float32)

    def forward(self, x, state=None):
        """Whole-sequence forward pass: x -> (logits [B, N, O], final state [B, 2H])."""
        features = self._features(x)
        if state is None:
            state = self.initial_state(tf.shape(features)[0])
        outputs, state = self._run_core(features, state)
        return self.head(outputs), state

    def call(self, x, training=False):
        return self.forward(x)[0]

    def forward_windows(self, x, state=None):
        """The same forward pass run window by window in a `tf.while_loop`.

        Gives the same logits as `forward` (state carries across windows); it
        is the forward half of `compute_gradients`.
        """
        features, _, _, n, num_windows, t = self._pad(x, None, None)
        batch = tf.shape(features)[0]
        if state is None:
            state = self.initial_state(batch)
        logits_ta = tf.TensorArray(tf.float32, size=num_windows)

        def body(k, s, ta):
            xs = _window(features, k, t)
            out, s = self._run_core(xs, s, self._valid(k, t, n, batch))
            return k + 1, s, ta.write(k, self.head(out))

        _, state, logits_ta = tf.while_loop(lambda k, *_: k < num_windows, body,
                                            (tf.constant(0), state, logits_ta))
        logits = tf.transpose(logits_ta.stack(), [1, 0, 2, 3])  # [B, K, T, O]
        logits = tf.reshape(logits, [batch, num_windows * t, self.num_outputs])
        return logits[:, :n], state

    def _valid(self, k, t, n, batch):
        """[B, t] bool: which steps of window k (windows of t steps) are real (not padding)."""
        valid = k * t + tf.range(t) < n
        return tf.broadcast_to(valid[None, :], [batch, t])

    def _pad(self, x, y, mask):
        """Pads the time axis to a multiple of the window; returns features, y, mask, N, K, t.

        The window is t = min(T, N): a sequence shorter than T is one window of N
        steps (padding it to T steps would give the same result at T/N the cost).
        """
        features = self._features(x)
        n = features.shape[1]
        if n is not None:
            # A static length gives static window sizes and count, which XLA needs.
            t = min(self.truncation, n)
        else:
            if getattr(self, "_xla_requested", False):
                raise ValueError("TruncatedBPTT with jit_compile=True needs a static sequence "
                                 "length in the data's shape (got None); compile with "
                                 "jit_compile=False for variable-length sequences")
            n = tf.shape(features)[1]
            # At least 1: a continuous stream may hand over no complete window (n = 0).
            t = tf.maximum(tf.minimum(tf.constant(self.truncation, tf.int32), n), 1)
        num_windows = (n + t - 1) // t
        pad = num_windows * t - n

        def pad_time(v):
            if v is None:
                return None
            paddings = tf.concat([[[0, 0], [0, pad]], tf.zeros([tf.rank(v) - 2, 2], tf.int32)], 0)
            return tf.pad(v, paddings)

        return pad_time(features), pad_time(y), pad_time(mask), n, num_windows, t

    # ------------------------------------------------------------ gradients
    def _unrolled(self, num_windows) -> bool:
        """Whether the window loop must be a Python loop (a cross-replica sum per window).

        TensorFlow cannot all-reduce inside a `tf.while_loop` under a
        multi-replica strategy (merge_call), so per-window updates there are
        unrolled at trace time, which needs a static window count.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.update != "per_window" or replicas == 1:
            return False
        if not isinstance(num_windows, int):
            raise ValueError("TruncatedBPTT with update='per_window' under a multi-replica "
                             "strategy needs a static sequence length in the data's shape (the "
                             "window loop is unrolled: TensorFlow cannot all-reduce inside a "
                             "while loop); use update='per_batch' for variable lengths")
        return True

    def compute_gradients(self, x, y, mask=None, state=None, episodic: bool = True,
                          apply_fn=None) -> Dict[str, object]:
        """Runs all windows of a batch: the method's gradients, per window.

        Args:
          x, y, mask: one batch (see module docstring); mask [B, N] or None.
          state: state entering the first window [B, 2H] (zeros if None).
          episodic: True when the sequence ends with this batch (Copy): the
            last window gets no synthetic gradient and M is regressed to 0
            there, and the first state (a fresh zero state) trains nothing.
            False for streams: the last state's synthetic gradient is injected
            and M's prediction at the incoming state is trained on this
            batch's first-window gradient (bootstrapping across batches).
          apply_fn: None to sum the windows' gradients and return them, or
            `fn(core_grads, sg_grads)` called after every window (inside the
            loop) to update the weights before the next window runs.

        Returns a dict: `core_grads` (list matching `core_variables`; zeros
        when `apply_fn` consumed them), `sg_grads` (matching `sg_variables`),
        `final_state`, `initial_state_grad` (dL/ds_0 plus the bootstrap term,
        per-example units), and statistics `loss` (nats per step),
        `masked_nats`, `mask_count`, `wrong_bits` [B], `sg_loss`, `sg_norm`
        (mean norm of the synthetic gradients at window ends), `sg_target_norm`
        (mean norm of the regression targets at window starts), `aux_loss`.
        """
        features, y, mask_p, n, num_windows, t = self._pad(x, y, mask)
        batch = tf.shape(features)[0]
        batch_f = tf.cast(batch, tf.float32)
        if mask_p is None:
            mask_p = tf.ones(tf.shape(features)[:2], tf.float32)
        mask_p = tf.cast(mask_p, tf.float32)
        if state is None:
            state = self.initial_state(batch)
        state = tf.convert_to_tensor(state, tf.float32)
        # Every window's loss is divided by B * min(T, N) (= B * t): windows weigh the
        # same, and with T >= N the objective is the ordinary per-step mean.
        steps = tf.cast(t, tf.float32)
        use_sg = self.synthetic_gradient is not None
        use_aux = self.aux_head is not None
        split_bootstrap = use_sg and self.bootstrap_scale != self.sg_scale
        core_vars = self.core_variables
        sg_vars = self.sg_variables
        accumulate = apply_fn is None

        def body(c):
            k, s = c["k"], c["s"]
            xs = _window(features, k, t)
            ys = _window(y, k, t)
            ms = _window(mask_p, k, t)
            is_last = tf.equal(k, num_windows - 1)
            with tf.GradientTape(persistent=split_bootstrap) as tape:
                # The incoming state is a plain tensor: watch it, or its gradient is None.
                tape.watch(s)
                out, new_s = self._run_core(xs, s, self._valid(k, t, n, batch))
                logits = self.head(out)
                nats = self._step_losses(logits, ys) * ms
                task_loss = tf.reduce_sum(nats) / (batch_f * steps)
                objective = task_loss
                surrogate = tf.constant(0.0)
                aux_loss = tf.constant(0.0)
                sg_next = tf.zeros_like(new_s)
                if use_sg:
                    # M read at the window's LAST state: the gradient of all later losses.
                    sg_next = tf.stop_gradient(self._predict_sg(new_s))
                    inject = 0.0 if episodic else 1.0
                    sg_next = tf.where(is_last, inject, 1.0) * sg_next  # what the core receives
                    surrogate = surrogate_objective(new_s, sg_next, batch)
                    objective += self.sg_scale * surrogate
                if use_aux:
                    # The paper's Aux task: the prediction made at the previous window's end
                    # state s_k of the synthetic gradient one window further on (the one
                    # received at s_{k+1}), trained now that it is known. The previous
                    # window is rerun from s_{k-1} so the loss shapes the core there.
                    _, prev_end = self._run_core(_window(features, tf.maximum(k - 1, 0), t),
                                                 c["prev_s"],
                                                 self._valid(tf.maximum(k - 1, 0), t, n, batch))
                    pred = self.aux_head(prev_end)
                    has_prev = tf.cast(k > 0, tf.float32)
                    aux_loss = has_prev * self.aux_weight * tf.reduce_mean(
                        tf.square(pred - sg_next))
                    objective += aux_loss
            grads = tape.gradient(objective, core_vars + [s])
            # Per-example units: M's regression target at s_k, the true gradient of the
            # window's loss plus the bootstrap (the next synthetic gradient backpropagated
            # through the window) scaled by bootstrap_scale.
            state_grad = grads[-1]
            if split_bootstrap:
                state_grad += (self.bootstrap_scale - self.sg_scale) * tape.gradient(surrogate, s)
                del tape
            state_grad = state_grad * batch_f
            core_grads = grads[:-1]
            sg_loss = tf.constant(0.0)
            sg_grads = []
            if use_sg:
                with tf.GradientTape() as sg_tape:
                    train_in = 0.0 if episodic else 1.0
                    train_in = tf.where(k > 0, 1.0, train_in)
                    sg_loss = train_in * regression_loss(self._predict_sg(s), state_grad)
                    if episodic:
                        end = tf.where(is_last, 1.0, 0.0)
                        sg_loss += end * regression_loss(self._predict_sg(new_s),
                                                         tf.zeros_like(new_s))
                sg_grads = sg_tape.gradient(sg_loss, sg_vars)
            new_c = dict(c)
            if accumulate:
                new_c["core_acc"] = [a + g for a, g in zip(c["core_acc"], core_grads)]
                new_c["sg_acc"] = [a + g for a, g in zip(c["sg_acc"], sg_grads)]
            else:
                applied = apply_fn(core_grads, sg_grads)
                with tf.control_dependencies(applied):
                    # The next window starts after this window's update.
                    new_s = tf.identity(new_s)
            wrong = (self._wrong_bits(logits, ys, ms) if self.loss_type == "bernoulli"
                     else tf.zeros([batch]))
            stats = c["stats"]
            new_c.update(
                k=k + 1, s=new_s, prev_s=s,
                first_grad=tf.where(tf.equal(k, 0), state_grad, c["first_grad"]),
                stats={
                    "loss_sum": stats["loss_sum"] + task_loss * steps,  # masked nats / B
                    "masked_nats": stats["masked_nats"] + tf.reduce_sum(nats),
                    "mask_count": stats["mask_count"] + tf.reduce_sum(ms),
                    "wrong_bits": stats["wrong_bits"] + wrong,
                    "sg_loss": stats["sg_loss"] + sg_loss,
                    "sg_norm": stats["sg_norm"] + tf.reduce_mean(tf.norm(sg_next, axis=-1)),
                    "sg_target_norm": stats["sg_target_norm"]
                    + tf.reduce_mean(tf.norm(state_grad, axis=-1)),
                    "aux_loss": stats["aux_loss"] + aux_loss,
                })
            return new_c

        zeros = lambda vs: [tf.zeros_like(v) for v in vs]  # noqa: E731
        carry = {
            "k": tf.constant(0), "s": state, "prev_s": state,
            "core_acc": zeros(core_vars) if accumulate else [],
            "sg_acc": zeros(sg_vars) if accumulate else [],
            "first_grad": tf.zeros_like(state),
            "stats": {"loss_sum": tf.constant(0.0), "masked_nats": tf.constant(0.0),
                      "mask_count": tf.constant(0.0), "wrong_bits": tf.zeros([batch]),
                      "sg_loss": tf.constant(0.0), "sg_norm": tf.constant(0.0),
                      "sg_target_norm": tf.constant(0.0), "aux_loss": tf.constant(0.0)},
        }
        if self._unrolled(num_windows):
            for _ in range(num_windows):
                carry = body(carry)
        else:
            # parallel_iterations=1: window k+1 reads the weights window k updated.
            carry = tf.while_loop(lambda c: c["k"] < num_windows, lambda c: [body(c)], [carry],
                                  parallel_iterations=1)[0]
        stats = carry["stats"]
        windows_f = tf.maximum(tf.cast(num_windows, tf.float32), 1.0)  # 0 windows: stats 0
        aux_windows = tf.maximum(windows_f - 1.0, 1.0)
        return {
            "core_grads": carry["core_acc"] if accumulate else zeros(core_vars),
            "sg_grads": carry["sg_acc"] if accumulate else zeros(sg_vars),
            "final_state": carry["s"], "initial_state_grad": carry["first_grad"],
            "loss": stats["loss_sum"] / tf.maximum(tf.cast(n, tf.float32), 1.0),
            "masked_nats": stats["masked_nats"], "mask_count": stats["mask_count"],
            "wrong_bits": stats["wrong_bits"], "sg_loss": stats["sg_loss"] / windows_f,
            "sg_norm": stats["sg_norm"] / windows_f,
            "sg_target_norm": stats["sg_target_norm"] / windows_f,
            "aux_loss": stats["aux_loss"] / aux_windows,
        }

    def synthetic_gradient_quality(self, x, y, mask=None, state=None,
                                   next_window_only: bool = False,
                                   weight_space: bool = False) -> Dict[str, object]:
        """How well M predicts the future gradient, per window, against full BPTT.

        For each window end s_{k+1} (k = 0 .. K-2), compares M(s_{k+1}) with the
        true gradient of all LATER windows' losses of this sequence w.r.t.
        s_{k+1}, from one tape over the whole sequence with the current weights
        (per-example units: B times the gradient of the batch objective; the
        windows' losses are weighted as in training). Losses beyond the batch
        are unknown, so the last window end is left out. `next_window_only`:
        the gradient of window k+1's loss alone (the part of M's regression
        target that is not bootstrapped; the paths through later windows are cut).

        Returns `cosine` [K-1] (cosine of the two flattened [B * 2H] arrays)
        and `norm_ratio` [K-1] (||M|| / ||true||), float32; and the arrays they
        come from, for fitting other predictors to the same targets:
        `states`, `true`, `predicted` [K-1, B, 2H] (window-end states, the
        true future gradients there, M's predictions) and `final_state` [B, 2H].

        With `weight_space=True` also `update_cosine`, `update_norm` and
        `update_true_norm` [K-1]: the same comparison after both are
        backpropagated through window k into the core's weights (J^T M(s_{k+1})
        against J^T true, summed over the batch), i.e. between the weight change
        the injection makes and the one full BPTT would make, and the two
        changes' norms. Per-example noise that a state-space cosine counts
        largely cancels in the sum over the batch. A window whose future holds
        no loss (a masked stretch) has a zero true change and cosine 0.
        """
        if self.synthetic_gradient is None:
            raise ValueError("synthetic_gradient_quality needs method 'dni' or 'dni_aux'")
        # A missing mask counts the given steps only, not the padding to whole windows.
        mask = tf.ones(tf.shape(y)[:2]) if mask is None else tf.cast(mask, tf.float32)
        features, y, mask_p, n, num_windows, t = self._pad(x, y, mask)
        batch = tf.shape(features)[0]
        if state is None:
            state = self.initial_state(batch)
        state = tf.convert_to_tensor(state, tf.float32)
        # A zero added to every window-end state: its gradient is the gradient of the
        # later windows' losses at that state.
        probes = tf.zeros([num_windows, batch, 2 * self.hidden_size])
        with tf.GradientTape() as tape:
            tape.watch(probes)

            def body(k, s, total, sgs, ends):
                if next_window_only:  # window k's loss reaches back one window end only
                    s = tf.stop_gradient(s) + tf.gather(probes, tf.maximum(k - 1, 0)) * tf.cast(
                        k > 0, tf.float32)
                out, new_s = self._run_core(_window(features, k, t), s,
                                            self._valid(k, t, n, batch))
                nats = self._step_losses(self.head(out), _window(y, k, t)) * _window(mask_p, k, t)
                total += tf.reduce_sum(nats) / tf.cast(batch * t, tf.float32)
                if not next_window_only:
                    new_s = new_s + tf.gather(probes, k)
                return (k + 1, new_s, total, sgs.write(k, self._predict_sg(new_s)),
                        ends.write(k, new_s))

            _, final_state, total, sgs, ends = tf.while_loop(
                lambda k, *_: k < num_windows, body,
                (tf.constant(0), state, tf.constant(0.0),
                 tf.TensorArray(tf.float32, size=num_windows),
                 tf.TensorArray(tf.float32, size=num_windows)))
        # [K-1, B, 2H], per-example units.
        # One window: no later loss, nothing to compare (empty results, not an error).
        true = tf.convert_to_tensor(tape.gradient(
            total, probes, unconnected_gradients=tf.UnconnectedGradients.ZERO))
        true = true[:-1] * tf.cast(batch, tf.float32)
        predicted = sgs.stack()[:-1]
        flat_true = tf.reshape(true, [num_windows - 1, -1])
        flat_pred = tf.reshape(predicted, [num_windows - 1, -1])
        norm_true = tf.norm(flat_true, axis=-1)
        norm_pred = tf.norm(flat_pred, axis=-1)
        tiny = 1e-12
        quality = {"cosine": tf.reduce_sum(flat_true * flat_pred, -1)
                   / tf.maximum(norm_true * norm_pred, tiny),
                   "norm_ratio": norm_pred / tf.maximum(norm_true, tiny),
                   "states": ends.stack()[:-1], "true": true, "predicted": predicted,
                   "final_state": final_state}
        if weight_space:
            starts = tf.concat([state[None], quality["states"]], 0)
            quality.update(self._weight_space_quality(features, n, t, starts, true, predicted))
        return quality

    def _weight_space_quality(self, features, n, t, starts, true, predicted):
        """Cosine and norms of J_k^T predicted[k] and J_k^T true[k] in the core's
        weights, J_k the Jacobian of window k's end state (from starts[k])."""
        batch = tf.shape(features)[0]
        core = self.core.trainable_variables

        def flat_update(tape, end, direction):
            grads = tape.gradient(end, core, output_gradients=direction,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        def body(k, cosines, norms, true_norms):
            with tf.GradientTape(persistent=True) as tape:
                _, end = self._run_core(_window(features, k, t), starts[k],
                                        self._valid(k, t, n, batch))
            by_m = flat_update(tape, end, predicted[k])
            by_true = flat_update(tape, end, true[k])
            del tape
            norm, true_norm = tf.norm(by_m), tf.norm(by_true)
            cosine = tf.reduce_sum(by_m * by_true) / tf.maximum(norm * true_norm, 1e-12)
            return (k + 1, cosines.write(k, cosine), norms.write(k, norm),
                    true_norms.write(k, true_norm))

        windows = tf.shape(true)[0]
        _, cosines, norms, true_norms = tf.while_loop(
            lambda k, *_: k < windows, body,
            (tf.constant(0),) + tuple(tf.TensorArray(tf.float32, size=windows, element_shape=[])
                                      for _ in range(3)))
        return {"update_cosine": cosines.stack(), "update_norm": norms.stack(),
                "update_true_norm": true_norms.stack()}

    # ------------------------------------------------------------ fit hooks
    def _unpack(self, data):
        x, y, mask = keras.utils.unpack_x_y_sample_weight(data)
        if mask is None:
            mask = tf.ones(tf.shape(y)[:2], tf.float32)
        return x, y, tf.cast(mask, tf.float32)

    def _apply(self, core_grads, sg_grads):
        """Clips (core and module apart), averages replicas, applies; returns [iterations]."""
        core_grads, sg_grads = list(core_grads), list(sg_grads)
        if self.clip_norm > 0:
            core_grads = tf.clip_by_global_norm(core_grads, self.clip_norm)[0]
            if sg_grads:
                sg_grads = tf.clip_by_global_norm(sg_grads, self.clip_norm)[0]
        # Apply in `trainable_variables` order: the optimizer's slots are created
        # in the order of its first apply, and a restore builds them in this order.
        grad_of = {id(v): g for v, g in zip(self.core_variables + self.sg_variables,
                                            replica_mean(core_grads + sg_grads))}
        scaled = []
        if self.sg_lr_scale != 1.0:  # the module's values before this update
            scaled = [(v, tf.identity(v.value)) for v in self.sg_variables]
        with tf.control_dependencies([old for _, old in scaled]):
            self.optimizer.apply([grad_of[id(v)] for v in self.trainable_variables],
                                 self.trainable_variables)
        # sg_lr_scale: the module's step times s, done before the next window reads M.
        assigned = [v.assign(old + self.sg_lr_scale * (v.value - old)) for v, old in scaled]
        with tf.control_dependencies(assigned):
            return [tf.identity(self.optimizer.iterations.value)]

    def train_step(self, data):
        x, y, mask = self._unpack(data)
        if not self.optimizer.built:
            # Built here, outside the window loop: no variables may be created inside it.
            if self._missing_state():
                self.build(x.shape)
            self.optimizer.build(self.trainable_variables)
        state = self.train_state.value if self.stateful else None
        if self.continuous:
            x, y, mask, later = self._take_whole_windows(x, y, mask)
        per_window = self.update == "per_window"
        r = self.compute_gradients(x, y, mask, state, episodic=self.episodic,
                                   apply_fn=self._apply if per_window else None)
        if not per_window:
            self._apply(r["core_grads"], r["sg_grads"])
        if self.stateful:
            self.train_state.assign(r["final_state"])
        if self.continuous:
            self._keep_pending(*later)
        self._trackers["cell_norm"].update_state(
            tf.reduce_mean(tf.norm(r["final_state"][:, self.hidden_size:], axis=-1)))
        # A continuous batch runs a varying number of steps (none at all when no window
        # completes): its loss weighs by them.
        self._update_metrics(r["loss"], r["masked_nats"], r["mask_count"], r["wrong_bits"],
                             y, mask, loss_weight=(tf.cast(tf.shape(mask)[1], tf.float32)
                                                   if self.continuous else None))
        if self.synthetic_gradient is not None:
            self._trackers["sg_loss"].update_state(r["sg_loss"])
            self._trackers["sg_norm"].update_state(r["sg_norm"])
            self._trackers["sg_target_norm"].update_state(r["sg_target_norm"])
        if self.aux_head is not None:
            self._trackers["aux_loss"].update_state(r["aux_loss"])
        if self.curriculum is not None:
            error = tf.reduce_mean(r["wrong_bits"])
            replica = tf.distribute.get_replica_context()
            if replica is not None and replica.num_replicas_in_sync > 1:
                # Every replica's copy of the curriculum decides on the whole batch.
                error = replica.all_reduce(tf.distribute.ReduceOp.MEAN, error)
            self.curriculum.update(error)
        return {m.name: m.result() for m in self.metrics}

    def _take_whole_windows(self, x, y, mask):
        """Continuous stream: (x, y, mask) of the whole windows that the pending steps
        and this batch make, and the leftover (x, y, mask) for the next batch."""
        waiting = self.pending_steps.value
        x = tf.concat([self.pending_x[:, :waiting], tf.cast(x, tf.float32)], axis=1)
        y = tf.concat([self.pending_y[:, :waiting], tf.cast(y, tf.float32)], axis=1)
        mask = tf.concat([self.pending_mask[:, :waiting], mask], axis=1)
        whole = tf.shape(x)[1] // self.truncation * self.truncation
        return x[:, :whole], y[:, :whole], mask[:, :whole], (x[:, whole:], y[:, whole:],
                                                             mask[:, whole:])

    def _keep_pending(self, x, y, mask):
        """Stores the < T steps after the last whole window for the next batch."""
        steps = tf.shape(x)[1]
        fill = [[0, 0], [0, self.truncation - steps]]
        for variable, value in ((self.pending_x, tf.pad(x, fill + [[0, 0]])),
                                (self.pending_y, tf.pad(y, fill + [[0, 0]])),
                                (self.pending_mask, tf.pad(mask, fill))):
            variable.assign(tf.ensure_shape(value, variable.shape))
        self.pending_steps.assign(steps)

    def test_step(self, data):
        x, y, mask = self._unpack(data)
        state = self.eval_state.value if self.stateful else None
        logits, final_state = self.forward(x, state)
        if self.stateful:
            self.eval_state.assign(final_state)
        nats = self._step_losses(logits, y) * mask
        n = tf.cast(tf.shape(mask)[1], tf.float32)
        loss = tf.reduce_sum(nats) / (tf.cast(tf.shape(mask)[0], tf.float32) * n)
        wrong = (self._wrong_bits(logits, y, mask) if self.loss_type == "bernoulli"
                 else tf.zeros([tf.shape(mask)[0]]))
        self._update_metrics(loss, tf.reduce_sum(nats), tf.reduce_sum(mask), wrong, y, mask)
        return {m.name: m.result() for m in self.metrics
                if m.name in ("loss", "bit_errors", "sequence_error", "bpc")}

    def _update_metrics(self, loss, masked_nats, mask_count, wrong_bits, y, mask,
                        loss_weight=None):
        if self.loss_type == "categorical":
            # Weighted by characters so the epoch value is the corpus BPC.
            per_char = masked_nats / tf.maximum(mask_count, 1.0)
            self._trackers["loss"].update_state(per_char, sample_weight=mask_count)
            self._trackers["bpc"].update_state(bits_per_character(per_char),
                                               sample_weight=mask_count)
        else:
            self._trackers["loss"].update_state(loss, sample_weight=loss_weight)
            self._trackers["bit_errors"].update_state(wrong_bits)
            self._trackers["sequence_error"].update_state(
                tf.cast(wrong_bits > 0, tf.float32))


class ResetEvalState(keras.callbacks.Callback):
    """Zeroes a stateful model's evaluation state before every evaluation."""

    def on_test_begin(self, logs=None):
        if getattr(self.model, "stateful", False):
            self.model.reset_eval_state()
