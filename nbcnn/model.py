"""Sequential: layers applied in order, backpropagated in reverse; summary, save and load."""

import json
import os
import tempfile

import numpy as np

from nbcnn.device import device_of, resolve_device, to_device, to_numpy
from nbcnn.layers import LAYERS, Layer

CHECKPOINT_FORMAT = "nbcnn-sequential-1"


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash or a full disk midway leaves the previous file intact, never half of a new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Sequential(Layer):
    """A stack of layers: ``forward`` runs them in order, ``backward`` in reverse."""

    def __init__(self, layers):
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not an nbcnn layer")
        self.layers = layers
        self.device = "cpu"
        self.metadata = {}  # what save() stored beside the weights (normalization, ...)
        self._last_input_shape = None

    def forward(self, x):
        try:
            where = device_of(x)
        except TypeError:
            raise TypeError(f"Sequential.forward: x must be a NumPy or GPU array, got {type(x).__name__}") from None
        if where != self.device:
            raise ValueError(f"Sequential.forward: the input is on {where} but the model is on {self.device}; "
                             f"move it with nbcnn.to_device(x, {self.device!r})")
        self._last_input_shape = tuple(x.shape)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dy, need_dx=True):
        """Backpropagate ``dy`` through the layers in reverse; returns the gradient to the
        input, or None with ``need_dx=False`` (training needs only the parameters' gradients)."""
        for i in reversed(range(len(self.layers))):
            dy = self.layers[i].backward(dy, need_dx=need_dx or i > 0)
        return dy

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def to(self, device):
        device = resolve_device(device)
        for layer in self.layers:
            layer.to(device)
        self.device = device
        return self

    def config(self):
        return {"layers": [{"type": type(layer).__name__, "args": layer.config()} for layer in self.layers]}

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def summary(self, input_shape=None):
        """Print and return a table: each layer, its output shape (when the input shape is given
        or known from the last forward) and its parameter count, and the total."""
        shape = tuple(input_shape) if input_shape is not None else self._last_input_shape
        rows = [("layer", "output shape", "parameters")]
        if shape is not None:
            rows.append(("input", str(shape), ""))
        total = 0
        for layer in self.layers:
            if shape is not None:
                shape = layer.output_shape(shape)
            count = sum(p.size for p in layer.parameters())
            total += count
            rows.append((repr(layer), str(shape) if shape is not None else "?", f"{count:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        line = "-" * (sum(widths) + 4)
        out = [f"{rows[0][0]:<{widths[0]}}  {rows[0][1]:<{widths[1]}}  {rows[0][2]:>{widths[2]}}", line]
        out += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows[1:]]
        out += [line, f"total parameters: {total:,}"]
        text = "\n".join(out)
        print(text)
        return text

    # ------------------------------------------------------------------------ checkpoints

    def state_arrays(self):
        """The parameters as host arrays, named ``p0``, ``p1``, ... in ``parameters()`` order."""
        return {f"p{i}": to_numpy(p.data) for i, p in enumerate(self.parameters())}

    def load_state_arrays(self, arrays):
        params = self.parameters()
        for i, p in enumerate(params):
            name = f"p{i}"
            if name not in arrays:
                raise ValueError(f"checkpoint has no array {name} for parameter {i} of shape {p.shape}")
            a = np.asarray(arrays[name])
            if a.shape != p.shape:
                raise ValueError(f"checkpoint array {name} has shape {a.shape}, the model's parameter {p.shape}")
            p.data = to_device(np.ascontiguousarray(a, dtype=np.float32), self.device)

    def save(self, path, **metadata):
        """Write the architecture, the weights and ``metadata`` (JSON values) to ``path`` (.npz), atomically."""
        arrays = self.state_arrays()
        self.metadata = {**self.metadata, **metadata}
        meta = json.dumps({"format": CHECKPOINT_FORMAT, **self.config(), "metadata": self.metadata})
        atomic_write(path, lambda f: np.savez(f, __model__=np.array(meta), **arrays))

    @classmethod
    def from_config(cls, config):
        layers = []
        for item in config["layers"]:
            if item.get("type") not in LAYERS:
                raise ValueError(f"unknown layer type {item.get('type')!r} in the checkpoint")
            layers.append(LAYERS[item["type"]](**item["args"]))
        return cls(layers)

    @classmethod
    def load(cls, path, device="cpu"):
        """A model rebuilt from a file written by ``save``, on ``device``."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as data:
                meta = json.loads(str(data["__model__"]))
                arrays = {k: data[k] for k in data.files if k != "__model__"}
        except FileNotFoundError:
            raise FileNotFoundError(f"no checkpoint at {path}") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not an nbcnn checkpoint ({type(exc).__name__}: {exc})") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        model = cls.from_config(meta)
        model.load_state_arrays(arrays)
        model.metadata = meta.get("metadata", {})
        return model.to(device)
