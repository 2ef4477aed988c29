"""Every user mistake refused cleanly, found by property-based tests (hypothesis).

The CLI is driven with wrong arguments and with its files (checkpoint, resume state, IDX data,
images) cut or overwritten at random offsets; the layer API with wrong arguments and inputs.
The rule each time: the command exits 0 (the damage missed everything that matters) or 2 with
one line on stderr naming the problem; the API raises ValueError or TypeError with a one-line
message, or works; never a traceback, never a half-written file left behind.
"""

import contextlib
import io
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nbcnn import cli
from nbcnn import layers as L
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.model import Sequential
from nbcnn.optim import SGD, Adam
from nbcnn.train import Config, train
from tests.helpers import quadrant_images, write_dataset

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(*args):
    """(exit status, stdout, stderr) of the CLI run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_clean(code, err, allowed=(0, 2)):
    assert code in allowed, f"exit {code}: {err}"
    assert "Traceback" not in err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nbcnn"), err


def assert_one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message.strip(), repr(message)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A data set, a short training run on it (checkpoint, resume state) and an image."""
    root = tmp_path_factory.mktemp("misuse")
    data = write_dataset(root / "data")
    out = root / "run"
    train(Config(device="cpu", data_dir=data, model="tiny", epochs=1, batch_size=32, lr=0.01, out=str(out),
                 progress=False), log=lambda *_: None)
    Image.fromarray(quadrant_images(1, 12, np.random.default_rng(0))[0][0]).save(root / "image.png")
    return root


def damage(raw, data):
    """``raw`` cut at a random offset, or with a few bytes overwritten there, or both."""
    offset = data.draw(st.integers(0, len(raw) - 1), label="offset")
    how = data.draw(st.sampled_from(["cut", "overwrite", "both"]), label="how")
    if how in ("overwrite", "both"):
        patch = data.draw(st.binary(min_size=1, max_size=16), label="patch")
        raw = raw[:offset] + patch + raw[offset + len(patch):]
    if how in ("cut", "both"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep") if how == "both" else offset]
    return raw


def names(folder):
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------- damaged files


@FUZZ
@given(data=st.data())
def test_a_damaged_checkpoint(run_dir, data):
    raw = damage((run_dir / "run" / "model.npz").read_bytes(), data)
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "model.npz")
        with open(bad, "wb") as f:
            f.write(raw)
        code, _, err = run("evaluate", "--checkpoint", bad, "--data-dir", run_dir / "data", "--device", "cpu")
        assert_clean(code, err)
        code, _, err = run("predict", "--checkpoint", bad, "--device", "cpu", run_dir / "image.png")
        assert_clean(code, err)
        code, _, err = run("export", "--checkpoint", bad, "--output", os.path.join(tmp, "m.onnx"))
        assert_clean(code, err)
        assert names(tmp) == (["m.onnx", "model.npz"] if code == 0 else ["model.npz"])  # no temporary file left


@FUZZ
@given(data=st.data())
def test_a_damaged_resume_state(run_dir, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        shutil.copytree(run_dir / "run", out)
        path = os.path.join(out, "resume.npz")
        with open(path, "rb") as f:
            raw = damage(f.read(), data)
        with open(path, "wb") as f:
            f.write(raw)
        code, _, err = run("train", "--device", "cpu", "--data-dir", run_dir / "data", "--model", "tiny",
                           "--batch-size", 32, "--epochs", 2, "--out", out, "--resume", "--no-progress")
        assert_clean(code, err)
        assert names(out) == ["curves.png", "metrics.json", "model.npz", "resume.npz"]


@FUZZ
@given(data=st.data())
def test_damaged_idx_data(run_dir, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "data")
        shutil.copytree(run_dir / "data", folder)
        name = data.draw(st.sampled_from(sorted(os.listdir(folder))), label="file")
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            raw = damage(f.read(), data)
        with open(path, "wb") as f:
            f.write(raw)
        out = os.path.join(tmp, "run")
        code, _, err = run("train", "--device", "cpu", "--data-dir", folder, "--model", "tiny", "--batch-size", 64,
                           "--epochs", 1, "--out", out, "--no-progress")
        assert_clean(code, err)
        if code == 0:
            assert names(out) == ["curves.png", "metrics.json", "model.npz", "resume.npz"]
        code, _, err = run("evaluate", "--checkpoint", run_dir / "run" / "model.npz", "--data-dir", folder,
                           "--device", "cpu")
        assert_clean(code, err)


@FUZZ
@given(data=st.data())
def test_a_damaged_image(run_dir, data):
    raw = damage((run_dir / "image.png").read_bytes(), data)
    with tempfile.TemporaryDirectory() as tmp:
        bad = os.path.join(tmp, "bad.png")
        with open(bad, "wb") as f:
            f.write(raw)
        code, out, err = run("predict", "--checkpoint", run_dir / "run" / "model.npz", "--device", "cpu", "--json", bad)
        assert_clean(code, err)
        if code == 2:
            assert bad in err


# ----------------------------------------------------------------------- wrong arguments


def _parses(convert, text):
    try:
        convert(text)
        return True
    except ValueError:
        return False


def not_a_positive_int():
    return st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["", "nan", "inf", "2.5", "1e3", "0x10"]),
                     st.text(max_size=8).filter(lambda t: not _parses(int, t) or int(t) < 1))


