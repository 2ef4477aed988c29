"""Training and evaluation on MNIST-format data, on the CPU or a GPU.

On CUDA the whole data set, the parameters and the optimizer state live on the GPU; each
minibatch is gathered there from a shuffled index, and only scalars (the loss, the count
of correct predictions) come back to the host.

Reproducible: the weights are initialised from the seed, and epoch e is shuffled by a
generator seeded with (seed, e), so a run resumed after epoch e continues exactly as an
uninterrupted run would.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from nbcnn import STARTED
from nbcnn import layers as L
from nbcnn.checks import check_choice, check_int, check_real
from nbcnn.data import describe, is_image_folder, load_dataset, normalization, prepare
from nbcnn import distributed
from nbcnn.device import resolve_device, to_device, to_numpy
from nbcnn.distributed import DistributedError, Group, gradient_hook
from nbcnn.images import ink_profile
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.model import Sequential, atomic_write, read_npz
from nbcnn.models import DEFAULTS, MODELS
from nbcnn.optim import SGD, Adam, AdamW
from nbcnn.schedules import KINDS, Schedule
from nbcnn.step import Augment, ClipGradNorm, Trainer

OPTIMIZERS = ("adam", "adamw", "sgd")


BASE_DEFAULTS = dict(epochs=4, batch_size=64, lr=1e-3, lr_decay=0.5, schedule="step", warmup=0.0,
                     optimizer="adam", weight_decay=0.0, augment=False, label_smoothing=0.0)


class Config:
    """Training settings, checked at once. A setting left at None takes the model's default
    (``nbcnn.models.DEFAULTS``), else ``BASE_DEFAULTS``.

    ``schedule``: "step" (``lr * lr_decay**epoch``), "cosine" or "onecycle" (``nbcnn.schedules``);
    ``warmup``: epochs of linear warm-up (step and cosine); ``augment``: random shifts of up to
    2 pixels (and mirror images for colour data) of every training batch; ``weight_decay``: SGD's
    L2 term or AdamW's decoupled decay; ``label_smoothing``: the loss's (``SoftmaxCrossEntropy``);
    ``clip_grad_norm``: the largest norm the gradients keep (``step.ClipGradNorm``), None for no
    clipping."""

    def __init__(self, device="auto", epochs=None, batch_size=None, lr=None, lr_decay=None, seed=0, data_dir=None,
                 out="runs/mnist", resume=False, model="lenet", optimizer=None, progress=True, schedule=None,
                 warmup=None, augment=None, weight_decay=None, image_size=None, distributed=False,
                 label_smoothing=None, clip_grad_norm=None):
        check_choice("Config", "model", model, MODELS)
        given = dict(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, schedule=schedule,
                     warmup=warmup, optimizer=optimizer, weight_decay=weight_decay, augment=augment,
                     label_smoothing=label_smoothing)
        for name, value in given.items():
            if value is None:
                given[name] = DEFAULTS.get(model, {}).get(name, BASE_DEFAULTS[name])
        self.model, self.device, self.data_dir, self.out = model, device, data_dir, out
        self.optimizer = check_choice("Config", "optimizer", given["optimizer"], OPTIMIZERS)
        self.schedule = check_choice("Config", "schedule", given["schedule"], KINDS)
        self.epochs = check_int("Config", "epochs", given["epochs"], minimum=1)
        self.batch_size = check_int("Config", "batch_size", given["batch_size"], minimum=1)
        self.seed = check_int("Config", "seed", seed, minimum=0)
        self.lr = check_real("Config", "lr", given["lr"], minimum=0.0, open_min=True)
        self.lr_decay = check_real("Config", "lr_decay", given["lr_decay"], minimum=0.0, maximum=1.0, open_min=True)
        self.warmup = check_real("Config", "warmup", given["warmup"], minimum=0.0, maximum=self.epochs, open_max=True)
        if self.warmup and self.schedule == "onecycle":
            raise ValueError("Config: onecycle rises from a low rate by itself; it takes no warmup")
        self.weight_decay = check_real("Config", "weight_decay", given["weight_decay"], minimum=0.0)
        self.label_smoothing = check_real("Config", "label_smoothing", given["label_smoothing"], minimum=0.0,
                                          maximum=1.0)
        self.clip_grad_norm = None if clip_grad_norm is None else check_real(
            "Config", "clip_grad_norm", clip_grad_norm, minimum=0.0, open_min=True)
        self.image_size = None if image_size is None else check_int("Config", "image_size", image_size, minimum=1)
        self.augment, self.resume, self.progress = bool(given["augment"]), bool(resume), bool(progress)
        self.distributed = bool(distributed)


def _quiet(*args, **kwargs):
    pass


def _labels_int32(labels):
    return np.ascontiguousarray(labels, dtype=np.int32)


def evaluate(model, x, y, batch_size=250):
    """(mean loss, accuracy) of ``model`` on x (N, C, H, W) and labels y (N,), both on the model's device."""
    return Trainer(model, SoftmaxCrossEntropy(), None).evaluate(x, y, batch_size)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=True, dynamic_ncols=True)


