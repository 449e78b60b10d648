import gzip
import struct

import numpy as np
import pytest

from qtoolkit.data import DEFAULT_ROOT, load_fashion_mnist
from qtoolkit.errors import QtoolkitError


def write_idx(path, array, truncate=0):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[:len(data) - truncate])


def fake_split(root, n=5, truncate=0):
    rng = np.random.default_rng(0)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), truncate)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


def test_reads_idx_padded_to_32_in_model_range(tmp_path):
    fake_split(tmp_path)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 1, 32, 32) and y.shape == (5,)
    assert x.min() >= -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # padding is the background value
    raw = np.frombuffer(gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(5, 28, 28)
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), raw / 127.5 - 1, atol=1e-6)


def test_truncated_file_names_the_debian_package(tmp_path):
    fake_split(tmp_path, truncate=100)
    with pytest.raises(QtoolkitError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)


def test_missing_folder_and_files_are_clear_errors(tmp_path):
    with pytest.raises(QtoolkitError, match="does not exist.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")
    with pytest.raises(QtoolkitError, match="not found.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(QtoolkitError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("valid", tmp_path)


def test_real_fashion_mnist_installed_by_setup():
    # `make test` installs Debian's dataset-fashion-mnist first, so this runs in CI rather than skipping.
    x, y = load_fashion_mnist("test", DEFAULT_ROOT)
    assert x.shape == (10000, 1, 32, 32)
    assert np.bincount(y.numpy()).tolist() == [1000] * 10
    assert -1.0 <= x.min() < x.max() <= 1.0
