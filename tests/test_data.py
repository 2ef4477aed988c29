import gzip
import os

import numpy as np
import pytest

from nbcnn.data import (
    FILES,
    IMAGES_MAGIC,
    MNIST_SHA256,
    DataError,
    load_dataset,
    load_idx_folder,
    prepare,
    shipped_mnist_folder,
    write_idx,
)
from tests.helpers import write_dataset


def test_shipped_mnist_is_complete_and_verified():
    data = load_dataset()
    assert data["train_images"].shape == (60000, 28, 28) and data["test_images"].shape == (10000, 28, 28)
    assert data["train_labels"].shape == (60000,) and set(np.unique(data["test_labels"])) == set(range(10))
    assert sorted(MNIST_SHA256) == sorted(FILES.values())


def test_corrupted_shipped_copy_is_detected(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in FILES.values():
        src = os.path.join(shipped_mnist_folder(), name + ".gz")
        (folder / (name + ".gz")).write_bytes(open(src, "rb").read())
    raw = bytearray(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: SHA-256 of its contents is .* the file is corrupt"):
        load_idx_folder(folder, verify=MNIST_SHA256)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw(tmp_path, gz):
    data = load_idx_folder(write_dataset(tmp_path, gz=gz))
    assert data["train_images"].shape == (192, 12, 12) and data["test_labels"].shape == (64,)


def test_prepare_scales_and_normalizes():
    x = prepare(np.array([[[0, 255]]], np.uint8), mean=0.5, std=0.5)
    assert x.dtype == np.float32 and x.shape == (1, 1, 1, 2)
    np.testing.assert_allclose(x.ravel(), [-1.0, 1.0])


def corrupt(folder, name, raw):
    os.remove(os.path.join(folder, name + ".gz"))
    with open(os.path.join(folder, name), "wb") as f:
        f.write(raw)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: os.remove(os.path.join(d, FILES["test_labels"] + ".gz")),
         r"lacks t10k-labels-idx1-ubyte\[.gz\]"),
        (lambda d: corrupt(d, FILES["train_images"], (2049).to_bytes(4, "big") + b"\0" * 8),
         r"train-images-idx3-ubyte: magic number 2049 \(0x00000801\), expected 2051"),
        (lambda d: corrupt(d, FILES["train_images"], (IMAGES_MAGIC).to_bytes(4, "big") + b"\0\0\0\x05\0\0\0\x0c"),
         "truncated header"),
        (lambda d: corrupt(d, FILES["test_images"],
                           IMAGES_MAGIC.to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (64, 12, 12)) + b"\0" * 100),
         r"the header says shape \(64, 12, 12\), 9216 bytes of data, but the file holds 100"),
        (lambda d: write_idx(os.path.join(d, FILES["test_labels"] + ".gz"), np.zeros(63, np.uint8), 2049),
         "63 labels for 64 images"),
        (lambda d: open(os.path.join(d, FILES["test_labels"] + ".gz"), "wb").write(b"\x1f\x8bgarbage"),
         "cannot be read"),
    ],
)
def test_bad_files_are_named_with_the_problem(tmp_path, damage, match):
    folder = write_dataset(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=match):
        load_idx_folder(folder)


def test_missing_folder():
    with pytest.raises(DataError, match="data folder /nonexistent does not exist"):
        load_dataset("/nonexistent")