def plot_curves(metrics, path):
    """Loss and accuracy per epoch, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")
    ax1.plot(epochs, [m["test_loss"] for m in metrics], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax1.legend()
    ax2.plot(epochs, [100 * m["test_accuracy"] for m in metrics], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="%", title="test accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _make_optimizer(cfg, params):
    if cfg.optimizer == "adam":
        return Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def _save_resume_state(path, model, optimizer, epoch):
    """Everything a resumed run needs, in one file written atomically: the epoch just finished,
    the weights, the optimizer's state and step count. One file, so they always agree."""
    arrays = {f"opt_{k}": to_numpy(v) for k, v in optimizer.state_arrays().items()}
    arrays.update({f"model_{k}": v for k, v in model.state_arrays().items()})
    arrays["model_config"] = np.array(json.dumps(model.config()))
    step = getattr(optimizer, "t", 0)
    atomic_write(path, lambda f: np.savez(f, epoch=np.array(epoch), step=np.array(step), **arrays))


def _load_resume_state(path, model, optimizer_factory, device):
    """Restore the weights into ``model``; return (optimizer, finished epoch)."""
    what = "a usable resume state"
    data = read_npz(path, what)
    try:
        config = json.loads(str(data["model_config"]))
        epoch, step = int(data["epoch"]), int(data["step"])
    except (KeyError, ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"--resume: {path} is not {what} ({describe(exc)})") from None
    if config != json.loads(json.dumps(model.config())):
        raise ValueError(f"--resume: {path} holds a different model than the one asked for")
    if epoch < 0 or step < 0:
        raise ValueError(f"--resume: {path} is not {what} (epoch {epoch}, step {step})")
    model.load_state_arrays({k[len("model_"):]: v for k, v in data.items()
                             if k.startswith("model_") and k != "model_config"})  # weights and buffers
    opt_arrays = {k[len("opt_"):]: to_device(v, device) for k, v in data.items() if k.startswith("opt_")}
    optimizer = optimizer_factory(model.parameters())
    optimizer.load_state_arrays(opt_arrays)
    if hasattr(optimizer, "t"):
        optimizer.t = step
    return optimizer, epoch


def _compile_kernels(cfg, model, x, y, augment, log):
    """Make Numba compile every kernel of the run (or load it from its on-disk cache) before the
    first real step, and say so: a first run on a machine spends most of a minute here, with
    nothing on the screen but a progress bar at zero otherwise.

    One training step and one evaluation batch of a throwaway copy of the model (same layers,
    device and optimizer, so the same kernel signatures); the model being trained is not touched.
    Returns the seconds it took."""
    log("preparing the kernels: compiled on the first run on a machine and cached by Numba, "
        "loaded from the cache after ...")
    started = time.perf_counter()
    copy = Sequential.from_config(model.config()).to(model.device)
    hooks = [ClipGradNorm(cfg.clip_grad_norm)] if cfg.clip_grad_norm is not None else []
    trainer = Trainer(copy, SoftmaxCrossEntropy(), _make_optimizer(cfg, copy.parameters()), augment=augment,
                      hooks=hooks)
    rows = to_device(np.arange(min(cfg.batch_size, x.shape[0]), dtype=np.int32), model.device)
    trainer.step(*trainer.batch(x, y, rows))
    trainer.read()
    trainer.evaluate(x[:1], y[:1])
    seconds = time.perf_counter() - started
    how = "compiled and cached" if seconds > 3 else "ready"
    log(f"kernels {how} in {seconds:.1f} s")
    return seconds


