"""``nbcnn export``: a checkpoint as an ONNX model, to run anywhere ONNX runs.

The graph takes what a user has: float32 pixels in [0, 1], shape (N, C, H, W) with N free.
Its first two nodes are the checkpoint's normalisation, (x - mean) / std (one mean and std per
channel for colour data); then one ONNX
operator per layer, each the exact counterpart of nbcnn's:

    Conv2D      Conv (weights OIHW, symmetric pads, strides)
    ReLU        Relu
    MaxPool2D   MaxPool (padding never wins the maximum, as in nbcnn)
    AvgPool2D   AveragePool with count_include_pad=1 (padding counted as zeros, as in nbcnn)
    Flatten     Flatten(axis=1): C-order, the same as nbcnn's view
    Dense       Gemm with transB=1 (nbcnn's weight is (out, in))
    BatchNorm2D BatchNormalization with the running statistics (the evaluation form)
    Dropout     nothing (the identity in evaluation)
    GlobalAvgPool2D  GlobalAveragePool, then Flatten(axis=1)
    Residual    its block's nodes and its shortcut's (or none), both fed x, then Add
    LeakyReLU, Tanh, Sigmoid   LeakyRelu (alpha = negative_slope), Tanh, Sigmoid
    GELU        x * (1 + Erf(x / sqrt(2))) / 2 in four nodes (opset 17 has no Gelu)

The output is the logits, (N, classes). Needs the ``onnx`` extra (``pip install -e ".[onnx]"``).
"""

import os

import numpy as np

from nbcnn import layers as L
from nbcnn.model import Sequential, atomic_write

OPSET = 17
_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ValueError('export needs the onnx package: pip install -e ".[onnx]" (or pip install onnx)') from None
    return onnx