def not_a_positive_float():
    return st.one_of(st.floats(max_value=0).map(repr), st.sampled_from(["nan", "inf", "-inf", "", "1/2"]),
                     st.text(max_size=8).filter(lambda t: not _parses(float, t) or not 0 < float(t) < float("inf")))


def not_a_non_negative_int():
    return st.one_of(st.integers(max_value=-1).map(str), st.sampled_from(["", "1.5", "-0.5", "seven"]))


def not_one_of(*choices):
    return st.text(max_size=12).filter(lambda t: t not in choices)


WRONG = {
    "--epochs": not_a_positive_int(),
    "--batch-size": not_a_positive_int(),
    "--lr": not_a_positive_float(),
    "--lr-decay": st.one_of(not_a_positive_float(), st.floats(1.0, 1e6, exclude_min=True).map(repr)),
    "--seed": not_a_non_negative_int(),
    "--model": not_one_of("lenet", "lenet5", "mnist-example", "tiny", "bn"),
    "--optimizer": not_one_of("adam", "adamw", "sgd"),
    "--schedule": not_one_of("step", "cosine", "onecycle"),
    "--warmup": st.one_of(st.sampled_from(["-1", "nan", "inf", "", "x", "1", "5"])),  # 1 epoch is no warm-up of 1
    "--weight-decay": st.sampled_from(["-0.1", "nan", "inf", "", "1e400", "w"]),
    "--image-size": not_a_positive_int(),
    "--device": not_one_of("auto", "cpu", "cuda"),
    "--label-smoothing": st.sampled_from(["-0.1", "1.01", "nan", "inf", "", "e"]),
    "--clip-grad-norm": st.sampled_from(["0", "-1", "nan", "inf", "", "n"]),
}


@FUZZ
@given(data=st.data())
def test_train_with_a_wrong_value(run_dir, data):
    option = data.draw(st.sampled_from(sorted(WRONG)), label="option")
    value = data.draw(WRONG[option], label="value")
    args = {"--device": "cpu", "--data-dir": run_dir / "data", "--model": "tiny", "--epochs": 1, "--batch-size": 64}
    args[option] = value
    with tempfile.TemporaryDirectory() as tmp:
        argv = [item for pair in args.items() for item in pair] + ["--out", os.path.join(tmp, "run"), "--no-progress"]
        code, _, err = run("train", *argv)
        # "--device" takes names like "cuda:0" or " cpu": what matters is a clean answer, not which
        assert_clean(code, err, allowed=(0, 2) if option == "--device" else (2,))
        if code == 2 and option != "--device":
            assert option in err or value in err or "lr decay" in err, err


@FUZZ
@given(command=st.sampled_from(["evaluate", "predict", "export", "profile", "bench", "frobnicate", "--epochs"]),
       junk=st.lists(st.text(max_size=6), max_size=3))
def test_other_commands_with_wrong_arguments(run_dir, command, junk):
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "missing.npz")
        argv = {"evaluate": ["--checkpoint", missing], "predict": ["--checkpoint", missing, run_dir / "image.png"],
                "export": ["--checkpoint", missing, "--output", os.path.join(tmp, "m.onnx")],
                "profile": ["--batch-size", "0"], "bench": ["--repeats", "-1"]}.get(command, [])
        code, _, err = run(command, *argv, *junk)
        assert_clean(code, err, allowed=(2,))
        assert os.listdir(tmp) == []


# ------------------------------------------------------------------------- the layer API

ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([2**31, 10**12, -(2**40)]),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                     st.tuples(st.integers(-2, 6), st.integers(-2, 6)), st.lists(st.integers(0, 5), max_size=3),
                     st.just(np.int64(3)), st.just(np.float32(0.5)))