def _check_out(out, model):
    """Find an unusable --out before training rather than after the first epoch: the folder must be
    creatable and writable, with room for the checkpoint, the resume state and the curves."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    # model.npz holds the weights, resume.npz the weights and two optimizer states: 4 copies in
    # float32, and a megabyte for the curves, the metrics and the files' own overhead
    need = 4 * 4 * sum(p.size for p in model.parameters()) + (1 << 20)
    free = shutil.disk_usage(out).free
    if free < need:
        raise ValueError(f"--out {out}: {free:,} bytes free, the checkpoints need about {need:,}")


@dataclass
class _Data:
    """The data set on the device, normalised, and what a checkpoint keeps of it."""

    train_x: object
    train_y: object
    test_x: object
    test_y: object
    channels: int
    size: int
    classes: int
    mean: object
    std: object
    metadata: dict  # what `nbcnn predict` needs to treat a new image as the training images were


def _load_data(cfg, device):
    data = load_dataset(cfg.data_dir, cfg.image_size)
    images = data["train_images"]  # (N, H, W) grey, or (N, C, H, W) from a folder of colour images
    mean, std = normalization(images)
    classes = int(max(data["train_labels"].max(), data["test_labels"].max())) + 1
    channels, size = (1 if images.ndim == 3 else images.shape[1]), images.shape[-1]
    metadata = dict(mean=mean, std=std, classes=classes, model=cfg.model, input_shape=[channels, size, size],
                    profile=ink_profile(images) if channels == 1 else None)
    if "class_names" in data:
        metadata["class_names"] = data["class_names"]
    return _Data(train_x=to_device(prepare(images, mean, std), device),
                 train_y=to_device(_labels_int32(data["train_labels"]), device),
                 test_x=to_device(prepare(data["test_images"], mean, std), device),
                 test_y=to_device(_labels_int32(data["test_labels"]), device),
                 channels=channels, size=size, classes=classes, mean=mean, std=std, metadata=metadata)


def _join_group(cfg, log):
    """(group, log, show_progress): the MPI group of a distributed run (None otherwise); a rank other
    than 0 prints nothing."""
    if not cfg.distributed:
        return None, log, cfg.progress
    group = Group.world()
    if group.size > cfg.batch_size:
        raise DistributedError(f"--distributed: {group.size} ranks share a global batch of {cfg.batch_size}; "
                               f"give --batch-size {group.size} or more, or fewer ranks")
    if cfg.device != "cpu":
        group.select_gpu_if_any()
    return (group, log, cfg.progress) if group.is_root else (group, _quiet, False)


def _build_model(cfg, data, device):
    L.set_seed(cfg.seed)
    model = MODELS[cfg.model](data.channels, data.classes, data.size).to(device)
    model.output_shape((1, data.channels, data.size, data.size))  # a model that does not fit the images fails here
    return model


def _augmentation(cfg, data):
    """Shifts of up to 2 pixels; mirror images only for colour pictures (a mirrored digit is no digit).
    Shifted in: a black pixel's value for grey data (the digits' background), 0 for colour data,
    each channel normalised on its own (the kernel takes one value: 0 is the mean colour)."""
    if not cfg.augment:
        return None
    fill = (0.0 - data.mean) / data.std if data.channels == 1 else 0.0
    return Augment(2, flip=data.channels == 3, fill=fill, seed=cfg.seed)


def _hooks(cfg, group):
    """What runs between backward and the update: the sum over the ranks first, then clipping."""
    hooks = [gradient_hook(group)] if group is not None else []
    if cfg.clip_grad_norm is not None:
        hooks.append(ClipGradNorm(cfg.clip_grad_norm))
    return hooks


def _resume(cfg, paths, model, device, log):
    """(optimizer, finished epoch, metrics so far) from the resume state in ``cfg.out``."""
    if not os.path.exists(paths["resume"]):
        raise FileNotFoundError(f"--resume: nothing to resume from in {cfg.out} (no resume.npz)")
    optimizer, start_epoch = _load_resume_state(paths["resume"], model, lambda p: _make_optimizer(cfg, p), device)
    metrics = []
    if os.path.exists(paths["metrics"]):
        try:
            with open(paths["metrics"]) as f:
                metrics = [m for m in json.load(f) if m["epoch"] <= start_epoch]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"--resume: {paths['metrics']} is not the metrics nbcnn wrote ({describe(exc)})") from None
    log(f"resuming after epoch {start_epoch} from {cfg.out}")
    return optimizer, start_epoch, metrics


def _start_together(group, model):
    """From here the ranks work together: the same weights and buffers everywhere (rank 0's), and a
    failure on one rank ends the job (see distributed.ACTIVE)."""
    distributed.ACTIVE = group
    group.broadcast_(model.buffer.data)
    for array in model.buffers().values():
        group.broadcast_(array)


def _describe_run(cfg, data, device, group, schedule, augment, start_epoch):
    n = data.train_x.shape[0]
    return (f"training {cfg.model} on {device}: {n} images of {data.channels}x{data.size}x{data.size}, "
            f"{data.classes} classes, batch {cfg.batch_size}{f' over {group.size} ranks' if group else ''}, "
            f"{cfg.optimizer}, {schedule.describe()}{', augmented' if augment else ''}"
            f"{f', label smoothing {cfg.label_smoothing:g}' if cfg.label_smoothing else ''}"
            f"{f', gradients clipped to norm {cfg.clip_grad_norm:g}' if cfg.clip_grad_norm is not None else ''}, "
            f"epochs {start_epoch + 1}..{cfg.epochs}")


def _run_epoch(cfg, trainer, data, epoch, show_progress, first_step):
    """One epoch over the training set, shuffled from (seed, epoch); (mean loss, seconds)."""
    n = data.train_x.shape[0]
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n).astype(np.int32)
    order = to_device(order, trainer.device)  # the only transfer of the epoch: n indices
    bar = _progress(n, f"epoch {epoch}/{cfg.epochs}", show_progress)
    progress = None
    if bar is not None:
        def progress(done, mean_loss, images_per_second):
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_second:,.0f}")
    started = time.perf_counter()
    try:
        mean_loss = trainer.run_epoch(data.train_x, data.train_y, order, cfg.batch_size, progress, first_step)
    except FloatingPointError as exc:
        raise FloatingPointError(f"epoch {epoch}: {exc}: lower the learning rate (--lr)") from None
    finally:
        if bar is not None:
            bar.close()
    return mean_loss, time.perf_counter() - started


def _write_files(cfg, paths, model, optimizer, metrics, metadata):
    """The checkpoint, the resume state, the metrics and the curves after an epoch; each atomically."""
    model.save(paths["checkpoint"], **metadata)
    _save_resume_state(paths["resume"], model, optimizer, metrics[-1]["epoch"])
    atomic_write(paths["metrics"], lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    plot_curves(metrics, os.path.join(cfg.out, "curves.png"))


def train(cfg, log=print):
    """Train as ``cfg`` says; returns the list of per-epoch metrics (also in out/metrics.json).

    With ``cfg.distributed``, one rank of an MPI job (``nbcnn.distributed``): every rank runs this
    with the same settings; rank 0 alone prints and writes files."""
    group, log, show_progress = _join_group(cfg, log)
    device = resolve_device(cfg.device)
    data = _load_data(cfg, device)
    n = data.train_x.shape[0]
    model = _build_model(cfg, data, device)
    _check_out(cfg.out, model)
    paths = dict(checkpoint=os.path.join(cfg.out, "model.npz"), resume=os.path.join(cfg.out, "resume.npz"),
                 metrics=os.path.join(cfg.out, "metrics.json"))
    if cfg.resume:
        optimizer, start_epoch, metrics = _resume(cfg, paths, model, device, log)
    else:
        optimizer, start_epoch, metrics = _make_optimizer(cfg, model.parameters()), 0, []
    steps_per_epoch = -(-n // cfg.batch_size)
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.epochs * steps_per_epoch, steps_per_epoch,
                        warmup=int(round(cfg.warmup * steps_per_epoch)), decay=cfg.lr_decay)
    augment = _augmentation(cfg, data)
    trainer = Trainer(model, SoftmaxCrossEntropy(label_smoothing=cfg.label_smoothing), optimizer, schedule=schedule,
                      augment=augment, hooks=_hooks(cfg, group), group=group)
    trainer.steps = start_epoch * steps_per_epoch  # a resumed run's schedule and augmentation go on from there
    if group is not None:
        _start_together(group, model)
    compile_seconds = _compile_kernels(cfg, model, data.train_x, data.train_y, augment, log)
    log(_describe_run(cfg, data, device, group, schedule, augment, start_epoch))
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        startup = {}
        first_step = None
        if epoch == start_epoch + 1:
            def first_step():
                startup["seconds"] = time.perf_counter() - STARTED
        mean_loss, seconds = _run_epoch(cfg, trainer, data, epoch, show_progress, first_step)
        test_loss, test_accuracy = trainer.evaluate(data.test_x, data.test_y)
        record = dict(epoch=epoch, train_loss=mean_loss, test_loss=test_loss, test_accuracy=test_accuracy,
                      seconds=seconds, samples_per_second=n / seconds, device=device, model=cfg.model,
                      batch_size=cfg.batch_size, lr=optimizer.lr, seed=cfg.seed, ranks=group.size if group else 1)
        if startup:
            # from the import of nbcnn to the end of this run's first step: with Numba's cache warm,
            # mostly loading the data; on a first run, compiling the kernels
            record["first_step_seconds"] = startup["seconds"]
            record["compile_seconds"] = compile_seconds
        metrics.append(record)
        if group is None or group.is_root:  # one writer
            _write_files(cfg, paths, model, optimizer, metrics, data.metadata)
        if startup:
            log(f"first step finished {startup['seconds']:.2f} s after nbcnn was imported")
        log(f"epoch {epoch}: train loss {mean_loss:.4f}, test loss {test_loss:.4f}, test accuracy "
            f"{100 * test_accuracy:.2f}%, {seconds:.1f} s ({record['samples_per_second']:,.0f} img/s)")
    distributed.ACTIVE = None  # the ranks are done working together
    return metrics


def evaluate_checkpoint(path, device="auto", data_dir=None, log=print):
    """Accuracy and loss of a saved model on the test split."""
    device = resolve_device(device)
    model = Sequential.load(path, device=device)
    meta = model.metadata
    size = None
    if data_dir is not None and is_image_folder(data_dir):  # pictures: resized to the model's input
        size = int(meta.get("input_shape", [0, 28])[-1])
    data = load_dataset(data_dir, size)
    if "mean" in meta:
        mean, std = meta["mean"], meta["std"]
    else:
        mean, std = normalization(data["train_images"])
    x = to_device(prepare(data["test_images"], mean, std), device)
    y = to_device(_labels_int32(data["test_labels"]), device)
    model.output_shape(tuple(x.shape))
    loss, accuracy = evaluate(model, x, y)
    log(f"{path}: test accuracy {100 * accuracy:.2f}%, test loss {loss:.4f} on {x.shape[0]} images ({device})")
    return dict(test_loss=loss, test_accuracy=accuracy, device=device)
