"""Tests for dni_tf.data.text: PTB characters and contiguous streams."""

import os

import numpy as np
import pytest

from dni_tf.data import DataError
from dni_tf.data import text


def test_streams_are_contiguous_across_batches():
    ids = np.arange(1000, dtype=np.int32)
    x, y = text.stream_arrays(ids, batch_size=4, length=10)
    assert x.shape == y.shape == (24, 4, 10)  # (999 // 4) // 10 batches
    np.testing.assert_array_equal(y[:, :, :-1], x[:, :, 1:])   # targets = next character
    np.testing.assert_array_equal(x[1, :, 0], x[0, :, -1] + 1)  # batch i+1 continues batch i
    np.testing.assert_array_equal(x[0, :, 0], [0, 249, 498, 747])
    batches = list(text.stream_dataset(ids, 4, 10, max_batches=3))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[2][0], x[2])


def test_small_corpus_files(tmp_path):
    (tmp_path / "ptb").mkdir()
    for split, line in (("train", "a b _ c\nb a\n"), ("valid", "a _ b\n"), ("test", "c\n")):
        (tmp_path / "ptb" / f"ptb.char.{split}.txt").write_text(line)
    corpus = text.load_ptb_chars(str(tmp_path))
    assert corpus.vocab == ["\n", "_", "a", "b", "c"]
    assert corpus.decode(corpus.train) == "ab c\nba\n"
    assert corpus.test.tolist() == [4, 0]


def test_missing_files_raise_data_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="ptb.char.train.txt"):
        text.load_ptb_chars(str(tmp_path))
    monkeypatch.delenv("DNI_TF_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="DNI_TF_DATA_DIR"):
        text.ptb_char_paths(None)


def test_real_ptb_characters():
    data_dir = os.environ.get("DNI_TF_DATA_DIR")
    if not data_dir:
        pytest.skip("DNI_TF_DATA_DIR not set: real PTB character files unavailable")
    corpus = text.load_ptb_chars(data_dir)
    # 4,975,414 character tokens + one end-of-line per line (42,068 lines).
    assert len(corpus.train) == 4_975_414 + 42_068
    assert len(corpus.valid) == 389_672 + 3_370
    assert len(corpus.test) == 438_662 + 3_761
    assert corpus.vocab_size == 50


def test_non_finite_or_fractional_ids_are_a_data_error():
    ids = np.arange(100, dtype=np.float32)
    ids[7] = np.nan
    with pytest.raises(DataError, match="character stream: 1 of 100 values are NaN or infinite"):
        text.stream_arrays(ids, batch_size=2, length=5)
    with pytest.raises(DataError, match="NaN or infinite"):
        text.stream_dataset(np.where(np.arange(100) == 3, np.inf, 1.0), 2, 5)
    with pytest.raises(DataError, match="whole numbers"):
        text.stream_arrays(np.arange(100) + 0.5, batch_size=2, length=5)
    x, _ = text.stream_arrays(np.arange(100, dtype=np.float64), batch_size=2, length=5)
    assert x.dtype == np.int32 and x[0, 1, 0] == 49
    good = np.array([0, 1, 2], np.int32)
    with pytest.raises(DataError, match="my corpus: valid: 1 of 3 values are NaN"):
        text.CharCorpus(["a", "b", "c"], good, np.array([0.0, np.nan, 1.0]), good, "my corpus")
    with pytest.raises(DataError, match=r"my corpus: test: character ids must be in \[0, 2\]"):
        text.CharCorpus(["a", "b", "c"], good, good, np.array([0, 3]), "my corpus")


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"a_file is a file, not a directory holding .*ptb.char.train.txt"):
        text.load_ptb_chars(str(a_file))
