"""How much of the true future gradient could ANY linear module predict? (Copy runs.)

    python scripts/sg_linear_bound.py --workdir=runs/copy_sg0.01/seed0/dni_T4 [--batches=200]
        [--next_window_only]

Recurrent DNI's module M is linear in the window-end state s. `--diagnostics`
reports how well the trained M predicts the true gradient of an episode's later
losses (cosine over the flattened batch). This script asks whether a low cosine
means M is under-trained or that the target is not linearly predictable from s:
it loads a finished or checkpointed Copy run (dni or dni_aux), streams
`--batches` fresh batches at the curriculum's level through the trained core
with the state carried from batch to batch (as in training, from the state the
checkpoint holds; no updates; in the continuous stream, segments of four
episodes after the checkpoint's pending steps, cut at training's window ends,
`recurrent_dni.stream_segment`), collects the window-end states and the true future
gradients there (full BPTT over each batch or segment,
`TruncatedBPTT.synthetic_gradient_quality`), fits the best affine map s -> gradient
by ridge regression on the first half of the samples, and prints on the second
half: M's cosine and norm ratio, and the fitted map's (the ceiling for a linear
M of this core, on these states), with the in-sample fit for reference; and M's
cosine and norm ratio in the core's weights (the weight change M's injection makes
in each window against the one full BPTT would make, summed over the batch,
`weight_space=True` of `synthetic_gradient_quality`; pooled over the held-out
windows like the rows above: the cosine of the concatenated changes).
"""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def _cosine(a, b):
    import numpy as np
    return float(np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def linear_bound(workdir: str, batches: int = 200, ridge: float = 1e-3,
                 next_window_only: bool = False) -> dict:
    """Scores of the trained M and of the best affine map (see the module docstring).

    `next_window_only`: the target is the gradient of the next window's loss alone
    (the part of M's training target that is not bootstrapped), not all later losses.

    Raises ValueError (a usage error: no run, or a run without a module) or
    RuntimeError (the run's level fits one window: nothing to predict).
    """
    import numpy as np
    import tensorflow as tf
    from dni_tf.harness import results
    from dni_tf.harness.callbacks import ResumableCheckpoint
    from dni_tf.studies import recurrent_dni as study
    from dni_tf.truncated_bptt import pooled_update_scores

    settings = results.saved_settings(workdir) if workdir and os.path.isdir(workdir) else None
    # The training's own checkpoint list: never a temporary a killed save left behind.
    checkpoints = (ResumableCheckpoint.checkpoints(os.path.join(workdir, "checkpoints"))
                   if settings else [])
    if not checkpoints:
        raise ValueError(f"--workdir: needs a Copy run directory with settings.json and "
                         f"checkpoints/*.weights.h5, got {workdir!r}")
    if batches < 2:
        raise ValueError(f"--batches: needs at least 2 (half fit, half score), got {batches}")
    fields = {k: v for k, v in settings.items()
              if k in study.CopyTaskConfig.__dataclass_fields__}
    cfg = study.CopyTaskConfig(**fields)
    if cfg.method == "bptt":
        raise ValueError("--workdir: a bptt run has no synthetic gradient module")
    model, curriculum = study.build_copy_model(cfg)
    checkpoint = checkpoints[0][1]  # newest first
    model.load_weights(checkpoint)
    length = int(curriculum.length.value)
    repeats = int(curriculum.repeats.value)
    states, trues, preds, updates = [], [], [], []
    leftover = None
    half = batches // 2  # the map is fitted on the first half, scored on the second
    for i in range(batches):
        seed = tf.constant([cfg.seed + 3_000_017, i], tf.int64)
        if i == 0:
            (x, y, mask), state, leftover = study.diagnostic_batch(cfg, curriculum, model, seed)
        elif model.continuous:  # the stream goes on where the last segment was cut
            (x, y, mask), leftover = study.stream_segment(cfg, curriculum, seed, leftover)
        else:
            x, y, mask = study.level_batch(cfg, curriculum, seed)
        q = model.synthetic_gradient_quality(x, y, mask, state=state,
                                             next_window_only=next_window_only,
                                             weight_space=i >= half)
        if not q["states"].shape[0]:
            raise RuntimeError(f"the curriculum's level (L={length}) fits one window of "
                               f"T={cfg.truncation}: no window end to predict at")
        states.append(q["states"].numpy())
        trues.append(q["true"].numpy())
        preds.append(q["predicted"].numpy())
        if i >= half:
            updates.append(np.stack([q["update_cosine"], q["update_norm"],
                                     q["update_true_norm"]], 1))
        if model.stateful:
            state = q["final_state"]
    # Per batch [K-1, B, 2H] (K varies along a continuous stream): fit on the first half
    # of the batches, score on the second.
    dim = states[0].shape[-1]

    def rows(arrays):
        return np.concatenate([a.reshape(-1, dim) for a in arrays])

    s_fit, g_fit = rows(states[:half]), rows(trues[:half])
    s_test, g_test, p_test = rows(states[half:]), rows(trues[half:]), rows(preds[half:])
    design = np.concatenate([s_fit, np.ones([len(s_fit), 1])], 1)
    penalty = ridge * float(np.mean(s_fit ** 2)) * len(s_fit)
    w = np.linalg.solve(design.T @ design + penalty * np.eye(dim + 1), design.T @ g_fit)
    fitted_test = np.concatenate([s_test, np.ones([len(s_test), 1])], 1) @ w
    return {
        "method": cfg.method, "truncation": cfg.truncation, "task": cfg.task,
        "length": length, "repeats": repeats, "checkpoint": os.path.basename(checkpoint),
        "target": "next window's loss" if next_window_only else "all later losses",
        "held_out_rows": len(s_test),
        "m_cosine": _cosine(p_test, g_test),
        "m_norm_ratio": float(np.linalg.norm(p_test) / np.linalg.norm(g_test)),
        "fit_cosine": _cosine(fitted_test, g_test),
        "fit_norm_ratio": float(np.linalg.norm(fitted_test) / np.linalg.norm(g_test)),
        "fit_in_sample_cosine": _cosine(design @ w, g_fit),
        **dict(zip(("m_update_cosine", "m_update_norm_ratio"),
                   pooled_update_scores(*np.concatenate(updates).T))),
    }


def report(workdir: str, r: dict) -> str:
    level = f"L={r['length']}" + (f", R={r['repeats']}" if r["task"] == "repeat_copy" else "")
    return (f"{workdir}: {r['method']} T={r['truncation']}, {level}, checkpoint "
            f"{r['checkpoint']}, {r['held_out_rows']} held-out window ends, target: "
            f"{r['target']}\n"
            f"  trained M:         cosine {r['m_cosine']:.3f}  "
            f"norm ratio {r['m_norm_ratio']:.3f}\n"
            f"  best affine map:   cosine {r['fit_cosine']:.3f}  "
            f"norm ratio {r['fit_norm_ratio']:.3f}  "
            f"(in-sample cosine {r['fit_in_sample_cosine']:.3f})\n"
            f"  trained M in the core's weights: cosine {r['m_update_cosine']:.3f}  "
            f"norm ratio {r['m_update_norm_ratio']:.3f}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A Copy run directory (settings.json, checkpoints/).")
    flags.DEFINE_integer("batches", 200, "Batches to stream (half fit the map, half score it).")
    flags.DEFINE_float("ridge", 1e-3, "Ridge penalty, relative to the mean squared state.",
                       lower_bound=0.0)
    flags.DEFINE_bool("next_window_only", False, "Target: the gradient of the next window's "
                      "loss alone (M's unbootstrapped target), not of all later losses.")

    def main(argv):
        del argv
        FLAGS = flags.FLAGS
        try:
            print(report(FLAGS.workdir, linear_bound(FLAGS.workdir, FLAGS.batches, FLAGS.ridge,
                                                        FLAGS.next_window_only)))
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 1
        return 0

    app.run(lambda argv: sys.exit(main(argv)))
