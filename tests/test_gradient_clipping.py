"""Gradient clipping: the kernels against NumPy and PyTorch's clip_grad_norm_, the Trainer hook, and
``nbcnn train --clip-grad-norm`` / ``--label-smoothing``."""

import json

import numpy as np
import pytest

import nbcnn
from nbcnn import cli
from nbcnn import layers as L
from nbcnn.kernels import optim
from nbcnn.kernels._cpu import SERIAL_BELOW
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import SGD
from nbcnn.step import ClipGradNorm, Trainer
from tests.helpers import write_dataset


@pytest.mark.parametrize("size", [10, SERIAL_BELOW + 7])
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_grad_norm_matches_numpy_on_both_compilations(rng, size, max_norm):
    g = rng.standard_normal(size).astype(np.float32)
    norm = float(np.sqrt((g.astype(np.float64) ** 2).sum()))
    want = g * np.float32(min(1.0, max_norm / (norm + 1e-6)))
    for kernel in (optim._clip_grad_norm_cpu.parallel, optim._clip_grad_norm_cpu.serial):
        got, found = g.copy(), np.zeros(1)
        kernel(got, found, max_norm)
        assert found[0] == pytest.approx(norm, rel=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    got = g.copy()
    assert optim.clip_grad_norm_cpu(got, max_norm) == pytest.approx(norm, rel=1e-12)
    if max_norm > norm:
        np.testing.assert_array_equal(got, g)  # under the bound: untouched, bit for bit


def test_clip_grad_norm_refuses_bad_bounds():
    with pytest.raises(ValueError, match="max_norm must be greater than 0.0"):
        optim.clip_grad_norm_cpu(np.zeros(3), 0)
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        optim.clip_grad_norm_cpu(np.zeros(3), "1")
    with pytest.raises(ValueError, match="ClipGradNorm: max_norm must be finite, got inf"):
        ClipGradNorm(float("inf"))
    with pytest.raises(TypeError, match="max_norm must be a real number"):
        ClipGradNorm(None)


def test_the_hook_clips_what_pytorch_clips():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    L.set_seed(2)
    model = nbcnn.Sequential([L.Conv2D(1, 3, 3), L.ReLU(), L.Flatten(), L.Dense(3 * 4 * 4, 4)])
    x = rng.standard_normal((8, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    raw = [torch.tensor(p.grad.copy()) for p in model.parameters()]
    clip = ClipGradNorm(0.1)
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1), hooks=[clip])
    trainer.step(x, y)  # the same gradients again, clipped, then the update (which leaves them)
    grads = [torch.tensor(p.grad.copy()) for p in model.parameters()]
    for t in raw:
        t.grad = t.clone()
    norm = torch.nn.utils.clip_grad_norm_(raw, 0.1)
    assert clip.last_norm() == pytest.approx(float(norm), rel=1e-5)
    for mine, theirs in zip(grads, raw):
        np.testing.assert_allclose(mine.numpy(), theirs.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_train_with_smoothing_and_clipping(tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=64, n_test=16)
    out = tmp_path / "run"
    assert cli.main(["train", "--device", "cpu", "--data-dir", folder, "--model", "tiny", "--epochs", "1",
                     "--batch-size", "16", "--label-smoothing", "0.1", "--clip-grad-norm", "0.5", "--out", str(out),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "label smoothing 0.1, gradients clipped to norm 0.5" in text
    assert json.loads((out / "metrics.json").read_text())[0]["epoch"] == 1
    for bad, message in ((["--label-smoothing", "1.5"], "argument --label-smoothing: value must be at most 1.0, got 1.5"),
                         (["--clip-grad-norm", "0"], "argument --clip-grad-norm: value must be greater than 0.0, got 0.0")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["train", "--device", "cpu", *bad])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
