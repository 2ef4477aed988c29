"""Small MNIST-format data sets written by the tests themselves."""

import os

import numpy as np

from nbcnn.data import IMAGES_MAGIC, LABELS_MAGIC, FILES, write_idx


def quadrant_images(n, size, rng):
    """Images whose label (0..3) is the quadrant holding a bright square: learnable in a few steps."""
    labels = rng.integers(0, 4, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
    half = size // 2
    for i, lab in enumerate(labels):
        r, c = (lab // 2) * half, (lab % 2) * half
        images[i, r + 1: r + half - 1, c + 1: c + half - 1] = 220
    return images, labels


def write_dataset(folder, n_train=192, n_test=64, size=12, seed=0, gz=True):
    """Write the four IDX files of a small 4-class data set into ``folder``; return the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = quadrant_images(n_train, size, rng)
    test = quadrant_images(n_test, size, rng)
    suffix = ".gz" if gz else ""
    write_idx(os.path.join(folder, FILES["train_images"] + suffix), train[0], IMAGES_MAGIC)
    write_idx(os.path.join(folder, FILES["train_labels"] + suffix), train[1], LABELS_MAGIC)
    write_idx(os.path.join(folder, FILES["test_images"] + suffix), test[0], IMAGES_MAGIC)
    write_idx(os.path.join(folder, FILES["test_labels"] + suffix), test[1], LABELS_MAGIC)
    return str(folder)


def run_cli(*args):
    """The ``nbcnn`` command run in this process with ``args`` (any objects, as text); its exit status."""
    from nbcnn import cli

    return cli.main([str(a) for a in args])


def tiny_config(data_dir, out, **kw):
    """A training run of the ``tiny`` model for 3 epochs on the CPU, quietly, with ``kw`` changed."""
    from nbcnn.train import Config

    base = dict(device="cpu", data_dir=data_dir, model="tiny", epochs=3, batch_size=16, lr=0.01, seed=5, out=str(out),
                progress=False)
    return Config(**{**base, **kw})
