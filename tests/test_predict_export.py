"""`nbcnn predict` on image files and `nbcnn export` to ONNX, each checked against the model's own forward."""

import json

import numpy as np
import pytest
from PIL import Image

from nbcnn import layers as L
from nbcnn.data import load_dataset, prepare
from nbcnn.images import _centre_of_mass, fit_to_profile, frame_like_training_data, ink_box, ink_profile
from nbcnn.model import Sequential
from nbcnn.predict import softmax
from nbcnn.train import Config, train
from tests.helpers import quadrant_images, run_cli, write_dataset



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the quadrant data set: (checkpoint path, test images uint8, labels)."""
    folder = tmp_path_factory.mktemp("quadrants")
    write_dataset(folder)
    out = folder / "run"
    train(Config(device="cpu", data_dir=str(folder), model="tiny", epochs=3, batch_size=16, lr=0.01, seed=1,
                 out=str(out), progress=False), log=lambda *_: None)
    images, labels = quadrant_images(24, 12, np.random.default_rng(7))
    return out / "model.npz", images, labels


def own_probabilities(checkpoint, images):
    model = Sequential.load(checkpoint).eval()
    meta = model.metadata
    return softmax(model.forward(prepare(images, meta["mean"], meta["std"])))


def predict_json(capsys, *args):
    capsys.readouterr()
    assert run_cli("predict", "--device", "cpu", "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_png_files_matches_the_models_forward(trained, tmp_path, capsys):
    checkpoint, images, labels = trained
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    results = predict_json(capsys, "--checkpoint", checkpoint, "--top", 2, *paths)
    expected = own_probabilities(checkpoint, images)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    for r, p in zip(results, expected):
        assert isinstance(r["class"], int) and r["class"] == int(np.argmax(p))
        np.testing.assert_allclose(r["probabilities"], p, rtol=0, atol=1e-6)
        assert abs(sum(r["probabilities"]) - 1) < 1e-9
        assert len(r["top"]) == 2 and r["top"][0] == [r["class"], r["probability"]]
    assert np.mean([r["class"] for r in results] == labels) > 0.9  # the model learned the task


def test_predict_takes_other_inks_colours_sizes_and_transparency(trained, tmp_path, capsys):
    checkpoint, images, labels = trained
    paths = []
    for i, img in enumerate(images):
        kind = i % 4
        path = tmp_path / f"{i}.{'jpg' if kind == 2 else 'png'}"
        if kind == 0:  # dark ink on light paper
            Image.fromarray(255 - img).save(path)
        elif kind == 1:  # colour, four times the size
            Image.fromarray(np.stack([img] * 3, -1)).resize((48, 48), Image.Resampling.NEAREST).save(path)
        elif kind == 2:  # JPEG
            Image.fromarray(img).save(path, quality=95)
        else:  # black ink on a transparent canvas, as drawing programs save it
            rgba = np.zeros(img.shape + (4,), np.uint8)
            rgba[..., 3] = img
            Image.fromarray(rgba, "RGBA").save(path)
        paths.append(path)
    results = predict_json(capsys, "--checkpoint", checkpoint, *paths)
    assert np.mean([r["class"] for r in results] == labels) > 0.9
    # dark on light is inverted back exactly: the same answer as the original picture
    expected = own_probabilities(checkpoint, images)
    for r, p in zip(results[::4], expected[::4]):
        np.testing.assert_allclose(r["probabilities"], p, rtol=0, atol=1e-5)


def test_predict_text_output(trained, tmp_path, capsys):
    checkpoint, images, _ = trained
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    capsys.readouterr()
    assert run_cli("predict", "--checkpoint", checkpoint, "--device", "cpu", "--top", 3, tmp_path / "a.png") == 0
    line, = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(str(tmp_path / "a.png")) and line.count("%)") == 3


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("not an image"), "not an image Pillow can read"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_predict_refuses_a_bad_image_in_one_line(trained, tmp_path, capsys, make, message):
    checkpoint, images, _ = trained
    good = tmp_path / "good.png"
    Image.fromarray(images[0]).save(good)
    bad = tmp_path / "bad.png"
    make(bad)
    capsys.readouterr()
    assert run_cli("predict", "--checkpoint", checkpoint, "--device", "cpu", good, bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0]


def test_a_digit_drawn_dark_large_and_off_centre_is_framed_like_mnist():
    mnist = load_dataset()
    profile = ink_profile(mnist["train_images"][:2000])
    assert profile["ink"] == "light" and profile["centred"] and 0.6 < profile["ink_extent"] < 0.8
    correlations = []
    for digit in mnist["test_images"][:20]:
        reference = frame_like_training_data(digit / np.float32(255), 28, profile)[0]  # the digit framed again
        # drawn dark on a white 120x90 page, three times larger, towards the top left
        page = np.ones((120, 90), np.float32)
        big = np.asarray(Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.BILINEAR), np.float32) / 255
        page[5:89, 2:86] = big
        framed = fit_to_profile(page[None], 28, profile)[0]
        assert framed.shape == (28, 28)
        assert np.allclose(_centre_of_mass(framed, 0.0), (13.5, 13.5), atol=1.0)
        assert np.abs(np.subtract(ink_box(framed), ink_box(reference))).max() <= 1  # the same frame, to a pixel
        correlations.append(np.corrcoef(framed.ravel(), reference.ravel())[0, 1])
    # thin strokes: a pixel's shift costs some correlation, a wrong frame or ink most of it
    assert min(correlations) > 0.8 and np.median(correlations) > 0.93


def test_images_already_in_the_training_format_are_left_as_they_are(tmp_path, capsys):
    """MNIST's own test images written out as PNG files: predict gives each to the model as the data set
    gave it (it would only move a digit off its grid by framing it again), so predict and the model's
    forward on the test set agree. 1,000 images here; all 10,000 agree the same way (README)."""
    out = tmp_path / "run"
    assert run_cli("train", "--device", "cpu", "--model", "tiny", "--epochs", "1", "--out", out,
                   "--no-progress") == 0
    test = load_dataset()["test_images"][:1000]
    paths = []
    for i, image in enumerate(test):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    results = predict_json(capsys, "--checkpoint", out / "model.npz", *paths)
    forward = own_probabilities(out / "model.npz", test)
    agree = np.mean([r["class"] for r in results] == forward.argmax(axis=1))
    assert agree >= 0.995, agree
    np.testing.assert_allclose([r["probabilities"] for r in results], forward, atol=1e-6)  # the very same input


# ------------------------------------------------------------------------------- ONNX export

def onnx_logits(path, pixels):
    ort = pytest.importorskip("onnxruntime")  # in the dev extra; skipped, and said so, where it cannot install
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0]


def test_every_layer_exports_and_onnxruntime_agrees(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    L.set_seed(3)
    model = Sequential([
        L.Conv2D(3, 6, 3, stride=2, padding=1), L.ReLU(), L.MaxPool2D(3, stride=1, padding=1),
        Sequential([L.Conv2D(6, 5, (3, 2), padding=(1, 0), bias=False), L.ReLU()]),
        L.AvgPool2D(2, padding=1), L.Flatten(), L.Dense(5 * 5 * 4, 7, bias=False), L.ReLU(), L.Dense(7, 4)])
    for p in model.parameters():  # biases away from zero, so that a dropped bias would show
        p.data[...] += np.random.default_rng(0).normal(0, 0.1, p.shape).astype(np.float32)
    mean, std = 0.3, 0.2
    model.save(tmp_path / "model.npz", mean=mean, std=std, input_shape=[3, 16, 15])
    assert run_cli("export", "--checkpoint", tmp_path / "model.npz", "--output", tmp_path / "model.onnx") == 0
    assert "ONNX opset 17" in capsys.readouterr().out
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # any batch size
    for n in (1, 5):
        pixels = np.random.default_rng(n).random((n, 3, 16, 15), dtype=np.float32)
        ours = np.asarray(model.eval().forward(((pixels - np.float32(mean)) / np.float32(std)).astype(np.float32)))
        np.testing.assert_allclose(onnx_logits(tmp_path / "model.onnx", pixels), ours, rtol=1e-4, atol=1e-5)


def test_batchnorm_dropout_and_global_pooling_export_in_their_evaluation_form(tmp_path):
    pytest.importorskip("onnx")
    L.set_seed(4)
    model = Sequential([L.Conv2D(1, 4, 3, padding=1), L.BatchNorm2D(4), L.ReLU(), L.Dropout(0.3),
                        L.Conv2D(4, 6, 3), L.BatchNorm2D(6, eps=1e-3), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(6, 3)])
    rng = np.random.default_rng(5)
    for _ in range(3):  # running statistics away from their initial zeros and ones
        model.forward(rng.standard_normal((8, 1, 9, 9)).astype(np.float32) * 2 + 1)
    model.eval().save(tmp_path / "bn.npz", input_shape=[1, 9, 9])
    assert run_cli("export", "--checkpoint", tmp_path / "bn.npz", "--output", tmp_path / "bn.onnx") == 0
    pixels = rng.random((5, 1, 9, 9), dtype=np.float32)
    np.testing.assert_allclose(onnx_logits(tmp_path / "bn.onnx", pixels), np.asarray(model.forward(pixels)),
                               rtol=1e-4, atol=1e-5)


def test_residual_blocks_activations_and_per_channel_statistics_export(tmp_path):
    pytest.importorskip("onnx")
    L.set_seed(6)
    model = Sequential([
        L.Conv2D(3, 4, 3, padding=1), L.LeakyReLU(0.2),
        L.Residual([L.Conv2D(4, 6, 3, stride=2, padding=1, bias=False), L.BatchNorm2D(6), L.ReLU(),
                    L.Conv2D(6, 6, 3, padding=1), L.GELU()], [L.Conv2D(4, 6, 1, stride=2)]), L.ReLU(),
        L.Residual([L.Conv2D(6, 6, 3, padding=1), L.Tanh()]), L.Sigmoid(), L.GlobalAvgPool2D(), L.Dense(6, 5)])
    rng = np.random.default_rng(7)
    model.forward(rng.standard_normal((8, 3, 10, 10)).astype(np.float32))  # running statistics moved
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]  # CIFAR-10's, roughly
    model.eval().save(tmp_path / "res.npz", mean=mean, std=std, input_shape=[3, 10, 10])
    assert run_cli("export", "--checkpoint", tmp_path / "res.npz", "--output", tmp_path / "res.onnx") == 0
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "res.onnx")).graph.node}
    assert {"Add", "Erf", "LeakyRelu", "Tanh", "Sigmoid"} <= ops
    pixels = rng.random((4, 3, 10, 10), dtype=np.float32)
    normalised = (pixels - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None]
    np.testing.assert_allclose(onnx_logits(tmp_path / "res.onnx", pixels), np.asarray(model.forward(normalised)),
                               rtol=1e-4, atol=1e-5)


def test_a_trained_checkpoint_exports(trained, tmp_path):
    pytest.importorskip("onnx")
    checkpoint, images, _ = trained
    assert run_cli("export", "--checkpoint", checkpoint, "--output", tmp_path / "m.onnx") == 0
    model = Sequential.load(checkpoint).eval()
    meta = model.metadata
    ours = np.asarray(model.forward(prepare(images, meta["mean"], meta["std"])))
    pixels = (images / np.float32(255))[:, None].astype(np.float32)
    np.testing.assert_allclose(onnx_logits(tmp_path / "m.onnx", pixels), ours, rtol=1e-4, atol=1e-4)


def test_export_without_onnx_says_what_to_install(trained, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    capsys.readouterr()
    assert run_cli("export", "--checkpoint", trained[0], "--output", tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[onnx]"' in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_export_to_a_folder_is_refused_in_one_line(trained, tmp_path, capsys):
    pytest.importorskip("onnx")
    capsys.readouterr()
    assert run_cli("export", "--checkpoint", trained[0], "--output", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder: give a file name" in err[0]
