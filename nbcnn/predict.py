"""``nbcnn predict``: a trained model on image files.

Each image goes through what the training data went through, in the same order: read and
converted to the model's channels (``nbcnn.images``), oriented and framed like the training
images (when the checkpoint records how they looked), resized to the model's input, then
normalised with the checkpoint's mean and standard deviation. The model runs in evaluation
mode; the probabilities are the softmax of its logits, in float64.
"""

import numpy as np

from nbcnn.checks import check_int
from nbcnn.device import resolve_device, to_device, to_numpy
from nbcnn.images import fit_to_profile, read_image
from nbcnn.model import Sequential

BATCH = 256  # images per forward


def input_shape(model):
    """(channels, height, width) the model takes: as the checkpoint records it, else found from the
    layers (the first layer's channels; the one square size the dense part fits)."""
    meta = getattr(model, "metadata", {}) or {}
    if "input_shape" in meta:
        return tuple(int(d) for d in meta["input_shape"])
    channels = next((layer.in_channels for layer in model.layers if hasattr(layer, "in_channels")), None)
    if channels is None:
        raise ValueError("the checkpoint does not record its input shape and its first layer does not tell it")
    fits = []
    for size in range(1, 513):
        try:
            model.output_shape((1, channels, size, size))
        except ValueError:
            continue
        fits.append(size)
        if len(fits) > 1:
            break
    if len(fits) != 1:
        raise ValueError("the checkpoint does not record its input size, and the model takes "
                         + ("no square image up to 512 pixels" if not fits else "more than one"))
    return channels, fits[0], fits[0]


def prepare_images(paths, model, fit=True):
    """The images at ``paths`` as the model's float32 input (N, C, H, W), normalised as in training."""
    channels, height, width = input_shape(model)
    if height != width:
        raise ValueError(f"the model takes {height}x{width} images; predict handles square inputs only")
    meta = model.metadata
    profile = meta.get("profile") if fit else None
    mean, std = channel_statistics(meta, channels)
    batch = np.empty((len(paths), channels, height, width), np.float32)
    for i, path in enumerate(paths):
        pixels = fit_to_profile(read_image(path, channels), height, profile)
        batch[i] = (pixels - mean) / std
    return batch


def channel_statistics(meta, channels):
    """The checkpoint's normalisation as float32 arrays (channels, 1, 1): one mean and std for all
    channels (grey data, older checkpoints) or one per channel (colour data); 0 and 1 without any."""
    stats = []
    for name, default in (("mean", 0.0), ("std", 1.0)):
        values = np.asarray(meta.get(name, default), np.float32).reshape(-1)
        if values.size not in (1, channels):
            raise ValueError(f"the checkpoint's {name} has {values.size} values for a model of {channels} channels")
        stats.append(np.broadcast_to(values, channels).reshape(channels, 1, 1).copy())
    return stats


def softmax(logits):
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predict(checkpoint, paths, device="auto", top=1, fit=True):
    """One dict per image: ``path``, ``class`` (the most probable), ``probability`` (its),
    ``top`` (the ``top`` most probable as [class, probability] pairs), ``probabilities``
    (every class, summing to 1) and, for a model trained on a folder of images, ``name`` (the
    class's folder name)."""
    top = check_int("predict", "top", top, minimum=1)
    if not paths:
        raise ValueError("no images given")
    device = resolve_device(device)
    model = Sequential.load(checkpoint, device=device).eval()
    x = prepare_images([str(p) for p in paths], model, fit)
    probs = np.concatenate([softmax(to_numpy(model.forward(to_device(x[i:i + BATCH], device))))
                            for i in range(0, x.shape[0], BATCH)])
    names = model.metadata.get("class_names")  # a model trained on a folder of images knows them
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p, kind="stable")[:min(top, p.size)]
        result = {"path": str(path), "class": int(order[0]), "probability": float(p[order[0]]),
                  "top": [[int(k), float(p[k])] for k in order], "probabilities": [float(v) for v in p]}
        if names and len(names) == p.size:
            result["name"] = str(names[order[0]])
        results.append(result)
    return results


def format_predictions(results):
    """One line per image: the path, then the top classes with their probabilities."""
    width = max(len(r["path"]) for r in results)
    lines = []
    for r in results:
        head = f"{r['path']:<{width}}  " + (f"{r['name']}: " if "name" in r else "")
        lines.append(head + "  ".join(f"{k} ({100 * p:.1f}%)" for k, p in r["top"]))
    return "\n".join(lines)
