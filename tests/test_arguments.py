"""Every public constructor, walked with a wrong type and a wrong value for each of its arguments.

The rule (nbcnn.checks): a wrong type is a TypeError, a wrong value a ValueError, each one line
that starts "Owner: argument must be"; and one mistake reads the same wherever it is made (a
negative learning rate says the same to SGD, Adam, AdamW, a Schedule and the training Config).
"""

import inspect

import numpy as np
import pytest

from nbcnn import layers as L
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.model import Sequential
from nbcnn.optim import SGD, Adam, AdamW
from nbcnn.schedules import Schedule
from nbcnn.step import Augment, ClipGradNorm, Trainer
from nbcnn.train import Config


def params():
    return L.Dense(3, 2).parameters()


def trainer(**kwargs):
    model = Sequential([L.Dense(3, 2)])
    return Trainer(**{**dict(model=model, loss_fn=SoftmaxCrossEntropy(), optimizer=SGD(model.parameters(), lr=0.1)),
                      **kwargs})


def schedule(**kwargs):
    return Schedule(**{**dict(kind="cosine", lr=0.1, total_steps=100, steps_per_epoch=10), **kwargs})


ONLY_THE_TYPE = object()  # an argument whose every wrong value is a wrong type

# (owner, make(**the one argument), argument, a wrong type, a wrong value)
CASES = [
    ("Conv2D", lambda **a: L.Conv2D(**{**dict(in_channels=1, out_channels=2, kernel_size=3), **a}),
     "in_channels", 1.0, 0),
    ("Conv2D", lambda **a: L.Conv2D(**{**dict(in_channels=1, out_channels=2, kernel_size=3), **a}),
     "out_channels", "2", -1),
    ("Conv2D", lambda **a: L.Conv2D(**{**dict(in_channels=1, out_channels=2, kernel_size=3), **a}),
     "kernel_size", (3,), 0),
    ("Conv2D", lambda **a: L.Conv2D(1, 2, 3, **a), "stride", 1.5, (1, 0)),
    ("Conv2D", lambda **a: L.Conv2D(1, 2, 3, **a), "padding", "1", -1),
    ("Conv2D", lambda **a: L.Conv2D(1, 2, 3, **a), "algorithm", 3, "winograd"),
    ("MaxPool2D", lambda **a: L.MaxPool2D(**{**dict(kernel_size=2), **a}), "kernel_size", 2.0, 0),
    ("MaxPool2D", lambda **a: L.MaxPool2D(2, **a), "stride", [2, 2, 2], 0),
    ("MaxPool2D", lambda **a: L.MaxPool2D(2, **a), "padding", True, -1),
    ("AvgPool2D", lambda **a: L.AvgPool2D(**{**dict(kernel_size=2), **a}), "kernel_size", None, (2, 0)),
    ("AvgPool2D", lambda **a: L.AvgPool2D(2, **a), "stride", "2", -2),
    ("AvgPool2D", lambda **a: L.AvgPool2D(2, **a), "padding", 0.5, -1),
    ("Dense", lambda **a: L.Dense(**{**dict(in_features=3, out_features=2), **a}), "in_features", 3.0, 0),
    ("Dense", lambda **a: L.Dense(**{**dict(in_features=3, out_features=2), **a}), "out_features", None, 2**31),
    ("LeakyReLU", lambda **a: L.LeakyReLU(**a), "negative_slope", "0.1", float("nan")),
    ("BatchNorm2D", lambda **a: L.BatchNorm2D(**{**dict(num_features=3), **a}), "num_features", 3.5, 0),
    ("BatchNorm2D", lambda **a: L.BatchNorm2D(3, **a), "eps", "1e-5", 0.0),
    ("BatchNorm2D", lambda **a: L.BatchNorm2D(3, **a), "momentum", [0.1], 1.5),
    ("Dropout", lambda **a: L.Dropout(**a), "p", "0.5", 1.0),
    ("Residual", lambda **a: L.Residual(**{**dict(block=[L.ReLU()]), **a}), "block", L.ReLU(), ONLY_THE_TYPE),
    ("Residual", lambda **a: L.Residual([L.ReLU()], **a), "shortcut", "identity", ONLY_THE_TYPE),
    ("SoftmaxCrossEntropy", lambda **a: SoftmaxCrossEntropy(**a), "label_smoothing", "0.1", 1.5),
    ("SGD", lambda **a: SGD(params(), **{**dict(lr=0.1), **a}), "lr", "0.1", -0.1),
    ("SGD", lambda **a: SGD(params(), lr=0.1, **a), "momentum", "0.9", 1.0),
    ("SGD", lambda **a: SGD(params(), lr=0.1, **a), "weight_decay", None, -1.0),
    ("Adam", lambda **a: Adam(params(), **a), "lr", "0.1", -0.1),
    ("Adam", lambda **a: Adam(params(), **a), "betas", 0.9, (0.9, 1.0)),
    ("Adam", lambda **a: Adam(params(), **a), "eps", "1e-8", 0.0),
    ("AdamW", lambda **a: AdamW(params(), **a), "lr", "0.1", -0.1),
    ("AdamW", lambda **a: AdamW(params(), **a), "betas", [0.9], (-0.1, 0.999)),
    ("AdamW", lambda **a: AdamW(params(), **a), "eps", None, -1e-8),
    ("AdamW", lambda **a: AdamW(params(), **a), "weight_decay", "0.01", -1.0),
    ("Schedule", schedule, "kind", 1, "linear"),
    ("Schedule", schedule, "lr", "0.1", -0.1),
    ("Schedule", schedule, "total_steps", 100.0, 0),
    ("Schedule", schedule, "steps_per_epoch", "10", 0),
    ("Schedule", schedule, "warmup", 1.5, 100),
    ("Schedule", schedule, "decay", "0.5", 0.0),
    ("Schedule", schedule, "pct_start", "0.3", 1.0),
    ("Schedule", schedule, "div_factor", None, 0.0),
    ("Schedule", schedule, "final_div_factor", "1e4", -1.0),
    ("Augment", lambda **a: Augment(**a), "shift", 2.0, -1),
    ("Augment", lambda **a: Augment(**a), "fill", "0", float("inf")),
    ("Augment", lambda **a: Augment(**a), "seed", "0", -1),
    ("ClipGradNorm", lambda **a: ClipGradNorm(**{**dict(max_norm=1.0), **a}), "max_norm", None, 0.0),
    ("Trainer", trainer, "model", "lenet", ONLY_THE_TYPE),
    ("Trainer", trainer, "loss_fn", "xent", ONLY_THE_TYPE),
    ("Trainer", trainer, "optimizer", "adam", ONLY_THE_TYPE),
    ("Trainer", trainer, "read_every", 2.5, 0),
    ("Trainer", trainer, "augment", True, ONLY_THE_TYPE),
    ("Config", lambda **a: Config(**a), "model", 3, "vgg"),
    ("Config", lambda **a: Config(**a), "optimizer", 3, "rmsprop"),
    ("Config", lambda **a: Config(**a), "schedule", 3, "linear"),
    ("Config", lambda **a: Config(**a), "epochs", 2.0, 0),
    ("Config", lambda **a: Config(**a), "batch_size", "64", 0),
    ("Config", lambda **a: Config(**a), "seed", 0.5, -1),
    ("Config", lambda **a: Config(**a), "lr", "0.1", -0.1),
    ("Config", lambda **a: Config(**a), "lr_decay", "0.5", 0.0),
    ("Config", lambda **a: Config(**a), "warmup", "1", 4.0),
    ("Config", lambda **a: Config(**a), "weight_decay", "0", -1.0),
    ("Config", lambda **a: Config(**a), "label_smoothing", "0.1", 1.5),
    ("Config", lambda **a: Config(**a), "clip_grad_norm", "1", 0.0),
    ("Config", lambda **a: Config(**a), "image_size", 28.0, 0),
    ("set_seed", lambda **a: L.set_seed(**a), "seed", "1", -1),
]
SAID = {("Schedule", "kind"): "schedule", ("Adam", "betas"): "beta", ("AdamW", "betas"): "beta"}  # how messages name them


