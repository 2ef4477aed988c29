"""Schedules, augmentation, AdamW and the bn model in `nbcnn train`; training on a folder of images."""

import json

import numpy as np
import pytest
from PIL import Image

from nbcnn import cli
from nbcnn.data import load_dataset
from nbcnn.kernels.augment import draw, shift_flip_cpu
from nbcnn.kernels._random import hash32
from nbcnn.optim import AdamW
from nbcnn.schedules import Schedule
from nbcnn.train import Config, train
from tests.helpers import write_dataset


def run_cli(*args):
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quadrants"))


# ------------------------------------------------------------------------------ schedules


def test_step_schedule_is_the_per_epoch_decay():
    s = Schedule("step", 0.1, total_steps=30, steps_per_epoch=10, decay=0.5)
    assert [s(i) for i in (0, 9, 10, 19, 20, 29)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_cosine_schedule_with_warmup():
    s = Schedule("cosine", 1.0, total_steps=110, steps_per_epoch=10, warmup=10)
    assert [s(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(110) == pytest.approx(0.0)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_onecycle_matches_pytorch():
    torch = pytest.importorskip("torch")
    total = 137
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    theirs = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, cycle_momentum=False)
    ours = Schedule("onecycle", 0.1, total_steps=total, steps_per_epoch=10)
    for step in range(total):
        assert ours(step) == pytest.approx(theirs.get_last_lr()[0], rel=1e-9, abs=1e-15), step
        opt.step()
        theirs.step()


def test_onecycle_endpoints():
    s = Schedule("onecycle", 0.01, total_steps=1000, steps_per_epoch=100)
    assert s(0) == pytest.approx(0.01 / 25)
    assert max(s(i) for i in range(1000)) == pytest.approx(0.01)
    assert s(999) == pytest.approx(0.01 / 25 / 1e4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="linear"), "Schedule: unknown schedule 'linear': choose one of step, cosine, onecycle"),
    (dict(warmup=100), "Schedule: warmup must be at most 99, got 100"),
    (dict(kind="onecycle", warmup=5), "Schedule: onecycle rises from a low rate by itself; it takes no warmup"),
    (dict(decay=0), "Schedule: decay must be greater than 0.0, got 0.0"),
])
def test_schedule_mistakes(kwargs, message):
    args = {**dict(kind="cosine", lr=0.1, total_steps=100, steps_per_epoch=10), **kwargs}
    with pytest.raises(ValueError, match=message):
        Schedule(args.pop("kind"), args.pop("lr"), **args)


# ---------------------------------------------------------------------------- augmentation


def shift_flip_reference(x, seed, step, max_shift, flip, fill):
    out = np.full_like(x, fill)
    N, C, H, W = x.shape
    for n in range(N):
        dy, dx, mirrored = draw(hash32(seed, step, n), max_shift, flip)
        for i in range(H):
            for j in range(W):
                si, sj = i - dy, (W - 1 - j if mirrored else j) - dx
                if 0 <= si < H and 0 <= sj < W:
                    out[n, :, i, j] = x[n, :, si, sj]
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_shift_flip_against_the_reference(flip):
    x = np.random.default_rng(0).standard_normal((40, 2, 7, 6)).astype(np.float32)
    out = np.empty_like(x)
    shift_flip_cpu(out, x, 5, 3, 2, flip, -0.5)
    np.testing.assert_array_equal(out, shift_flip_reference(x, 5, 3, 2, flip, -0.5))
    draws = [draw(hash32(5, 3, n), 2, flip) for n in range(40)]
    assert len({d[:2] for d in draws}) > 10  # the shifts vary from image to image
    assert any(d[2] for d in draws) == flip and (not flip or not all(d[2] for d in draws))


def test_shift_zero_is_the_identity():
    x = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(shift_flip_cpu(np.empty_like(x), x, 0, 0, 0), x)


# --------------------------------------------------------------------- training options


