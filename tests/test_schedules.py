"""Learning-rate schedules: each against its definition (and PyTorch's OneCycleLR), the mistakes
refused, and the rate of every step of a training run."""

import pytest

from nbcnn.optim import AdamW
from nbcnn.schedules import Schedule
from nbcnn.train import train
from tests.helpers import tiny_config, write_dataset



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quadrants"))


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


def test_the_schedule_drives_the_rate_of_every_step(data_dir, tmp_path, monkeypatch):
    rates = []
    real_step = AdamW.step

    def recording_step(self):
        rates.append(self.lr)
        real_step(self)

    monkeypatch.setattr(AdamW, "step", recording_step)
    train(tiny_config(data_dir, tmp_path / "run", optimizer="adamw", schedule="cosine", warmup=1, epochs=2),
          log=lambda *_: None)
    rates = rates[1:]  # the first call is the kernels' warm-up, on a copy of the model
    steps = 2 * 192 // 16
    expected = Schedule("cosine", 0.01, steps, steps // 2, warmup=12)
    assert rates == pytest.approx([expected(i) for i in range(steps)])