def _message(exc):
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("owner, make, name, wrong_type, wrong_value", CASES,
                         ids=[f"{c[0]}.{c[2]}" for c in CASES])
def test_a_wrong_type_is_a_type_error_and_a_wrong_value_a_value_error(owner, make, name, wrong_type, wrong_value):
    said = SAID.get((owner, name), name)
    with pytest.raises(TypeError) as info:
        make(**{name: wrong_type})
    text = _message(info.value)
    assert text.startswith(f"{owner}: {said}") and " must be " in text, text
    if wrong_value is ONLY_THE_TYPE:
        return
    with pytest.raises(ValueError) as info:
        make(**{name: wrong_value})
    text = _message(info.value)
    assert (text.startswith(f"{owner}: {said}") and " must be " in text
            or text.startswith(f"{owner}: unknown {said} {wrong_value!r}: choose one of ")), text


PUBLIC = [L.Conv2D, L.MaxPool2D, L.AvgPool2D, L.LeakyReLU, L.Dense, L.BatchNorm2D, L.Dropout, L.Residual,
          SoftmaxCrossEntropy, SGD, Adam, AdamW, Schedule, Augment, ClipGradNorm, Trainer, Config]
NOT_CHECKED = {  # arguments of no fixed type: what they switch on is their truth
    "bias", "flip", "device", "data_dir", "out", "resume", "progress", "augment", "distributed",
    "params", "kernels", "spans", "hooks", "schedule", "group",
}


