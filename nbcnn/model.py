"""Sequential: layers applied in order, backpropagated in reverse, planned together.

A ``Sequential`` bound to a device owns everything its step needs. Its parameters live in
one ``ParameterBuffer`` (one flat vector of values, one of gradients). The first forward
of an input shape makes a ``ModelPlan``: every layer's plan for the shape its
predecessor outputs, checked once, with each ReLU fused into its neighbours (the layer
before applies max(., 0) in its own forward; the layer after multiplies its dx by the
mask in its own backward), and a first Conv2D computing the 2x2 max pooling after it (its own
output never stored; see ``nbcnn.kernels.conv2d.pooled``), all decided by ``layers.fuse``; then
the buffers: activations, input gradients, scratch. Later steps of that shape only run kernels on them.

    x --> [Conv2D+ReLU+MaxPool2D] --> [Conv2D+ReLU] --> [MaxPool2D] --> ... --> [Dense] --> logits
          [Conv2D via argmax] <-- [Conv2D] <-- [MaxPool2D, ReLU mask] <-- ... <-- [Dense] <-- dlogits

A model keeps the plans of a few input shapes (a training batch, the last smaller batch of
an epoch, an evaluation batch), so alternating between them allocates nothing; they are
freed with the model, or when it moves to another device.
"""

import json
import os
import tempfile

import numpy as np

from nbcnn import ops
from nbcnn.errors import describe
from nbcnn.device import CPU, resolve_device, to_device, to_numpy
from nbcnn.layers import LAYERS, Layer, Plan, Residual, fuse
from nbcnn.parameter import Parameter, ParameterBuffer

CHECKPOINT_FORMAT = "nbcnn-sequential-1"


class WriteError(OSError):
    """A file could not be written (a full disk, a folder that is not writable); the previous
    version of the file, if any, is intact."""

    def __str__(self):
        return self.strerror


def read_npz(path, what):
    """Every array of the .npz file at ``path``, read in full, as a dict; ``what`` names what the
    file should be ("an nbcnn checkpoint"). A missing file is a FileNotFoundError, anything else
    that stops the reading a ValueError in one line: a file cut or damaged anywhere makes zipfile,
    zlib or NumPy raise one of a dozen exception types (BadZipFile, EOFError, NotImplementedError
    for a flipped flag bit, RuntimeError for one that says "encrypted", ...), and each means the
    same to the user."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not {what}") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 (any failure to parse the bytes: see above)
        raise ValueError(f"{path} is not {what}, or is cut short ({describe(exc)})") from None


def _umask():
    """The process's file-creation mask, read without changing it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash or a full disk midway leaves the previous file intact, never half of a new one; a
    failure raises ``WriteError`` saying which file and why, in one line. The file gets the mode
    any new file of the user's gets (0666 less the umask), not the temporary file's 0600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, WriteError):
            raise
        reason = exc.strerror or str(exc)
        raise WriteError(exc.errno, f"could not write {path}: {reason}"
                                    + ("; the previous version is kept" if os.path.exists(path) else "")) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ModelPlan(Plan):
    """The plans of a model's layers for one input shape, fused and allocated; see the module docstring.

    ``spans``: a profiler (anything with ``span(layer, phase)``, a context manager) that labels
    each layer's forward and backward; None runs the plain loops. A ModelPlan is also the plan of
    a Sequential nested in another (it fuses nothing across its own edges).
    """

    relu = mask = False  # a nested Sequential takes over no ReLU across its own edges

    def __init__(self, model, in_shape, dtype, device, kernels=ops.REGISTRY, spans=None):
        self.in_shape, self.dtype, self.device = tuple(in_shape), np.dtype(dtype), device
        self.plans, shape = [], self.in_shape
        for layer in model.layers:
            plan = layer.plan(shape, dtype, device, kernels)
            self.plans.append(plan)
            shape = plan.out_shape
        self.out_shape = shape
        fuse(self.plans)
        for plan in self.plans:
            # Forward buffers now; input gradients and their scratch on the first backward, so that
            # a plan that only evaluates never holds them.
            plan.allocate(need_dx=False)
        self.names = [f"{i} {type(layer).__name__}" for i, layer in enumerate(model.layers)]
        self.spans = spans
        self.stamp = Parameter.rebinds
        self.ran = False

    @property
    def pooled(self):
        """Whether the first convolution computes the max pooling after it (``layers.fuse``)."""
        return bool(self.plans) and self.plans[0].pool is not None

    def allocate(self, need_dx):
        """Everything was allocated when the plan was made (the layers' own plans allocate lazily)."""

    def forward(self, x):
        if self.spans is not None:
            return self._forward_in_spans(x)
        for plan in self.plans:
            x = plan.forward(x)
        return x

    def backward(self, dy, need_dx):
        if self.spans is not None:
            return self._backward_in_spans(dy, need_dx)
        plans = self.plans
        for i in range(len(plans) - 1, -1, -1):
            dy = plans[i].backward(dy, need_dx or i > 0)
        return dy

    def _forward_in_spans(self, x):
        for name, plan in zip(self.names, self.plans):
            with self.spans.span(name, "forward"):
                x = plan.forward(x)
        return x

    def _backward_in_spans(self, dy, need_dx):
        for i in range(len(self.plans) - 1, -1, -1):
            with self.spans.span(self.names[i], "backward"):
                dy = self.plans[i].backward(dy, need_dx or i > 0)
        return dy


