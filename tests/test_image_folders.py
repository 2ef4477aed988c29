"""Training on folders of images: colour and grey pictures, split or not, and bad folders refused."""

import json

import numpy as np
import pytest
from PIL import Image

from nbcnn.data import load_dataset
from tests.helpers import run_cli




def colour_folder(root, n_per_class=24, size=32, split=False, seed=0):
    """Three classes of 32x32 colour PNGs: a red, a green or a blue square somewhere on a noisy
    grey background (position and size vary)."""
    rng = np.random.default_rng(seed)
    names = ["blue", "green", "red"]
    for k, name in enumerate(names):
        for i in range(n_per_class):
            img = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
            side = int(rng.integers(8, 16))
            top, left = rng.integers(0, size - side, 2)
            img[top:top + side, left:left + side] = 40
            img[top:top + side, left:left + side, 2 - k] = 230
            part = ("train" if i % 4 else "test") if split else ""
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("split", [False, True])
def test_train_on_a_folder_of_colour_pngs_end_to_end(tmp_path, capsys, split):
    folder = colour_folder(tmp_path / "images", split=split)
    data = load_dataset(folder)
    assert data["class_names"] == ["blue", "green", "red"]
    assert data["train_images"].shape[1:] == (3, 32, 32) and data["train_images"].dtype == np.uint8
    assert len(data["train_images"]) + len(data["test_images"]) == 72 and len(data["test_images"]) == 12 + 6 * split
    out = tmp_path / "run"
    # the lecture's 32x32x3 input, with the default model as it is
    assert run_cli("train", "--device", "cpu", "--data-dir", folder, "--epochs", 6, "--batch-size", 8,
                   "--lr", 3e-3, "--augment", "--out", out, "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics[-1]["test_accuracy"] >= 0.9
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", out / "model.npz", "--data-dir", folder, "--device", "cpu") == 0
    assert "test accuracy" in capsys.readouterr().out
    sample = folder / ("test" if split else "") / "red" / "000.png"
    big = tmp_path / "big-red.png"
    Image.open(sample).resize((96, 96), Image.Resampling.NEAREST).save(big)
    assert run_cli("predict", "--checkpoint", out / "model.npz", "--device", "cpu", "--json", big) == 0
    result, = json.loads(capsys.readouterr().out)
    assert result["class"] == 2 and result["name"] == "red"  # the third class in sorted order


def test_grey_pictures_make_a_grey_data_set_at_the_size_asked(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20 + i, 18), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_dataset(tmp_path, image_size=16)
    assert data["train_images"].shape[1:] == (16, 16) and data["test_images"].shape[0] == 2


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "only").mkdir(), "needs at least two sub-folders"),
    (lambda root: [(root / c).mkdir() for c in ("a", "b")], "the class holds no images"),
    (lambda root: (root / "a" / "bad.png").write_text("not an image"), "not an image Pillow can read"),
    (lambda root: Image.new("RGB", (200, 20)).save(root / "a" / "long.png"), "too far from square"),
])
def test_a_bad_image_folder_is_refused_in_one_line(tmp_path, capsys, make, message):
    root = tmp_path / "data"
    root.mkdir()
    if "needs at least" not in message and "holds no images" not in message:
        colour_folder(root, n_per_class=3)
        (root / "a").mkdir()
        Image.new("RGB", (32, 32)).save(root / "a" / "ok.png")
        Image.new("RGB", (32, 32)).save(root / "a" / "ok2.png")
    make(root)
    assert run_cli("train", "--device", "cpu", "--data-dir", root, "--model", "tiny", "--epochs", 1,
                   "--out", tmp_path / "run", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
