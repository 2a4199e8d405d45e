"""Tests for dni_tf.data.sequence_tasks: Copy / Repeat Copy layouts and the curriculum."""

import numpy as np
import pytest
import tensorflow as tf

from dni_tf.data import sequence_tasks as st


def test_copy_targets_are_the_inputs_and_mask_covers_the_answer():
    x, y, mask = (t.numpy() for t in st.copy_batch(tf.constant([1, 2], tf.int64), 3, 5, 4))
    assert x.shape == (3, 11, 5) and y.shape == (3, 11, 4) and mask.shape == (3, 11)
    np.testing.assert_array_equal(y[:, 6:], x[:, :5, :4])          # answer = the input bits
    np.testing.assert_array_equal(mask, np.repeat([[0] * 6 + [1] * 5], 3, axis=0))
    np.testing.assert_array_equal(x[:, 5], np.repeat([[0, 0, 0, 0, 1]], 3, axis=0))  # delimiter
    assert x[:, :5, 4].sum() == 0 and x[:, 6:].sum() == 0          # blank answer phase
    assert y[:, :6].sum() == 0
    assert set(np.unique(x[:, :5, :4])) == {0.0, 1.0}


@pytest.mark.parametrize("repeats", [1, 3])
def test_repeat_copy_repeats_and_marks_the_end(repeats):
    length, bits, max_repeats = 3, 4, 4
    x, y, mask = (t.numpy() for t in st.repeat_copy_batch(
        tf.constant([3, 4], tf.int64), 2, length, repeats, bits, max_repeats))
    n = length + 1 + length * repeats + 1
    assert x.shape == (2, n, bits + 2) and y.shape == (2, n, bits + 1)
    source = x[:, :length, :bits]
    answer = y[:, length + 1:length + 1 + length * repeats, :bits]
    np.testing.assert_array_equal(answer, np.tile(source, (1, repeats, 1)))
    assert np.all(y[:, -1, bits] == 1) and y[:, :-1, bits].sum() == 0    # end marker
    assert np.all(x[:, length, bits] == 1)                               # delimiter
    np.testing.assert_allclose(x[:, length, bits + 1], repeats / max_repeats)  # repeat count
    np.testing.assert_array_equal(mask[0], [0] * (length + 1) + [1] * (length * repeats + 1))


def test_dataset_is_deterministic_and_seeded():
    a = [b[0].numpy() for b in st.task_dataset("repeat_copy", 2, 3, seed=7, num_batches=3)]
    b = [b[0].numpy() for b in st.task_dataset("repeat_copy", 2, 3, seed=7, num_batches=3)]
    c = [b[0].numpy() for b in st.task_dataset("repeat_copy", 2, 3, seed=8, num_batches=3)]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert any(u.shape != w.shape or not np.array_equal(u, w) for u, w in zip(a, c))


def test_curriculum_advances_only_when_solved_and_stream_follows():
    curriculum = st.Curriculum(min_length=2, max_length=3, threshold=0.15, check_every=3)
    iterator = iter(st.task_dataset("copy", 2, curriculum, seed=0))
    assert next(iterator)[0].shape[1] == 2 * 2 + 1
    for error in (0.0, 0.0, 0.5):  # mean 0.167 >= 0.15: not solved
        curriculum.update(error)
    assert int(curriculum.length.value) == 2 and int(curriculum.max_solved.value) == 0
    for error in (0.1, 0.2, 0.0):  # mean 0.1 < 0.15: solved, lengthen
        curriculum.update(error)
    assert int(curriculum.length.value) == 3 and int(curriculum.max_solved.value) == 2
    assert next(iterator)[0].shape[1] == 2 * 3 + 1  # the stream reads the new length
    for _ in range(3):
        curriculum.update(0.0)
    assert int(curriculum.length.value) == 3 and int(curriculum.max_solved.value) == 3  # capped


def test_curriculum_position_restores(tmp_path):
    import keras
    a = st.Curriculum(check_every=1)
    a.update(0.0)
    a.update(0.0)
    model = keras.Sequential([keras.Input((1,)), a])
    path = str(tmp_path / "c.weights.h5")
    model.save_weights(path)
    b = st.Curriculum(check_every=1)
    keras.Sequential([keras.Input((1,)), b]).load_weights(path)
    assert int(b.length.value) == 3 and int(b.max_solved.value) == 2


def test_bad_task():
    with pytest.raises(ValueError, match="task"):
        st.task_dataset("sort", 2, 3)
    with pytest.raises(ValueError, match="task"):
        st.task_channels("sort")


def test_repeat_curriculum_grows_length_and_repeats_alternately():
    curriculum = st.Curriculum(1, 3, threshold=1.0, check_every=1, max_repeats=2)
    levels = []
    for _ in range(5):
        curriculum.update(0.0)  # always solved
        levels.append((int(curriculum.length.value), int(curriculum.repeats.value)))
    # (1,1) -> N; (2,1) -> R; (2,2) -> N; R capped at 2 -> N until N is capped too.
    assert levels == [(2, 1), (2, 2), (3, 2), (3, 2), (3, 2)]
    assert int(curriculum.max_solved.value) == 3 and int(curriculum.max_repeats_solved.value) == 2
    copy = st.Curriculum(1, 5, threshold=1.0, check_every=1)  # Copy: repeats stay 1
    copy.update(0.0)
    assert int(copy.length.value) == 2 and int(copy.repeats.value) == 1


def test_repeat_copy_stream_uses_the_curriculum_repeats():
    curriculum = st.Curriculum(2, 5, threshold=1.0, check_every=1, max_repeats=4)
    for _ in range(2):
        curriculum.update(0.0)  # (2, 1) -> (2, 2) -> (3, 2)
    n, r = int(curriculum.length.value), int(curriculum.repeats.value)
    assert (n, r) == (3, 2)
    x, y, mask = next(iter(st.task_dataset("repeat_copy", 2, curriculum, seed=1, num_bits=3,
                                           max_repeats=4)))
    assert x.shape[1] == n + 1 + n * r + 1
    np.testing.assert_allclose(x[:, n, 4].numpy(), r / 4)  # count channel, scaled by the cap
    np.testing.assert_array_equal(x[:, n, 3].numpy(), 1)   # delimiter channel


def test_uniform_sampling_draws_levels_up_to_the_current_one():
    curriculum = st.Curriculum(6, 6, check_every=1, max_repeats=3)
    curriculum.repeats.assign(3)
    data = st.task_dataset("repeat_copy", 1, curriculum, seed=2, num_bits=2, max_repeats=3,
                           num_batches=60, sampling="uniform")
    levels = set()
    for x, _, mask in data:
        n = int(np.argmax(x[0, :, 2].numpy()))  # the delimiter row is L
        r = int(round(float(x[0, n, 3]) * 3))
        assert x.shape[1] == n + 1 + n * r + 1
        levels.add((n, r))
    lengths, repeats = {n for n, _ in levels}, {r for _, r in levels}
    assert lengths == set(range(1, 7)) and repeats == {1, 2, 3}
    with pytest.raises(ValueError, match="sampling"):
        st.task_dataset("copy", 1, curriculum, sampling="all")