def test_every_argument_of_every_public_constructor_is_walked():
    layers = {cls for cls in vars(L).values()
              if isinstance(cls, type) and issubclass(cls, L.Layer) and not cls.__name__.startswith("_")}
    assert layers - {L.Layer} <= set(PUBLIC) | {L.ReLU, L.Tanh, L.Sigmoid, L.GELU, L.Flatten, L.GlobalAvgPool2D}
    walked = {(owner, name) for owner, _, name, _, _ in CASES}
    for cls in PUBLIC:
        for name in list(inspect.signature(cls.__init__).parameters)[1:]:
            if name in NOT_CHECKED and (cls.__name__, name) not in walked:
                continue
            assert (cls.__name__, name) in walked, f"{cls.__name__}({name}=...) is not walked"


@pytest.mark.parametrize("name, wrong, owners", [
    ("lr", -0.1, ("SGD", "Adam", "AdamW", "Schedule", "Config")),
    ("lr", "0.1", ("SGD", "Adam", "AdamW", "Schedule", "Config")),
    ("weight_decay", -1.0, ("SGD", "AdamW", "Config")),
    ("label_smoothing", 1.5, ("SoftmaxCrossEntropy", "Config")),
    ("seed", -1, ("Augment", "Config", "set_seed")),
])
def test_one_mistake_reads_the_same_everywhere(name, wrong, owners):
    said = set()
    for owner, make, arg, _, _ in CASES:
        if owner in owners and arg == name:
            with pytest.raises((TypeError, ValueError)) as info:
                make(**{name: wrong})
            said.add(str(info.value).split(": ", 1)[1])
    assert len(said) == 1, said


def test_the_cli_says_it_in_the_same_words(capsys):
    from nbcnn import cli

    for option, text, words in (("--lr", "-0.1", "value must be greater than 0.0, got -0.1"),
                                ("--epochs", "2.5", "value must be an integer, got '2.5'"),
                                ("--label-smoothing", "1.5", "value must be at most 1.0, got 1.5")):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", option, text])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: {words}" in err, err
    with pytest.raises(ValueError) as info:
        SGD(params(), lr=-0.1)
    assert str(info.value) == "SGD: lr must be greater than 0.0, got -0.1"


def test_a_layer_with_good_arguments_still_works():
    x = np.ones((2, 3), np.float32)
    assert L.Dense(3, 2).forward(x).shape == (2, 2)
