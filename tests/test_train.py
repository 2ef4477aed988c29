"""Training end to end on a small data set the tests write, the CLI, resume, user mistakes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nbcnn.optim import Adam
from nbcnn.train import Config, train
from tests.helpers import run_cli, tiny_config, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quadrants"))



def test_train_on_another_data_set_then_evaluate(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 3,
                   "--batch-size", 16, "--lr", 0.01, "--out", out, "--no-progress") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"epoch", "train_loss", "test_accuracy", "seconds"} <= set(m)
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["seconds"] > 0
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["test_accuracy"] > 0.9  # four bright quadrants are easy
    assert (out / "model.npz").exists() and (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", out / "model.npz", "--data-dir", data_dir, "--device", "cpu") == 0
    assert f"test accuracy {100 * metrics[-1]['test_accuracy']:.2f}%" in capsys.readouterr().out



def test_resume_after_an_interruption_ends_as_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    whole = train(tiny_config(data_dir, tmp_path / "whole"), log=lambda *_: None)

    # Interrupt the second run in the middle of epoch 2, as a crash or Ctrl-C would.
    real_step, calls = Adam.step, {"n": 0}
    steps_per_epoch = 192 // 16

    def crashing_step(self):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 5:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_dir, tmp_path / "cut"), log=lambda *_: None)
    monkeypatch.setattr(Adam, "step", real_step)
    assert [m["epoch"] for m in json.loads((tmp_path / "cut" / "metrics.json").read_text())] == [1]

    resumed = train(tiny_config(data_dir, tmp_path / "cut", resume=True), log=lambda *_: None)
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    for a, b in zip(whole, resumed):
        assert a["test_accuracy"] == b["test_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)


def test_resume_with_nothing_to_resume(data_dir, tmp_path, capsys):
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--out", tmp_path, "--resume") == 2
    assert "nothing to resume from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "--batch-size", "0"], "argument --batch-size: value must be at least 1, got 0"),
        (["train", "--lr", "-1"], "argument --lr: value must be greater than 0.0, got -1.0"),
        (["train", "--epochs", "two"], "argument --epochs: value must be an integer, got 'two'"),
        (["train", "--data-dir", "/nonexistent"], "data folder /nonexistent does not exist"),
        (["evaluate", "--checkpoint", "/nonexistent/model.npz", "--device", "cpu"], "no checkpoint at"),
        (["train", "--model", "resnet50"], "invalid choice: 'resnet50'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, message, capsys):
    try:
        code = run_cli(*args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cuda_without_gpu_exits_2_suggesting_cpu(tmp_path):
    from nbcnn.device import cuda_available

    if cuda_available():
        pytest.skip("a GPU (or the simulator) is usable here")
    done = subprocess.run([sys.executable, "-m", "nbcnn", "train", "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not usable here" in lines[0] and "--device cpu" in lines[0]
    assert "Traceback" not in done.stderr


def test_info_runs(capsys):
    assert run_cli("info") == 0
    out = capsys.readouterr().out
    assert "numba" in out and "CUDA:" in out and "threading layer" in out


def test_config_checks_values():
    with pytest.raises(ValueError, match="Config: batch_size must be at least 1, got 0"):
        Config(batch_size=0)
    with pytest.raises(ValueError, match="Config: unknown model 'vgg': choose one of lenet,"):
        Config(model="vgg")
    with pytest.raises(ValueError, match="Config: lr must be finite, got nan"):
        Config(lr=float("nan"))
    assert np.isfinite(Config().lr)


def test_files_get_the_users_umask(data_dir, tmp_path):
    old = os.umask(0o027)
    try:
        assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 1,
                       "--out", tmp_path / "run", "--no-progress") == 0
    finally:
        os.umask(old)
    for name in ("model.npz", "resume.npz", "metrics.json", "curves.png"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, 0.9])
def test_a_cut_checkpoint_is_refused_in_one_line(data_dir, tmp_path, capsys, keep):
    out = tmp_path / "run"
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 1,
                   "--out", out, "--no-progress") == 0
    whole = (out / "model.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole[: int(keep * len(whole)) if isinstance(keep, float) else keep])
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", cut, "--data-dir", data_dir, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an nbcnn checkpoint, or is cut short" in err[0]


def test_a_disk_that_fills_up_keeps_the_last_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    real_savez, saves = np.savez, {"n": 0}

    def savez(f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # epoch 1 wrote model.npz and resume.npz; epoch 2's first write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(f, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    code = run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 2,
                   "--out", out, "--no-progress")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "could not write" in err[0] and "No space left on device; the previous version is kept" in err[0]
    monkeypatch.setattr(np, "savez", real_savez)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.json", "model.npz", "resume.npz"]
    assert run_cli("evaluate", "--checkpoint", out / "model.npz", "--data-dir", data_dir, "--device", "cpu") == 0


def test_an_unusable_out_is_found_before_training(data_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--out", blocker / "run",
                   "--no-progress") == 2
    assert "cannot create the folder" in capsys.readouterr().err
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--out", tmp_path / "run",
                   "--no-progress") == 2
    assert "1,000 bytes free, the checkpoints need about" in capsys.readouterr().err


def test_a_cut_resume_state_is_refused_in_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 1,
                   "--out", out, "--no-progress") == 0
    state = out / "resume.npz"
    state.write_bytes(state.read_bytes()[:300])
    capsys.readouterr()
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 2,
                   "--out", out, "--resume", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a usable resume state" in err[0]


def test_the_kernels_are_prepared_before_the_first_step_and_the_time_said(data_dir, tmp_path):
    lines = []
    metrics = train(tiny_config(data_dir, tmp_path / "run", epochs=1), log=lines.append)
    assert lines[0].startswith("preparing the kernels: compiled on the first run on a machine and cached")
    assert re.fullmatch(r"kernels (ready|compiled and cached) in \d+\.\d s", lines[1]), lines[1]
    assert lines[2].startswith("training tiny on cpu")  # before the first step
    assert metrics[0]["compile_seconds"] > 0


def test_preparing_the_kernels_leaves_the_model_as_it_was(data_dir, tmp_path, monkeypatch):
    import nbcnn.train as T

    with_warmup = train(tiny_config(data_dir, tmp_path / "a", epochs=1), log=lambda *_: None)
    monkeypatch.setattr(T, "_compile_kernels", lambda *args: 0.0)
    without = train(tiny_config(data_dir, tmp_path / "b", epochs=1), log=lambda *_: None)
    assert with_warmup[0]["train_loss"] == without[0]["train_loss"]
    a, b = np.load(tmp_path / "a" / "model.npz"), np.load(tmp_path / "b" / "model.npz")
    for name in a.files:
        if name != "__model__":
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("content", ["{not json", "[{\"no_epoch\": 1}]", "7"])
def test_a_damaged_metrics_file_is_refused_in_one_line_on_resume(data_dir, tmp_path, capsys, content):
    out = tmp_path / "run"
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 1,
                   "--out", out, "--no-progress") == 0
    (out / "metrics.json").write_text(content)
    capsys.readouterr()
    assert run_cli("train", "--device", "cpu", "--data-dir", data_dir, "--model", "tiny", "--epochs", 2,
                   "--out", out, "--resume", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the metrics nbcnn wrote" in err[0]


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


def test_a_models_defaults_include_augmentation_and_the_options_override_them():
    assert Config(model="resnet").augment and Config(model="resnet").epochs == 12
    assert not Config(model="resnet", augment=False).augment
    assert not Config().augment and Config(augment=True).augment
    assert Config().label_smoothing == 0.0 and Config().clip_grad_norm is None
    for bad, error in ((dict(label_smoothing=-0.5), ValueError), (dict(label_smoothing="x"), TypeError),
                       (dict(clip_grad_norm=0), ValueError), (dict(clip_grad_norm=True), TypeError)):
        with pytest.raises(error, match=f"Config: {next(iter(bad))} must be"):
            Config(**bad)
