"""Data sets: the IDX format of MNIST (the reader, the MNIST shipped inside the package, any
MNIST-format folder: Fashion-MNIST, KMNIST, ...), the binary version of CIFAR-10 and CIFAR-100,
and folders of images (``load_image_folder``).

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

from nbcnn.errors import DataError, describe  # noqa: F401 (DataError and describe are also nbcnn.data's)
from nbcnn.images import ImageError, fit_to_profile, read_image

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


# ------------------------------------------------------------------ CIFAR, binary version
#
# As distributed (cifar-10-binary.tar.gz, cifar-100-binary.tar.gz): each file a run of records,
# a record the label byte(s) then 3072 pixel bytes, the 1024 reds, the 1024 greens, the 1024 blues
# of a 32x32 image, rows top to bottom. CIFAR-100's records carry two labels, the coarse class
# (of 20) then the fine class (of 100); nbcnn trains on the fine one. The class names are the
# lines of a text file, in label order.

CIFAR_SIDE = 32
CIFAR = {
    "CIFAR-10": dict(train=[f"data_batch_{i}.bin" for i in range(1, 6)], test=["test_batch.bin"],
                     names="batches.meta.txt", label_bytes=1, label=0, classes=10),
    "CIFAR-100": dict(train=["train.bin"], test=["test.bin"], names="fine_label_names.txt", label_bytes=2, label=1,
                      classes=100),
}

# What the Python version of each holds instead: pickles. Unpickling runs whatever the file says,
# so nbcnn never opens them (see ``load_dataset``).
CIFAR_PICKLES = {"CIFAR-10": ("data_batch_1", "batches.meta"), "CIFAR-100": ("train", "meta")}


def cifar_kind(folder):
    """The data set ("CIFAR-10" or "CIFAR-100") whose binary version ``folder`` holds (any of its
    files), else None."""
    for kind, spec in CIFAR.items():
        if any(os.path.isfile(os.path.join(folder, name)) for name in spec["train"] + spec["test"]):
            return kind
    return None


def _pickled_cifar(folder):
    """The name of the CIFAR data set whose Python (pickle) version ``folder`` looks like, else None."""
    for kind, names in CIFAR_PICKLES.items():
        if all(os.path.isfile(os.path.join(folder, name)) for name in names):
            return kind
    return None


def _cifar_records(path, spec, kind):
    """(images (n, 3, 32, 32) uint8, labels (n,) int32) of one CIFAR binary file."""
    record = spec["label_bytes"] + 3 * CIFAR_SIDE * CIFAR_SIDE
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % record:
        raise DataError(f"{path}: {len(raw):,} bytes is not a whole number of {kind} records ({record} bytes each: "
                        f"{spec['label_bytes']} label byte(s), then 32x32x3 pixels); the file is cut short or is "
                        f"not {kind}'s binary version")
    rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
    labels = rows[:, spec["label"]].astype(np.int32)
    if labels.max() >= spec["classes"]:
        bad = int(np.argmax(labels >= spec["classes"]))
        raise DataError(f"{path}: record {bad} has label {labels[bad]}, but {kind} has {spec['classes']} classes")
    images = rows[:, spec["label_bytes"]:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
    return np.ascontiguousarray(images), labels


def load_cifar_folder(folder):
    """CIFAR-10 or CIFAR-100 (binary version) from ``folder``: the dict of ``load_idx_folder`` with
    colour images (N, 3, 32, 32) uint8, and ``class_names`` when the folder has its names file."""
    folder = os.fspath(folder)
    kind = cifar_kind(folder)
    spec = CIFAR[kind]
    missing = [name for name in spec["train"] + spec["test"] if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)} ({kind}'s binary version has "
                        f"{', '.join(spec['train'] + spec['test'])})")
    data = {}
    for split in ("train", "test"):
        parts = [_cifar_records(os.path.join(folder, name), spec, kind) for name in spec[split]]
        data[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        data[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    names_path = os.path.join(folder, spec["names"])
    if os.path.isfile(names_path):
        try:
            with open(names_path, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{names_path}: cannot be read ({describe(exc)})") from None
        if len(names) != spec["classes"]:
            raise DataError(f"{names_path}: {len(names)} class names, {kind} has {spec['classes']} classes")
        data["class_names"] = names
    return data


def load_dataset(data_dir=None, image_size=None):
    """MNIST (shipped, verified by SHA-256) when ``data_dir`` is None, else that folder: four IDX
    files, CIFAR-10 or CIFAR-100 (binary version), or one sub-folder of images per class
    (``load_image_folder``; ``image_size`` is then the side they are resized to)."""
    if data_dir is None:
        folder, verify = shipped_mnist_folder(), MNIST_SHA256
    else:
        folder, verify = os.fspath(data_dir), None
    if not os.path.isdir(folder):
        raise DataError(f"data folder {folder} does not exist")
    if data_dir is not None and cifar_kind(folder) is not None:
        if image_size is not None:
            raise DataError(f"{folder}: --image-size applies to a folder of images, not to CIFAR's files")
        return load_cifar_folder(folder)
    pickled = _pickled_cifar(folder) if data_dir is not None else None
    if pickled is not None:
        raise DataError(f"{folder} holds the Python version of {pickled} (pickle files), which nbcnn does not open: "
                        f"unpickling a file runs whatever code it contains. Use the binary version "
                        f"({pickled.lower()}-binary.tar.gz) instead")
    if not is_image_folder(folder):
        if image_size is not None and data_dir is not None:
            raise DataError(f"{folder}: --image-size applies to a folder of images, not to IDX files")
        return load_idx_folder(folder, verify=verify)
    return load_image_folder(folder, image_size)


def is_image_folder(folder):
    """Whether ``folder`` holds sub-folders of images rather than the four IDX files."""
    folder = os.fspath(folder)
    return (os.path.isdir(folder) and not any(_find(folder, name) for name in FILES.values())
            and bool(_subfolders(folder)))


def _subfolders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder):
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith("."))


HELD_OUT = 1 / 6  # the share of each class kept for testing when a folder has no test split (MNIST's), at least one


def load_image_folder(folder, image_size=None):
    """A data set from a folder of images, one sub-folder per class (the sub-folder's name is the
    class's; classes in sorted order), either directly (``folder/cat/*.png``: a sixth of each class
    is held out for testing, always the same files) or split (``folder/train/cat/*``,
    ``folder/test/cat/*``).

    Every image is read with Pillow; the data set is grey when every image is (R = G = B), else
    colour; each image is padded to a square with its border's colour and resized to
    ``image_size`` (default: the most common longer side). Returns the dict of ``load_idx_folder``
    (grey images (N, H, W), colour (N, 3, H, W), uint8) with ``class_names`` added."""
    folder = os.fspath(folder)
    subs = _subfolders(folder)
    if set(subs) >= {"train", "test"}:
        classes = _subfolders(os.path.join(folder, "train"))
        splits = {split: {c: _image_files(os.path.join(folder, split, c)) for c in classes} for split in
                  ("train", "test")}
        unknown = sorted(set(_subfolders(os.path.join(folder, "test"))) - set(classes))
        if unknown:
            raise DataError(f"{folder}/test has classes that {folder}/train lacks: {', '.join(unknown)}")
    else:
        classes = subs
        splits = {"train": {}, "test": {}}
        rng = np.random.default_rng(0)  # the split is the data's, the same whatever the training seed
        for c in classes:
            files = _image_files(os.path.join(folder, c))
            order = rng.permutation(len(files))
            held = max(1, int(round(len(files) * HELD_OUT))) if len(files) > 1 else 0
            splits["test"][c] = [files[i] for i in sorted(order[:held])]
            splits["train"][c] = [files[i] for i in sorted(order[held:])]
    if len(classes) < 2:
        raise DataError(f"{folder}: found {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
                        f"a classifier needs at least two sub-folders of images")
    for c in classes:
        if not splits["train"][c]:
            raise DataError(f"{os.path.join(folder, 'train' if 'train' in subs else '', c)}: the class holds no images")
    if not any(splits["test"].values()):
        raise DataError(f"{folder}: too few images to hold any out for testing (give each class two or more)")

    pictures = {}
    for split in ("train", "test"):
        for c in classes:
            for path in splits[split][c]:
                try:
                    pictures[path] = read_image(path, 3)
                except ImageError as exc:
                    raise DataError(f"{exc} (in the data folder; remove it or fix it)") from None
    grey = all(np.array_equal(p[0], p[1]) and np.array_equal(p[0], p[2]) for p in pictures.values())
    shapes = [p.shape[1:] for p in pictures.values()]
    for path, (h, w) in zip(pictures, shapes):
        if max(h, w) > 4 * min(h, w):
            raise DataError(f"{path} is {w}x{h}: too far from square to be resized with the others "
                            f"(crop it to at most 4:1)")
    if image_size is None:
        sides, counts = np.unique([max(h, w) for h, w in shapes], return_counts=True)
        image_size = int(sides[np.argmax(counts)])
    data = {"class_names": list(classes)}
    for split in ("train", "test"):
        arrays, labels = [], []
        for label, c in enumerate(classes):
            for path in splits[split][c]:
                pixels = pictures[path][:1] if grey else pictures[path]
                square = fit_to_profile(pixels, image_size, None)
                arrays.append(np.round(square * 255).astype(np.uint8))
                labels.append(label)
        stacked = np.stack(arrays) if arrays else np.zeros((0, 1 if grey else 3, image_size, image_size), np.uint8)
        data[f"{split}_images"] = stacked[:, 0] if grey else stacked
        data[f"{split}_labels"] = np.array(labels, np.int32)
    return data


def _moments(values):
    """(mean, std) of uint8 ``values`` scaled to [0, 1], from the exact integer sums of the bytes and
    of their squares, taken in chunks: no float copy of the data set (a float64 one took 2.5 s and
    376 MB for MNIST)."""
    flat = np.asarray(values, np.uint8).reshape(-1)
    n = flat.size
    total = squares = 0
    for start in range(0, n, 1 << 22):
        chunk = flat[start:start + (1 << 22)].astype(np.uint32)
        total += int(chunk.sum(dtype=np.uint64))
        squares += int(np.square(chunk).sum(dtype=np.uint64))
    mean = total / (255.0 * n)
    std = math.sqrt((n * squares - total * total) / n) / (255.0 * math.sqrt(n))
    return mean, std if std > 0 else 1.0


def normalization(train_images):
    """(mean, std) of the training images scaled to [0, 1]: inputs become (x/255 - mean) / std.

    Grey images (N, H, W): two floats. Colour images (N, C, H, W): two lists of C floats, each
    channel normalised by its own statistics (a sky's blue and a leaf's green are not on one scale)."""
    images = np.asarray(train_images, np.uint8)
    if images.ndim != 4:
        return _moments(images)
    stats = [_moments(images[:, c]) for c in range(images.shape[1])]
    return [m for m, _ in stats], [s for _, s in stats]


def prepare(images, mean, std):
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) (C = 1 for the first), scaled to [0, 1]
    and normalized; ``mean`` and ``std`` are floats, or one per channel (``normalization``).

    Through a table of the 256 possible results per channel, computed with the float32 operations
    ``(v / 255 - mean) / std``, so each pixel gets exactly what that formula gives it."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images.reshape(images.shape[0], 1, *images.shape[1:])
    channels = images.shape[1]
    means, stds = np.broadcast_to(np.float32(mean), channels), np.broadcast_to(np.float32(std), channels)
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    tables = (levels[None, :] - means[:, None]) / stds[:, None]  # (C, 256)
    x = np.empty(images.shape, np.float32)
    # A few thousand images at a time: a lookup makes its result as a new array, so one for the whole
    # data set would hold a second copy of it at the peak (188 MB for MNIST).
    for start in range(0, images.shape[0], PREPARE_CHUNK):
        stop = start + PREPARE_CHUNK
        for c in range(images.shape[1]):
            x[start:stop, c] = tables[c][images[start:stop, c]]
    return x


PREPARE_CHUNK = 4096  # images per lookup in ``prepare``


def write_idx(path, array, magic):
    """Write a uint8 array as an IDX file (gzip when ``path`` ends in .gz): for tests and tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw, mtime=0) if str(path).endswith(".gz") else raw)