CONSTRUCTORS = {
    "Conv2D": (L.Conv2D, 3), "MaxPool2D": (L.MaxPool2D, 1), "AvgPool2D": (L.AvgPool2D, 1), "Dense": (L.Dense, 2),
    "LeakyReLU": (L.LeakyReLU, 1), "Residual": (L.Residual, 2),
}


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(sorted(CONSTRUCTORS)), args=st.lists(ANYTHING, min_size=0, max_size=5))
def test_layer_constructors_refuse_wrong_arguments(kind, args):
    cls, _ = CONSTRUCTORS[kind]
    try:
        layer = cls(*args)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    # what was accepted is a working layer, and it says what it is
    assert repr(layer) and isinstance(layer.config(), dict)
    rebuilt = type(layer)(**layer.config())
    assert rebuilt.config() == layer.config()


SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=5).map(tuple)
DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint8, np.complex64, np.bool_])


MODELS_OF_2x6x6 = {
    "plain": lambda: Sequential([L.Conv2D(2, 3, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                                 L.Dense(3 * 3 * 3, 4)]),
    "residual": lambda: Sequential([L.Conv2D(2, 3, 3, padding=1), L.ReLU(),
                                    L.Residual([L.Conv2D(3, 3, 3, padding=1), L.GELU()]), L.ReLU(), L.MaxPool2D(2),
                                    L.Flatten(), L.Dense(3 * 3 * 3, 4)]),
}


@settings(max_examples=150, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, transpose=st.booleans(), wrap=st.sampled_from(["array", "list", "scalar"]),
       kind=st.sampled_from(sorted(MODELS_OF_2x6x6)))
def test_a_model_refuses_wrong_inputs(shape, dtype, transpose, wrap, kind):
    model = MODELS_OF_2x6x6[kind]()
    x = np.ones(shape, dtype)
    if transpose and x.ndim >= 2:
        x = x.swapaxes(-1, -2)
    if wrap == "list":
        x = x.tolist()
    elif wrap == "scalar":
        x = 1.0
    try:
        y = model.forward(x)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    # accepted: the one valid kind of input (an empty batch too, as in PyTorch), and a right answer's shape
    assert isinstance(x, np.ndarray) and x.shape[1:] == (2, 6, 6) and x.dtype in (np.float32, np.float64)
    assert y.shape == (x.shape[0], 4)
    dy = np.ones(y.shape, y.dtype)
    assert model.backward(dy).shape == x.shape


@settings(max_examples=150, deadline=None)
@given(which=st.sampled_from(["sgd", "adam"]), lr=ANYTHING, second=ANYTHING, third=ANYTHING)
def test_optimizers_refuse_wrong_hyperparameters(which, lr, second, third):
    params = L.Dense(3, 2).parameters()
    try:
        if which == "sgd":
            opt = SGD(params, lr=lr, momentum=second, weight_decay=third)
        else:
            opt = Adam(params, lr=lr, betas=second, eps=third)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    assert 0 < opt.lr < float("inf")
    opt.step()
    assert all(np.isfinite(p.data).all() for p in params)


@settings(max_examples=100, deadline=None)
@given(which=st.sampled_from(["label_smoothing", "clip"]), value=ANYTHING)
def test_the_loss_and_the_clipping_refuse_wrong_settings(which, value):
    from nbcnn.step import ClipGradNorm

    try:
        made = SoftmaxCrossEntropy(label_smoothing=value) if which == "label_smoothing" else ClipGradNorm(value)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    setting = made.label_smoothing if which == "label_smoothing" else made.max_norm
    assert (0 <= setting <= 1) if which == "label_smoothing" else (0 < setting < float("inf"))


@settings(max_examples=100, deadline=None)
@given(labels=st.one_of(st.lists(st.integers(-3, 12), min_size=0, max_size=6).map(lambda v: np.array(v, np.int32)),
                        st.lists(st.floats(-2, 12), min_size=1, max_size=6).map(np.array)),
       rows=st.integers(0, 6))
def test_the_loss_refuses_wrong_labels(labels, rows):
    logits = np.zeros((rows, 10), np.float32)
    try:
        loss = SoftmaxCrossEntropy().forward(logits, labels)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        return
    assert rows >= 1 and labels.shape == (rows,) and ((0 <= labels) & (labels < 10)).all()
    assert abs(loss - np.log(10)) < 1e-5
