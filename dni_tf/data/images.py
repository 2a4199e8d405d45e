"""Image classification datasets as `tf.data` pipelines.

Every dataset is returned as an `ImageData`: float32 images in [0, 1]
of shape [N, H, W, C] (NHWC) and int32 labels of shape [N]. Sources are tried in
this order, and the first that works wins:

1. the standard files under an explicit `data_dir` (or `$DNI_TF_DATA_DIR`):
   `mnist/` and `fashion_mnist/` with the four IDX `.gz` files, `cifar10/` with
   `cifar-10-batches-py/`;
2. for Fashion-MNIST, the files Debian's `dataset-fashion-mnist` package installs;
3. tensorflow-datasets (its local cache first, then a download).

An explicit `data_dir` (the `--data_dir` flag) is the only source tried: if it
does not hold the files, `DataError` names the expected paths (no fall-through,
no download). Only `$DNI_TF_DATA_DIR` or no directory at all falls through to
2 and 3.

`digits` is scikit-learn's bundled set of 1,797 real 8x8 handwritten digits,
resized to 28x28 so the MNIST models run on it unchanged; it needs no download.

A truncated or corrupt file raises `DataError` naming the file; a file is never
read as silently fewer examples. Float arrays (an `ImageData` built from the
caller's arrays, tensorflow-datasets output) must be finite: NaN or infinite
values raise `DataError` naming the source.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
import zlib
from typing import Optional, Tuple

import numpy as np

from dni_tf.errors import DataError

DATA_DIR_ENV = "DNI_TF_DATA_DIR"
# Set to 0 to never try tensorflow-datasets (offline machines, tests).
USE_TFDS_ENV = "DNI_TF_USE_TFDS"
IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
# Where Debian's `dataset-fashion-mnist` package installs the four IDX files.
DEBIAN_FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_EXPECTED_COUNTS = {
    "mnist": {"train": 60000, "test": 10000},
    "fashion_mnist": {"train": 60000, "test": 10000},
    "cifar10": {"train": 50000, "test": 10000},
}

Array = np.ndarray


@dataclasses.dataclass
class ImageData:
    """An image classification dataset held in memory.

    Attributes:
      name: dataset name, one of `IMAGE_DATASETS`.
      source: where the arrays came from (a directory, "tfds", "scikit-learn").
      train, test: `(images, labels)`; images float32 [N, H, W, C] in [0, 1],
        labels int32 [N].
      validation: same, carved from the end of train, or None.
      num_classes: number of label values.
    """

    name: str
    source: str
    train: Tuple[Array, Array]
    test: Tuple[Array, Array]
    validation: Optional[Tuple[Array, Array]]
    num_classes: int

    def __post_init__(self):
        splits = [("train", self.train), ("test", self.test)]
        if self.validation is not None:
            splits.append(("validation", self.validation))
        for split, arrays in splits:
            for kind, array in zip(("images", "labels"), arrays):
                check_finite(array, f"{self.source}: {self.name} {split} {kind}")

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])

    def train_dataset(self, batch_size: int, seed: int = 0, repeat: bool = True):
        """Shuffled (reshuffled each epoch, seeded), batched, prefetched train set.

        Batches are full (`drop_remainder=True`) so every step sees `batch_size`
        examples, as the published setups assume.
        """
        return make_dataset(*self.train, batch_size=batch_size, shuffle=True,
                            seed=seed, repeat=repeat, drop_remainder=True)

    def test_dataset(self, batch_size: int = 1000):
        """Unshuffled test set in batches of `batch_size` (last may be smaller)."""
        return make_dataset(*self.test, batch_size=batch_size, shuffle=False)

    def validation_dataset(self, batch_size: int = 1000):
        if self.validation is None:
            raise ValueError("no validation split: pass validation_size > 0")
        return make_dataset(*self.validation, batch_size=batch_size, shuffle=False)


def check_finite(array, what: str) -> None:
    """Raises DataError("<what> ... NaN or infinite") if a float array holds such values.

    Integer arrays (the uint8 files, int labels) cannot and are not scanned.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(f"{what}: {bad} of {array.size} values are NaN or infinite; "
                        "give finite inputs")


