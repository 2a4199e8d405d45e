"""Penn Treebank characters as contiguous streams for truncated BPTT.

Files: Mikolov's `ptb/ptb.char.{train,valid,test}.txt` under the data directory
(`data_dir`, else `$DNI_TF_DATA_DIR`). Each line is one sentence written as
space-separated characters with `_` for word boundaries; every line ends with
an end-of-line symbol `\\n` here, so the model also predicts sentence ends.
The vocabulary is the sorted set of training symbols (50 with `\\n`).

Streams (`stream_dataset`): the id sequence is cut into `batch_size` equal
contiguous rows (row b holds characters [b*R, (b+1)*R + 1)), and batch i holds
columns [i*L, (i+1)*L) of every row, inputs `x` and next-character targets `y`
(both int32 [batch_size, L]). Consecutive batches continue each row exactly
where the previous batch stopped, so a stateful model carries its state across
batches (the standard truncated-BPTT layout).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from dni_tf.data.images import check_finite, default_data_dir
from dni_tf.errors import DataError

SPLITS = ("train", "valid", "test")
EOL = "\n"


@dataclasses.dataclass
class CharCorpus:
    """Character ids of the three splits and the vocabulary (index = id)."""

    vocab: List[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    source: str

    def __post_init__(self):
        for split in SPLITS:
            setattr(self, split, character_ids(getattr(self, split), f"{self.source}: {split}",
                                               len(self.vocab)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def decode(self, ids) -> str:
        return "".join(" " if self.vocab[i] == "_" else self.vocab[i] for i in ids)


def character_ids(ids, what: str, vocab_size: Optional[int] = None) -> np.ndarray:
    """`ids` as an int32 array; DataError naming `what` for NaN/inf, fractions or bad ids.

    Float arrays are accepted only when every value is a finite whole number
    (a NaN cast to int32 would silently become an arbitrary id).
    """
    array = np.asarray(ids)
    if array.dtype == np.int32:
        values = array
    else:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"{what}: expected integer character ids, got dtype {array.dtype}")
        check_finite(array, what)
        if np.issubdtype(array.dtype, np.inexact) and np.any(array != np.round(array)):
            raise DataError(f"{what}: character ids must be whole numbers")
        values = array.astype(np.int32)
    if values.size and (values.min() < 0 or (vocab_size is not None and values.max() >= vocab_size)):
        upper = "" if vocab_size is None else f", {vocab_size - 1}"
        raise DataError(f"{what}: character ids must be in [0{upper}], got "
                        f"{values.min()}..{values.max()}")
    return values


def ptb_char_paths(data_dir: Optional[str] = None) -> Dict[str, str]:
    """Paths of the three char files; DataError if the directory is unknown or a file is missing."""
    root = default_data_dir(data_dir)
    if not root:
        raise DataError("Penn Treebank characters need --data_dir or $DNI_TF_DATA_DIR pointing "
                        "at a directory with ptb/ptb.char.{train,valid,test}.txt")
    paths = {s: os.path.join(root, "ptb", f"ptb.char.{s}.txt") for s in SPLITS}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if not os.path.isdir(root):
        what = "a file" if os.path.exists(root) else "missing"
        raise DataError(f"data directory {root} is {what}, not a directory holding "
                        f"{', '.join(missing)} (Mikolov's simple-examples ptb.char.*.txt)")
    if missing:
        raise DataError(f"missing Penn Treebank character file(s): {', '.join(missing)} "
                        "(Mikolov's simple-examples ptb.char.*.txt)")
    return paths


def _read_symbols(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    symbols = []
    for line in lines:
        tokens = line.split()
        if tokens:
            symbols.extend(tokens)
            symbols.append(EOL)
    if not symbols:
        raise DataError(f"{path}: no characters")
    return symbols


def load_ptb_chars(data_dir: Optional[str] = None) -> CharCorpus:
    """Loads PTB characters as int32 id arrays (vocabulary from train)."""
    paths = ptb_char_paths(data_dir)
    symbols = {s: _read_symbols(p) for s, p in paths.items()}
    vocab = sorted(set(symbols["train"]))
    index = {c: i for i, c in enumerate(vocab)}
    ids = {}
    for split, seq in symbols.items():
        unknown = sorted(set(seq) - index.keys())
        if unknown:
            raise DataError(f"{paths[split]}: symbols not in the training vocabulary: "
                            f"{unknown[:5]}")
        ids[split] = np.fromiter((index[c] for c in seq), dtype=np.int32, count=len(seq))
    return CharCorpus(vocab, ids["train"], ids["valid"], ids["test"],
                      source=os.path.dirname(paths["train"]))


def stream_arrays(ids: np.ndarray, batch_size: int, length: int):
    """(x, y) int32 arrays [num_batches, batch_size, length] of contiguous rows.

    Characters that do not fill a whole batch at the end are dropped.
    """
    ids = character_ids(ids, "character stream")
    row = (len(ids) - 1) // batch_size
    num_batches = row // length
    if num_batches < 1:
        raise ValueError(f"{len(ids)} characters are too few for batch_size={batch_size} "
                         f"and length={length}")
    row = num_batches * length
    starts = np.arange(batch_size) * ((len(ids) - 1) // batch_size)
    grid = starts[:, None] + np.arange(row + 1)[None, :]
    rows = ids[grid]  # [B, row + 1]
    x = rows[:, :-1].reshape(batch_size, num_batches, length).transpose(1, 0, 2)
    y = rows[:, 1:].reshape(batch_size, num_batches, length).transpose(1, 0, 2)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def stream_dataset(ids: np.ndarray, batch_size: int, length: int, repeat: bool = False,
                   max_batches: Optional[int] = None) -> tf.data.Dataset:
    """Batches `(x, y)` of contiguous streams, in order (see module docstring).

    `repeat=True` loops over the corpus forever (a stateful model then runs
    from the end of each row into its start: one discontinuity per epoch).
    `max_batches` keeps only the first batches (a quicker evaluation).
    """
    x, y = stream_arrays(ids, batch_size, length)
    if max_batches is not None:
        x, y = x[:max_batches], y[:max_batches]
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if repeat:
        dataset = dataset.repeat()
    return dataset