def config(data_dir, out, **kw):
    base = dict(device="cpu", data_dir=data_dir, model="tiny", epochs=3, batch_size=16, lr=0.01, seed=5,
                out=str(out), progress=False)
    return Config(**{**base, **kw})


def test_model_defaults_and_overrides():
    cfg = Config(model="bn")
    assert (cfg.epochs, cfg.batch_size, cfg.schedule, cfg.optimizer) == (12, 128, "onecycle", "adamw")
    assert cfg.weight_decay > 0
    cfg = Config(model="bn", epochs=2, optimizer="sgd")
    assert (cfg.epochs, cfg.optimizer) == (2, "sgd")
    assert (Config().epochs, Config().schedule, Config().optimizer) == (4, "step", "adam")
    with pytest.raises(ValueError, match="Config: warmup must be less than 2, got 2.0"):
        Config(epochs=2, warmup=2)
    with pytest.raises(ValueError, match="Config: weight_decay must be at least 0.0, got -1.0"):
        Config(weight_decay=-1.0)


def test_the_schedule_drives_the_rate_of_every_step(data_dir, tmp_path, monkeypatch):
    rates = []
    real_step = AdamW.step

    def recording_step(self):
        rates.append(self.lr)
        real_step(self)

    monkeypatch.setattr(AdamW, "step", recording_step)
    train(config(data_dir, tmp_path / "run", optimizer="adamw", schedule="cosine", warmup=1, epochs=2),
          log=lambda *_: None)
    rates = rates[1:]  # the first call is the kernels' warm-up, on a copy of the model
    steps = 2 * 192 // 16
    expected = Schedule("cosine", 0.01, steps, steps // 2, warmup=12)
    assert rates == pytest.approx([expected(i) for i in range(steps)])


def test_bn_model_with_augmentation_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """BatchNorm's running statistics, Dropout's step count, AdamW's state, the one-cycle schedule and
    the augmentation's clock all go on from where they were."""
    kw = dict(model="bn", augment=True, schedule="onecycle", optimizer="adamw", weight_decay=1e-3, batch_size=32,
              epochs=3)
    whole = train(config(data_dir, tmp_path / "whole", **kw), log=lambda *_: None)
    # the same run stopped after one epoch (its schedule still planned for three) and resumed
    import nbcnn.train as T

    real_plot = T.plot_curves

    def plot_then_stop(metrics, path):  # the last thing an epoch does: stop after the first
        real_plot(metrics, path)
        if len(metrics) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "plot_curves", plot_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(config(data_dir, tmp_path / "resumed", **kw), log=lambda *_: None)
    monkeypatch.setattr(T, "plot_curves", real_plot)
    resumed = train(config(data_dir, tmp_path / "resumed", resume=True, **kw), log=lambda *_: None)
    assert [m["train_loss"] for m in resumed] == [m["train_loss"] for m in whole]
    a, b = np.load(tmp_path / "whole" / "model.npz"), np.load(tmp_path / "resumed" / "model.npz")
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("b.") for k in a.files)
    for name in a.files:
        if name != "__model__":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed[-1]["test_accuracy"] > 0.8


# ------------------------------------------------------------------------ image folders


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


def test_a_models_defaults_include_augmentation_and_the_options_override_them():
    assert Config(model="resnet").augment and Config(model="resnet").epochs == 12
    assert not Config(model="resnet", augment=False).augment
    assert not Config().augment and Config(augment=True).augment
    assert Config().label_smoothing == 0.0 and Config().clip_grad_norm is None
    for bad, error in ((dict(label_smoothing=-0.5), ValueError), (dict(label_smoothing="x"), TypeError),
                       (dict(clip_grad_norm=0), ValueError), (dict(clip_grad_norm=True), TypeError)):
        with pytest.raises(error, match=f"Config: {next(iter(bad))} must be"):
            Config(**bad)