def _summary_rows(layers, shape, indent, rows):
    """Append a summary row per layer of ``layers`` (input ``shape``, or None), a residual block's
    paths indented under it; returns the output shape."""
    for layer in layers:
        out = None if shape is None else layer.output_shape(shape)
        count = sum(p.size for p in layer.parameters())
        if isinstance(layer, Residual):
            rows.append((indent + "Residual", str(out) if out is not None else "?", f"{count:,}"))
            for name, path in (("block", layer.block), ("shortcut", layer.shortcut)):
                if path is None:
                    rows.append((indent + "  shortcut: identity", "", ""))
                    continue
                rows.append((indent + f"  {name}:", "", ""))
                _summary_rows(path.layers, shape, indent + "    ", rows)
        else:
            buffers = layer.buffers()
            extra = f" (+ buffers {', '.join(buffers)})" if buffers else ""
            rows.append((indent + repr(layer), str(out) if out is not None else "?", f"{count:,}{extra}"))
        shape = out
    return shape


class Sequential(Layer):
    """A stack of layers: ``forward`` runs them in order, ``backward`` in reverse."""

    def __init__(self, layers):
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not an nbcnn layer")
        self.layers = layers
        self._device = CPU
        self.metadata = {}  # what save() stored beside the weights (normalization, ...)
        self.buffer = None
        self._pack()

    def _pack(self):
        """All parameters in one flat buffer on the model's device (a view each)."""
        params = self.parameters()
        self.buffer = ParameterBuffer(params, self.device) if params else None
        self._plans = self._current = None

    # --------------------------------------------------------------------------- the step

    def plan(self, in_shape, dtype=np.float32, device=None, kernels=ops.REGISTRY, spans=None):
        """A ``ModelPlan`` for inputs of ``in_shape``; ``kernels`` and ``spans`` let a profiler see every
        kernel and layer. ``forward`` makes (and keeps) the plans it needs itself."""
        return ModelPlan(self, in_shape, dtype, self.device if device is None else resolve_device(device), kernels,
                         spans)

    def _input_device(self, where):
        return self.device  # an input elsewhere is refused, whether the model has parameters or not

    def _plan_for(self, x):
        if self.buffer is not None and not self.buffer.current():
            self._pack()  # a parameter was given storage of its own (another dtype, say): gather them again
        return super()._plan_for(x)

    # ---------------------------------------------------------------------- the model

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def buffers(self):
        return {f"{i}.{name}": a for i, layer in enumerate(self.layers) for name, a in layer.buffers().items()}

    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def to(self, device):
        device = resolve_device(device)
        for layer in self.layers:
            layer.to(device)
        self._device = device
        self._pack()
        return self

    @property
    def device(self):
        """The ``Device`` the model's parameters and buffers live on."""
        return self._device

    def config(self):
        return {"layers": [{"type": type(layer).__name__, "args": layer.config()} for layer in self.layers]}

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def summary(self, input_shape=None):
        """Print and return a table: each layer, its output shape (when the input shape is given
        or known from the last forward), its parameter count and its buffers, and the totals."""
        if input_shape is not None:
            shape = tuple(input_shape)
        else:  # the last forward's, if there was one
            shape = self._current.in_shape if self._current is not None else None
        rows = [("layer", "output shape", "parameters")]
        if shape is not None:
            rows.append(("input", str(shape), ""))
        total = sum(p.size for p in self.parameters())
        buffered = sum(int(np.prod(a.shape)) for a in self.buffers().values())
        _summary_rows(self.layers, shape, "", rows)
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        line = "-" * (sum(widths) + 4)
        out = [f"{rows[0][0]:<{widths[0]}}  {rows[0][1]:<{widths[1]}}  {rows[0][2]:>{widths[2]}}", line]
        out += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows[1:]]
        out += [line, f"total parameters: {total:,}"]
        if buffered:
            out.append(f"total buffer values (not trained): {buffered:,}")
        text = "\n".join(out)
        print(text)
        return text

    # ------------------------------------------------------------------------ checkpoints

    def state_arrays(self):
        """The parameters as host arrays, named ``p0``, ``p1``, ... in ``parameters()`` order, and the
        buffers as ``b.<layer>.<name>``."""
        arrays = {f"p{i}": to_numpy(p.data) for i, p in enumerate(self.parameters())}
        arrays.update({f"b.{name}": to_numpy(a) for name, a in self.buffers().items()})
        return arrays

    def load_state_arrays(self, arrays):
        for i, p in enumerate(self.parameters()):
            name = f"p{i}"
            if name not in arrays:
                raise ValueError(f"checkpoint has no array {name} for parameter {i} of shape {p.shape}")
            a = np.asarray(arrays[name])
            if a.shape != p.shape:
                raise ValueError(f"checkpoint array {name} has shape {a.shape}, the model's parameter {p.shape}")
            p.data = to_device(np.ascontiguousarray(a, dtype=p.dtype), self.device)
        for name, buf in self.buffers().items():
            key = f"b.{name}"
            if key not in arrays:
                raise ValueError(f"checkpoint has no array {key} for the buffer {name} of shape {tuple(buf.shape)}")
            a = np.asarray(arrays[key])
            if a.shape != tuple(buf.shape):
                raise ValueError(f"checkpoint array {key} has shape {a.shape}, the model's buffer {tuple(buf.shape)}")
            from nbcnn.device import copy_into

            copy_into(buf, np.ascontiguousarray(a, dtype=buf.dtype))

    def save(self, path, **metadata):
        """Write the architecture, the mode, the weights, the buffers and ``metadata`` (JSON values) to
        ``path`` (.npz), atomically."""
        arrays = self.state_arrays()
        self.metadata = {**self.metadata, **metadata}
        meta = json.dumps({"format": CHECKPOINT_FORMAT, **self.config(), "training": self.training,
                           "metadata": self.metadata})
        atomic_write(path, lambda f: np.savez(f, __model__=np.array(meta), **arrays))

    @classmethod
    def from_config(cls, config):
        """The model ``config()`` describes (fresh weights); a ValueError naming what is wrong otherwise."""
        items = config.get("layers") if isinstance(config, dict) else None
        if not isinstance(items, list):
            raise ValueError("the model description has no list of layers")
        layers = []
        for i, item in enumerate(items):
            kind = item.get("type") if isinstance(item, dict) else None
            args = item.get("args", {}) if isinstance(item, dict) else None
            if not isinstance(args, dict):
                raise ValueError(f"layer {i} of the model description is not a {{type, args}} object")
            if kind == "Sequential":
                layers.append(cls.from_config(args))
                continue
            if kind not in LAYERS:
                raise ValueError(f"unknown layer type {kind!r} in the model description")
            if kind == "Residual":  # its two paths are model descriptions of their own
                if not isinstance(args.get("block"), dict) or set(args) - {"block", "shortcut"}:
                    raise ValueError(f"layer {i} (Residual) of the model description needs a block and no "
                                     f"arguments but block and shortcut")
                shortcut = args.get("shortcut")
                args = dict(block=cls.from_config(args["block"]),
                            shortcut=None if shortcut is None else cls.from_config(shortcut))
            try:
                layers.append(LAYERS[kind](**args))
            except TypeError as exc:  # arguments the layer does not take
                raise ValueError(f"layer {i} ({kind}) of the model description: {exc}") from None
        return cls(layers)

    @classmethod
    def load(cls, path, device="cpu"):
        """A model rebuilt from a file written by ``save``, on ``device``, in the mode it was saved in."""
        what = "an nbcnn checkpoint"
        try:
            arrays = read_npz(path, what)
        except FileNotFoundError:
            raise FileNotFoundError(f"no checkpoint at {path}") from None
        try:
            meta = json.loads(str(arrays.pop("__model__")))
            if not isinstance(meta, dict):
                raise ValueError("its description is not a JSON object")
        except (KeyError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not {what}, or is cut short ({describe(exc)})") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        model = cls.from_config(meta)
        model.load_state_arrays(arrays)
        model.metadata = meta.get("metadata", {})
        if not isinstance(model.metadata, dict):
            raise ValueError(f"{path}: its metadata is not a JSON object")
        model.train(meta.get("training", True))
        return model.to(device)
