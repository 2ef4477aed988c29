"""Data sets in the IDX format of MNIST: the reader, the MNIST shipped inside the package,
and any MNIST-format folder (Fashion-MNIST, KMNIST, ...).

IDX: a big-endian header, then raw data. The magic number's third byte is the element
type (0x08: unsigned byte) and its fourth the number of dimensions; one 32-bit size per
dimension follows. MNIST's images are 2051 = 0x00000803 (count, rows, cols), its labels
2049 = 0x00000801 (count). Files may be gzip-compressed (``.gz``).
"""

import gzip
import hashlib
import math
import os
import zlib
from importlib import resources

import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the uncompressed contents of the shipped MNIST (the canonical sums).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


class DataError(ValueError):
    """A data file is missing, unreadable, or not what it should be."""


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            raw = f.read()
        return gzip.decompress(raw) if head == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def parse_idx(raw, path, magic):
    """The array in an IDX file's bytes; ``magic`` is the expected magic number."""
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}[magic]
        raise DataError(f"{path}: magic number {found} (0x{found:08x}), expected {magic} for IDX {kind}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, the header needs {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)  # Python integers: no overflow, whatever the header says
    if len(raw) - header != expected:
        raise DataError(f"{path}: the header says shape {shape}, {expected} bytes of data, but the file holds "
                        f"{len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find(folder, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def load_idx_folder(folder, verify=None):
    """The four MNIST-format files of ``folder`` as uint8 arrays: a dict with
    train_images (N, H, W), train_labels (N,), test_images, test_labels.

    ``verify`` maps file names to the SHA-256 of their uncompressed contents.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder} does not exist")
    paths = {key: _find(folder, name) for key, name in FILES.items()}
    missing = [FILES[k] + "[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)} (an MNIST-format folder holds all four files)")
    data = {}
    for key, path in paths.items():
        raw = _read_bytes(path)
        name = FILES[key]
        if verify is not None:
            digest = hashlib.sha256(raw).hexdigest()
            if digest != verify[name]:
                raise DataError(f"{path}: SHA-256 of its contents is {digest}, expected {verify[name]}; "
                                f"the file is corrupt")
        data[key] = parse_idx(raw, path, IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC)
    for split in ("train", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if images.ndim != 3:
            raise DataError(f"{paths[split + '_images']}: images must be (count, rows, cols), got {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{paths[split + '_labels']}: {labels.shape[0] if labels.ndim else '?'} labels for "
                            f"{images.shape[0]} images in {paths[split + '_images']}")
        if images.shape[0] == 0:
            raise DataError(f"{paths[split + '_images']}: holds no images")
    if data["train_images"].shape[1:] != data["test_images"].shape[1:]:
        raise DataError(f"train images are {data['train_images'].shape[1:]} but test images "
                        f"{data['test_images'].shape[1:]}")
    return data


def shipped_mnist_folder():
    """The folder of the MNIST copy installed with the package."""
    return str(resources.files("nbcnn") / "_data" / "mnist")


def load_dataset(data_dir=None):
    """MNIST (shipped, verified by SHA-256) when ``data_dir`` is None, else that folder."""
    if data_dir is None:
        return load_idx_folder(shipped_mnist_folder(), verify=MNIST_SHA256)
    return load_idx_folder(data_dir)


def normalization(train_images):
    """(mean, std) of the training images scaled to [0, 1]: inputs become (x/255 - mean) / std.

    From the exact integer sums of the bytes and of their squares, taken in chunks: no float
    copy of the data set (a float64 one took 2.5 s and 376 MB for MNIST)."""
    flat = np.asarray(train_images, np.uint8).reshape(-1)
    n = flat.size
    total = squares = 0
    for start in range(0, n, 1 << 22):
        chunk = flat[start:start + (1 << 22)].astype(np.uint32)
        total += int(chunk.sum(dtype=np.uint64))
        squares += int(np.square(chunk).sum(dtype=np.uint64))
    mean = total / (255.0 * n)
    std = math.sqrt((n * squares - total * total) / n) / (255.0 * math.sqrt(n))
    return mean, std if std > 0 else 1.0


def prepare(images, mean, std):
    """uint8 (N, H, W) -> float32 (N, 1, H, W), scaled to [0, 1] and normalized.

    Through a table of the 256 possible results, computed with the float32 operations
    ``(v / 255 - mean) / std``, so each pixel gets exactly what that formula gives it."""
    table = (np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
    x = table[np.asarray(images, np.uint8)]
    return x.reshape(images.shape[0], 1, *images.shape[1:])


def write_idx(path, array, magic):
    """Write a uint8 array as an IDX file (gzip when ``path`` ends in .gz): for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)