def make_dataset(images: Array, labels: Array, batch_size: int, shuffle: bool,
                 seed: int = 0, repeat: bool = False, drop_remainder: bool = False):
    """`tf.data.Dataset` of `(images, labels)` batches from in-memory arrays."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def default_data_dir(data_dir: Optional[str] = None) -> Optional[str]:
    """`data_dir` if given, else `$DNI_TF_DATA_DIR`, else None."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def load_image_data(name: str, data_dir: Optional[str] = None,
                    validation_size: int = 0, use_tfds: Optional[bool] = None,
                    check_counts: bool = True) -> ImageData:
    """Loads `name` from the first source that works (see the module docstring).

    Args:
      name: one of `IMAGE_DATASETS`.
      data_dir: directory holding `mnist/`, `fashion_mnist/`, `cifar10/`;
        defaults to `$DNI_TF_DATA_DIR`.
      validation_size: number of examples moved from the end of train into a
        validation split (0: none).
      use_tfds: whether tensorflow-datasets may be tried (it may download);
        default: unless `$DNI_TF_USE_TFDS` is 0.
      check_counts: require the standard split sizes (60k/10k, 50k/10k), so a
        file holding fewer examples is an error; False for reduced copies.

    Raises:
      ValueError: unknown name or bad validation_size.
      DataError: no source worked (the message lists what was tried), or a file
        is corrupt or truncated (the message names it).
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(IMAGE_DATASETS)}")
    if use_tfds is None:
        use_tfds = os.environ.get(USE_TFDS_ENV, "1") != "0"
    if name == "digits":
        source, train, test, num_classes = "scikit-learn", *_load_digits(), 10
    else:
        if data_dir:  # explicit: only there, no fall-through and no download
            source, train, test = _load_from_data_dir(name, data_dir, check_counts)
        else:
            source, train, test = _load_from_sources(name, default_data_dir(data_dir),
                                                     use_tfds, check_counts)
        num_classes = 10
    validation = None
    if validation_size:
        if not 0 < validation_size < len(train[1]):
            raise ValueError(f"validation_size must be in [0, {len(train[1])}), got {validation_size}")
        validation = (train[0][-validation_size:], train[1][-validation_size:])
        train = (train[0][:-validation_size], train[1][:-validation_size])
    return ImageData(name, source, train, test, validation, num_classes)


def _expected_files(name, directory):
    if name == "cifar10":
        return [os.path.join(directory, "cifar-10-batches-py", f)
                for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]
    return [os.path.join(directory, f) for pair in _IDX_FILES.values() for f in pair]


def _load_from_data_dir(name, data_dir, check_counts):
    """Loads `name` from an explicitly given directory only; DataError names what is missing."""
    sub = os.path.join(data_dir, "cifar10" if name == "cifar10" else name)
    expected = _EXPECTED_COUNTS[name] if check_counts else None
    if not os.path.isdir(data_dir):
        what = "a file" if os.path.exists(data_dir) else "missing"
        raise DataError(f"could not load {name}: --data_dir={data_dir} is {what}, not a "
                        f"directory; it must hold {', '.join(_expected_files(name, sub))}")
    for directory in (sub, data_dir):
        if name == "cifar10":
            found = _find_cifar_dir(directory)
            if found:
                return found, *load_cifar10_dir(found, expected)
        elif all(os.path.exists(f) for f in _expected_files(name, directory)):
            return directory, *load_idx_dir(directory, expected)
    # Name the files missing from the layout closer to complete (sub/ by default).
    missing = min(([f for f in _expected_files(name, d) if not os.path.exists(f)]
                   for d in (sub, data_dir)), key=len)
    raise DataError(f"could not load {name}: --data_dir={data_dir} does not hold the data; "
                    f"missing {', '.join(missing)} (tensorflow-datasets is not tried for an "
                    f"explicit --data_dir)")


def _load_from_sources(name, data_dir, use_tfds, check_counts):
    tried = []
    candidate_dirs = []
    if data_dir:
        sub = "cifar10" if name == "cifar10" else name
        candidate_dirs += [os.path.join(data_dir, sub), data_dir]
    if name == "fashion_mnist":
        candidate_dirs += list(DEBIAN_FASHION_MNIST_DIRS)
    for directory in candidate_dirs:
        if name == "cifar10":
            found = _find_cifar_dir(directory)
            if found:
                return found, *load_cifar10_dir(found, _EXPECTED_COUNTS[name] if check_counts else None)
            tried.append(f"{directory}/cifar-10-batches-py (not found)")
        else:
            if all(os.path.exists(os.path.join(directory, f)) for pair in _IDX_FILES.values() for f in pair):
                return directory, *load_idx_dir(directory, _EXPECTED_COUNTS[name] if check_counts else None)
            tried.append(f"{directory} (no IDX .gz files)")
    if use_tfds:
        try:
            return "tfds", *_load_tfds(name)
        except Exception as exc:  # noqa: BLE001 - any tfds failure means "try next/report"
            tried.append(f"tensorflow-datasets ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
    if not data_dir:
        tried.append(f"--data_dir / ${DATA_DIR_ENV} (not set)")
    files = ("cifar10/cifar-10-batches-py/" if name == "cifar10"
             else f"{name}/" + ", ".join(f for pair in _IDX_FILES.values() for f in pair))
    raise DataError(
        f"could not load {name}: tried {'; '.join(tried)}. Provide the data with "
        f"--data_dir=DIR (or ${DATA_DIR_ENV}=DIR) holding {files}, or let "
        f"tensorflow-datasets download it.")


def _find_cifar_dir(directory):
    for path in (os.path.join(directory, "cifar-10-batches-py"), directory):
        if os.path.exists(os.path.join(path, "test_batch")):
            return path
    return None


def read_idx(path: str) -> Array:
    """Reads one (optionally gzipped) IDX file into a uint8 array.

    Raises DataError naming `path` if the header is malformed or the payload is
    not exactly the size the header declares.
    """
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not a uint8 IDX file (bad magic {raw[:4].hex()})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header_len])
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise DataError(f"{path}: header declares {dims} = {expected} bytes of data "
                        f"but the file holds {len(raw) - header_len}; it is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_idx_dir(directory: str, expected_counts: Optional[dict] = None):
    """Reads the four IDX .gz files of an MNIST-format directory.

    Returns `(train, test)`, each `(images float32 [N, 28, 28, 1] in [0, 1],
    labels int32 [N])`. With `expected_counts` ({"train": N, "test": M}) a file
    holding a different number of examples is an error.
    """
    splits = []
    for split, (image_file, label_file) in _IDX_FILES.items():
        image_path, label_path = (os.path.join(directory, f) for f in (image_file, label_file))
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{image_path}: expected [N, H, W] images and [N] labels, "
                            f"got {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{image_path} has {len(images)} images but {label_path} "
                            f"has {len(labels)} labels")
        if expected_counts and len(labels) != expected_counts[split]:
            raise DataError(f"{image_path}: expected {expected_counts[split]} examples, "
                            f"found {len(labels)}")
        if labels.max(initial=0) > 9:
            raise DataError(f"{label_path}: label {labels.max()} outside 0..9")
        splits.append(_to_float(images[..., None], labels))
    return tuple(splits)


def load_cifar10_dir(directory: str, expected_counts: Optional[dict] = None):
    """Reads CIFAR-10's python batches (`data_batch_1..5`, `test_batch`)."""
    def read_batch(fname):
        path = os.path.join(directory, fname)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - pickle raises many types
            raise DataError(f"{path}: unreadable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
            raise DataError(f"{path}: expected [N, 3072] data and N labels, got "
                            f"{data.shape} and {labels.shape}")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    train_parts = [read_batch(f"data_batch_{i}") for i in range(1, 6)]
    train = _to_float(np.concatenate([p[0] for p in train_parts]),
                      np.concatenate([p[1] for p in train_parts]))
    test = _to_float(*read_batch("test_batch"))
    for split, (_, labels) in (("train", train), ("test", test)):
        if expected_counts and len(labels) != expected_counts[split]:
            raise DataError(f"{directory}: expected {expected_counts[split]} {split} examples, "
                            f"found {len(labels)}")
    return train, test


def _to_float(images, labels):
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def _load_tfds(name):
    import tensorflow_datasets as tfds

    out = []
    for split in ("train", "test"):
        ds = tfds.load(name, split=split, as_supervised=True, batch_size=-1)
        images, labels = tfds.as_numpy(ds)
        out.append(_to_float(images, labels))
    return tuple(out)


def _load_digits():
    """scikit-learn's 8x8 digits (0..16) bilinearly resized to 28x28, [0, 1].

    A fixed permutation (seed 0) splits 1,497 train / 300 test examples.
    """
    from sklearn.datasets import load_digits
    import tensorflow as tf

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    images = tf.image.resize(images, (28, 28), method="bilinear").numpy()
    images = np.clip(images, 0.0, 1.0)
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(0).permutation(len(labels))
    images, labels = images[order], labels[order]
    n_test = 300
    return (images[n_test:], labels[n_test:]), (images[:n_test], labels[:n_test])
