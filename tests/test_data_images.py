"""Image loaders: real MNIST files, IDX parsing, corrupt files, CIFAR format, digits."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from dni_tf import data
from dni_tf.data import images


def _write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(raw)
    return raw


def _write_mnist_dir(directory, n_train=12, n_test=5, seed=0):
    rng = np.random.RandomState(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.randint(0, 256, size=(n, 28, 28))
        labels = rng.randint(0, 10, size=n)
        _write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), imgs)
        _write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
        arrays[split] = (imgs, labels)
    return arrays


def test_real_mnist_counts_shapes_range_and_histogram(real_data_dir):
    mnist = data.load_image_data("mnist", real_data_dir, use_tfds=False)
    (x_train, y_train), (x_test, y_test) = mnist.train, mnist.test
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert 0.0 <= x_train.min() and x_train.max() == 1.0
    assert np.bincount(y_train, minlength=10).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(y_test, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    # Mean pixel 33.318 / 255 as published for the train images.
    assert abs(x_train.mean() * 255 - 33.318) < 0.01


def test_real_fashion_mnist_is_balanced(real_data_dir):
    fashion = data.load_image_data("fashion_mnist", real_data_dir, use_tfds=False)
    assert np.bincount(fashion.train[1]).tolist() == [6000] * 10
    assert np.bincount(fashion.test[1]).tolist() == [1000] * 10


def test_idx_round_trip_and_pipeline(tmp_path):
    arrays = _write_mnist_dir(tmp_path / "mnist")
    (x_train, y_train), (x_test, _) = images.load_idx_dir(str(tmp_path / "mnist"))
    np.testing.assert_allclose(x_train[..., 0] * 255, arrays["train"][0], atol=1e-4)
    np.testing.assert_array_equal(y_train, arrays["train"][1])
    assert x_test.shape == (5, 28, 28, 1)

    loaded = data.load_image_data("mnist", str(tmp_path), validation_size=2, use_tfds=False,
                                 check_counts=False)
    assert len(loaded.train[1]) == 10 and len(loaded.validation[1]) == 2
    batch_x, batch_y = next(iter(loaded.train_dataset(batch_size=4, seed=0)))
    assert batch_x.shape == (4, 28, 28, 1) and batch_y.shape == (4,)
    # Seeded shuffling: the same seed gives the same stream.
    again_x, _ = next(iter(loaded.train_dataset(batch_size=4, seed=0)))
    np.testing.assert_array_equal(batch_x.numpy(), again_x.numpy())


def test_truncated_gzip_names_the_file(tmp_path):
    _write_mnist_dir(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.load_image_data("mnist", str(tmp_path), use_tfds=False)


def test_fewer_examples_than_header_declares_is_an_error(tmp_path):
    _write_mnist_dir(tmp_path / "mnist")
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(raw[:-2])  # valid gzip, but two labels short
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz.*truncated or corrupt"):
        data.load_image_data("mnist", str(tmp_path), use_tfds=False, check_counts=False)


def test_bad_magic_and_mismatched_counts(tmp_path):
    _write_mnist_dir(tmp_path / "mnist")
    bad = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x56\x78" + b"\x00" * 16)
    with pytest.raises(data.DataError, match="bad magic"):
        data.load_image_data("mnist", str(tmp_path), use_tfds=False, check_counts=False)
    _write_idx(bad, np.zeros(11))  # 12 images, 11 labels
    with pytest.raises(data.DataError, match="12 images but .* 11 labels"):
        data.load_image_data("mnist", str(tmp_path), use_tfds=False, check_counts=False)


def test_standard_counts_guard_against_silently_fewer_examples(tmp_path):
    _write_mnist_dir(tmp_path / "mnist")
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: expected 60000 examples, found 12"):
        data.load_image_data("mnist", str(tmp_path), use_tfds=False)


def test_missing_data_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(data.DataError) as info:
        data.load_image_data("mnist", str(tmp_path), use_tfds=False)
    message = str(info.value)
    assert str(tmp_path) in message and "--data_dir" in message and "\n" not in message


def test_cifar10_python_batches(tmp_path):
    directory = tmp_path / "cifar10" / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, size=(3, 3072)).astype(np.uint8),
                 b"labels": rng.randint(0, 10, size=3).tolist()}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)
    with open(directory / "test_batch", "rb") as f:
        test_batch = pickle.load(f)
    cifar = data.load_image_data("cifar10", str(tmp_path), use_tfds=False, check_counts=False)
    with pytest.raises(data.DataError, match="expected 50000 train examples"):
        data.load_image_data("cifar10", str(tmp_path), use_tfds=False)
    assert cifar.train[0].shape == (15, 32, 32, 3) and cifar.test[0].shape == (3, 32, 32, 3)
    # Channel-major rows become NHWC: pixel (0, 0) of image 0 is (R, G, B).
    first = test_batch[b"data"][0]
    np.testing.assert_allclose(cifar.test[0][0, 0, 0] * 255, [first[0], first[1024], first[2048]], atol=1e-4)
    (directory / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="data_batch_3"):
        data.load_image_data("cifar10", str(tmp_path), use_tfds=False, check_counts=False)


def test_digits_needs_no_download():
    digits = data.load_image_data("digits")
    assert digits.train[0].shape == (1497, 28, 28, 1) and digits.test[0].shape == (300, 28, 28, 1)
    assert digits.train[0].min() >= 0.0 and digits.train[0].max() <= 1.0
    assert set(np.unique(digits.train[1])) == set(range(10))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="allowed: mnist"):
        data.load_image_data("imagenet")


def test_explicit_data_dir_without_the_files_names_them_and_never_tries_tfds(tmp_path,
                                                                             monkeypatch):
    def no_download(name):
        raise AssertionError("tensorflow-datasets must not be tried for an explicit data_dir")

    monkeypatch.setattr(images, "_load_tfds", no_download)
    monkeypatch.setattr(images, "DEBIAN_FASHION_MNIST_DIRS", ())
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(data.DataError) as info:
        data.load_image_data("mnist", str(tmp_path), use_tfds=True)
    message = str(info.value)
    for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert os.path.join(str(tmp_path), "mnist", name) in message
    assert "train-images-idx3-ubyte.gz" not in message  # present, so not missing
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(data.DataError, match="is a file, not a directory"):
        data.load_image_data("fashion_mnist", str(a_file), use_tfds=True)
    with pytest.raises(data.DataError, match="cifar-10-batches-py"):
        data.load_image_data("cifar10", str(tmp_path), use_tfds=True)


def test_data_dir_from_the_environment_still_falls_through(tmp_path, monkeypatch):
    tried = []

    def fake_tfds(name):
        tried.append(name)
        return _fake_split(), _fake_split()

    monkeypatch.setattr(images, "_load_tfds", fake_tfds)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    loaded = data.load_image_data("mnist", use_tfds=True)
    assert tried == ["mnist"] and loaded.source == "tfds"


def _fake_split(n=4, value=0.5):
    return np.full((n, 28, 28, 1), value, np.float32), np.arange(n, dtype=np.int32) % 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_a_data_error_naming_the_source(bad):
    train, test = _fake_split(), _fake_split()
    train[0][1, 3, 4, 0] = bad
    with pytest.raises(data.DataError, match=r"my arrays: mnist train images: 1 of 3136 values"):
        data.ImageData("mnist", "my arrays", train, test, None, 10)
    with pytest.raises(data.DataError, match="my arrays: mnist validation images"):
        data.ImageData("mnist", "my arrays", _fake_split(), _fake_split(), train, 10)
    labels = np.array([0.0, np.nan, 1.0, 2.0])
    with pytest.raises(data.DataError, match="test labels"):
        data.ImageData("mnist", "my arrays", _fake_split(), (test[0], labels), None, 10)
    data.ImageData("mnist", "my arrays", _fake_split(), _fake_split(), None, 10)  # finite: fine
