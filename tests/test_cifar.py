"""CIFAR-10 and CIFAR-100 folders (the binary version, written here as distributed): read, trained on,
predicted with class names; cut, mislabelled and pickled folders refused in one line, nothing run."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from nbcnn import cli
from nbcnn.data import DataError, load_dataset, normalization, prepare

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def records(n, rng, label_bytes=1, classes=10):
    """(bytes of n records, images (n, 3, 32, 32), labels): a colour square in the quadrant the label's
    parity picks, so that a tiny model can learn something."""
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, 3, 32, 32)).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = 16 * (label % 2), 16 * ((label // 2) % 2)
        images[i, label % 3, r + 2:r + 14, c + 2:c + 14] = 230
    head = np.zeros((n, label_bytes), np.uint8)
    head[:, -1] = labels  # CIFAR-100: the coarse label first (left 0 here), the fine one last
    return np.concatenate([head, images.reshape(n, -1)], axis=1).tobytes(), images, labels


def write_cifar10(folder, per_file=12, seed=0, names=True):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    parts = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        raw, images, labels = records(per_file, rng)
        (folder / name).write_bytes(raw)
        parts[name] = (images, labels)
    if names:
        (folder / "batches.meta.txt").write_text("\n".join(NAMES) + "\n\n")  # as distributed: blank lines at the end
    return parts


def test_cifar10_is_read_as_written(tmp_path):
    parts = write_cifar10(tmp_path)
    data = load_dataset(tmp_path)
    train = [parts[f"data_batch_{i}.bin"] for i in range(1, 6)]
    np.testing.assert_array_equal(data["train_images"], np.concatenate([p[0] for p in train]))
    np.testing.assert_array_equal(data["train_labels"], np.concatenate([p[1] for p in train]))
    np.testing.assert_array_equal(data["test_images"], parts["test_batch.bin"][0])
    assert data["train_images"].shape == (60, 3, 32, 32) and data["class_names"] == NAMES


def test_cifar100_takes_the_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    raw, images, labels = records(9, rng, label_bytes=2, classes=100)
    (tmp_path / "train.bin").write_bytes(raw)
    (tmp_path / "test.bin").write_bytes(records(4, rng, 2, 100)[0])
    (tmp_path / "fine_label_names.txt").write_text("\n".join(f"class{i}" for i in range(100)) + "\n")
    data = load_dataset(tmp_path)
    np.testing.assert_array_equal(data["train_labels"], labels)
    np.testing.assert_array_equal(data["train_images"], images)
    assert data["class_names"][99] == "class99"


def test_colour_data_is_normalised_per_channel(tmp_path):
    write_cifar10(tmp_path)
    images = load_dataset(tmp_path)["train_images"]
    mean, std = normalization(images)
    assert len(mean) == len(std) == 3
    x = prepare(images, mean, std)
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, rtol=1e-4)
    for c in range(3):
        want = (images[:, c] / np.float32(255) - np.float32(mean[c])) / np.float32(std[c])
        np.testing.assert_array_equal(x[:, c], want.astype(np.float32))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "data_batch_3.bin").write_bytes((f / "data_batch_3.bin").read_bytes()[:-100]),
     r"data_batch_3.bin: 36,776 bytes is not a whole number of CIFAR-10 records \(3073 bytes each"),
    (lambda f: (f / "test_batch.bin").write_bytes(b""), "test_batch.bin: 0 bytes is not a whole number"),
    (lambda f: (f / "data_batch_5.bin").unlink(), "lacks data_batch_5.bin"),
    (lambda f: (f / "data_batch_2.bin").write_bytes(b"\x0c" + bytes(3072)), "record 0 has label 12, but CIFAR-10 has 10"),
    (lambda f: (f / "batches.meta.txt").write_text("cat\ndog\n"), "2 class names, CIFAR-10 has 10 classes"),
])
def test_damaged_cifar_is_refused_in_one_line(tmp_path, capsys, damage, message):
    write_cifar10(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)
    assert cli.main(["train", "--device", "cpu", "--data-dir", str(tmp_path), "--model", "tiny", "--out",
                     str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nbcnn train: error:")


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("version", ["CIFAR-10", "CIFAR-100"])
def test_a_pickled_cifar_folder_is_refused_and_nothing_runs(tmp_path, capsys, version):
    folder, marker = tmp_path / "cifar-python", tmp_path / "ran"
    folder.mkdir()
    names = ("data_batch_1", "batches.meta") if version == "CIFAR-10" else ("train", "meta")
    for name in names:
        (folder / name).write_bytes(pickle.dumps(_RunsCode(marker)))
    assert cli.main(["train", "--device", "cpu", "--data-dir", str(folder), "--out", str(tmp_path / "run"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the Python version of {version} (pickle files)" in err[0]
    assert f"{version.lower()}-binary.tar.gz" in err[0]
    assert not marker.exists()


def test_a_pickle_named_like_a_binary_file_is_only_ever_read_as_bytes(tmp_path):
    marker = tmp_path / "ran"
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_1.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(DataError, match="not a whole number of CIFAR-10 records"):
        load_dataset(tmp_path)
    assert not marker.exists()


def test_train_on_cifar10_then_predict_names_the_class(tmp_path, capsys):
    data = tmp_path / "cifar-10-batches-bin"
    parts = write_cifar10(data, per_file=16)
    out = tmp_path / "run"
    assert cli.main(["train", "--device", "cpu", "--data-dir", str(data), "--model", "tiny", "--epochs", "1",
                     "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    assert "3x32x32, 10 classes" in capsys.readouterr().out
    images = parts["test_batch.bin"][0][:4]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image.transpose(1, 2, 0)).save(paths[-1])
    assert cli.main(["predict", "--device", "cpu", "--json", "--checkpoint", str(out / "model.npz"),
                     *map(str, paths)]) == 0
    results = json.loads(capsys.readouterr().out)
    from nbcnn.model import Sequential
    from nbcnn.predict import softmax

    model = Sequential.load(out / "model.npz").eval()
    assert len(model.metadata["mean"]) == 3  # per channel, in the checkpoint
    want = softmax(model.forward(prepare(images, model.metadata["mean"], model.metadata["std"])))
    for r, p in zip(results, want):
        assert r["name"] == NAMES[r["class"]] and r["class"] == int(np.argmax(p))
        np.testing.assert_allclose(r["probabilities"], p, atol=1e-6)
    assert cli.main(["predict", "--device", "cpu", "--checkpoint", str(out / "model.npz"), str(paths[0])]) == 0
    assert NAMES[results[0]["class"]] + ":" in capsys.readouterr().out
