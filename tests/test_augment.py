"""Augmentation: the shift-and-flip kernel against a NumPy reference, and a run with augmentation,
batch normalisation, dropout and AdamW resumed exactly."""

import numpy as np
import pytest

from nbcnn.kernels._random import hash32
from nbcnn.kernels.augment import draw, shift_flip_cpu
from nbcnn.train import train
from tests import reference as ref
from tests.helpers import tiny_config, write_dataset



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quadrants"))


@pytest.mark.parametrize("flip", [False, True])
def test_shift_flip_against_the_reference(flip):
    x = np.random.default_rng(0).standard_normal((40, 2, 7, 6)).astype(np.float32)
    out = np.empty_like(x)
    shift_flip_cpu(out, x, 5, 3, 2, flip, -0.5)
    np.testing.assert_array_equal(out, ref.shift_flip(x, 5, 3, 2, flip, -0.5))
    draws = [draw(hash32(5, 3, n), 2, flip) for n in range(40)]
    assert len({d[:2] for d in draws}) > 10  # the shifts vary from image to image
    assert any(d[2] for d in draws) == flip and (not flip or not all(d[2] for d in draws))


def test_shift_zero_is_the_identity():
    x = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(shift_flip_cpu(np.empty_like(x), x, 0, 0, 0), x)


def test_bn_model_with_augmentation_resumes_exactly(data_dir, tmp_path, monkeypatch):
    """BatchNorm's running statistics, Dropout's step count, AdamW's state, the one-cycle schedule and
    the augmentation's clock all go on from where they were."""
    kw = dict(model="bn", augment=True, schedule="onecycle", optimizer="adamw", weight_decay=1e-3, batch_size=32,
              epochs=3)
    whole = train(tiny_config(data_dir, tmp_path / "whole", **kw), log=lambda *_: None)
    # the same run stopped after one epoch (its schedule still planned for three) and resumed
    import nbcnn.train as T

    real_plot = T.plot_curves

    def plot_then_stop(metrics, path):  # the last thing an epoch does: stop after the first
        real_plot(metrics, path)
        if len(metrics) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "plot_curves", plot_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_dir, tmp_path / "resumed", **kw), log=lambda *_: None)
    monkeypatch.setattr(T, "plot_curves", real_plot)
    resumed = train(tiny_config(data_dir, tmp_path / "resumed", resume=True, **kw), log=lambda *_: None)
    assert [m["train_loss"] for m in resumed] == [m["train_loss"] for m in whole]
    a, b = np.load(tmp_path / "whole" / "model.npz"), np.load(tmp_path / "resumed" / "model.npz")
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("b.") for k in a.files)
    for name in a.files:
        if name != "__model__":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed[-1]["test_accuracy"] > 0.8