class _Graph:
    """Nodes and initializers appended in order; each value gets a fresh name."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.initializers, self.count = onnx, [], [], 0

    def const(self, name, array):
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, label, **attributes):
        self.count += 1
        out = f"{label}_{self.count}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out


def _pads(padding):
    return [padding[0], padding[1], padding[0], padding[1]]  # (top, left, bottom, right)


def _add_layer(graph, layer, x, to_numpy):
    """Append ``layer``'s node(s) after value ``x``; return the name of its output."""
    if isinstance(layer, Sequential):
        for inner in layer.layers:
            x = _add_layer(graph, inner, x, to_numpy)
        return x
    n = graph.count + 1
    if isinstance(layer, L.Conv2D):
        inputs = [x, graph.const(f"conv{n}.weight", to_numpy(layer.weight.data))]
        if layer.bias is not None:
            inputs.append(graph.const(f"conv{n}.bias", to_numpy(layer.bias.data)))
        return graph.node("Conv", inputs, "conv", kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                          pads=_pads(layer.padding))
    if isinstance(layer, L.ReLU):
        return graph.node("Relu", [x], "relu")
    if isinstance(layer, L.MaxPool2D):
        return graph.node("MaxPool", [x], "maxpool", kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                          pads=_pads(layer.padding))
    if isinstance(layer, L.AvgPool2D):
        return graph.node("AveragePool", [x], "avgpool", kernel_shape=list(layer.kernel_size),
                          strides=list(layer.stride), pads=_pads(layer.padding), count_include_pad=1)
    if isinstance(layer, L.Flatten):
        return graph.node("Flatten", [x], "flatten", axis=1)
    if isinstance(layer, L.Dense):
        bias = layer.bias.data if layer.bias is not None else np.zeros(layer.out_features, np.float32)
        inputs = [x, graph.const(f"dense{n}.weight", to_numpy(layer.weight.data)),
                  graph.const(f"dense{n}.bias", to_numpy(bias))]
        return graph.node("Gemm", inputs, "dense", transB=1)
    if isinstance(layer, L.BatchNorm2D):  # the evaluation form: the running statistics
        inputs = [x] + [graph.const(f"bn{n}.{name}", to_numpy(a).astype(np.float32))
                        for name, a in (("scale", layer.weight.data), ("bias", layer.bias.data),
                                        ("mean", layer.running_mean), ("var", layer.running_var))]
        return graph.node("BatchNormalization", inputs, "batchnorm", epsilon=layer.eps)
    if isinstance(layer, L.Dropout):  # the identity in evaluation
        return x
    if isinstance(layer, L.GlobalAvgPool2D):  # (N, C, 1, 1), then (N, C) as nbcnn's
        return graph.node("Flatten", [graph.node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    if isinstance(layer, L.Residual):  # the two paths from the same x, joined by an Add
        a = _add_layer(graph, layer.block, x, to_numpy)
        b = x if layer.shortcut is None else _add_layer(graph, layer.shortcut, x, to_numpy)
        return graph.node("Add", [a, b], "add")
    if isinstance(layer, L.LeakyReLU):
        return graph.node("LeakyRelu", [x], "leakyrelu", alpha=layer.negative_slope)
    if isinstance(layer, L.Tanh):
        return graph.node("Tanh", [x], "tanh")
    if isinstance(layer, L.Sigmoid):
        return graph.node("Sigmoid", [x], "sigmoid")
    if isinstance(layer, L.GELU):  # opset 17 has no Gelu (20 does): x * (1 + erf(x / sqrt(2))) / 2, as nbcnn's
        erf = graph.node("Erf", [graph.node("Mul", [x, graph.const(f"gelu{n}.scale", np.float32(_SQRT_HALF))],
                                            "gelu")], "gelu")
        one_plus = graph.node("Add", [erf, graph.const(f"gelu{n}.one", np.float32(1.0))], "gelu")
        half_x = graph.node("Mul", [x, graph.const(f"gelu{n}.half", np.float32(0.5))], "gelu")
        return graph.node("Mul", [half_x, one_plus], "gelu")
    raise ValueError(f"cannot export layer {layer!r} to ONNX: no ONNX counterpart written for {type(layer).__name__}")


def to_onnx(model, input_shape, mean=0.0, std=1.0):
    """The ONNX ModelProto of ``model`` (evaluation form) for inputs (N, *input_shape) of pixels in
    [0, 1], normalised inside the graph as (x - mean) / std."""
    onnx = _require_onnx()
    from nbcnn.device import to_numpy

    helper, TensorProto = onnx.helper, onnx.TensorProto
    c, h, w = (int(d) for d in input_shape)
    out_shape = model.output_shape((1, c, h, w))
    if len(out_shape) != 2:
        raise ValueError(f"the model's output is {out_shape[1:]} per image, export expects logits (N, classes)")
    graph = _Graph(onnx)
    # one mean and std for every channel, or one per channel, broadcast over (N, C, H, W)
    mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    x = graph.node("Sub", ["pixels", graph.const("mean", mean)], "normalise")
    x = graph.node("Div", [x, graph.const("std", std)], "normalise")
    for layer in model.layers:
        x = _add_layer(graph, layer, x, to_numpy)
    graph.nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    g = helper.make_graph(
        graph.nodes, "nbcnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", int(out_shape[1])])],
        initializer=graph.initializers)
    proto = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", OPSET)],
                                          producer_name="nbcnn")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_checkpoint(checkpoint, output, log=print):
    """Write the ONNX form of the model in ``checkpoint`` to ``output``, atomically."""
    _require_onnx()
    from nbcnn.predict import channel_statistics, input_shape

    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a folder: give a file name, such as {os.path.join(output, 'model.onnx')}")
    model = Sequential.load(checkpoint).eval()
    meta = model.metadata
    shape = input_shape(model)
    mean, std = channel_statistics(meta, shape[0])
    proto = to_onnx(model, shape, mean, std)
    data = proto.SerializeToString()
    atomic_write(output, lambda f: f.write(data))
    log(f"{output}: ONNX opset {OPSET}, input pixels (N, {', '.join(map(str, shape))}) in [0, 1], "
        f"output logits (N, {model.output_shape((1,) + shape)[1]}); {len(proto.graph.node)} nodes, {len(data):,} bytes")
    return output
