"""The model zoo: the networks ``nbcnn train --model`` knows, built for any input shape.

Each builder takes the input's channels, the number of classes and the image side, and
sizes the dense part from the layers' own ``output_shape``, so a zoo model fits any
image size it can take (and refuses clearly one it cannot).
"""

from nbcnn import layers as L
from nbcnn.model import Sequential


def _with_head(features, channels, size, head):
    """``features`` + Flatten + ``head(flattened size)``: the flattened size from the layers themselves."""
    shape = (1, channels, size, size)
    for layer in features:
        shape = layer.output_shape(shape)
    return Sequential(features + [L.Flatten()] + head(int(shape[1] * shape[2] * shape[3])))


def lenet(channels=1, classes=10, size=28):
    """The default: two convolution stages (5x5, 16 then 32 filters, ReLU, 2x2 max pooling),
    then a dense network 32*5*5 -> 128 -> classes (for 28x28 inputs)."""
    features = [L.Conv2D(channels, 16, 5, padding=2), L.ReLU(), L.MaxPool2D(2),
                L.Conv2D(16, 32, 5), L.ReLU(), L.MaxPool2D(2)]
    return _with_head(features, channels, size, lambda n: [L.Dense(n, 128), L.ReLU(), L.Dense(128, classes)])


def lenet5(channels=1, classes=10, size=28):
    """The classic LeNet-5 shape: conv 6 then 16 filters 5x5 with max pooling, dense 400 -> 120 -> 84 -> classes."""
    features = [L.Conv2D(channels, 6, 5, padding=2), L.ReLU(), L.MaxPool2D(2),
                L.Conv2D(6, 16, 5), L.ReLU(), L.MaxPool2D(2)]
    return _with_head(features, channels, size,
                      lambda n: [L.Dense(n, 120), L.ReLU(), L.Dense(120, 84), L.ReLU(), L.Dense(84, classes)])


def mnist_example(channels=1, classes=10, size=28):
    """PyTorch's examples/mnist network without dropout: conv 32, conv 64, max pool, dense 9216 -> 128 -> 10."""
    features = [L.Conv2D(channels, 32, 3), L.ReLU(), L.Conv2D(32, 64, 3), L.ReLU(), L.MaxPool2D(2)]
    return _with_head(features, channels, size, lambda n: [L.Dense(n, 128), L.ReLU(), L.Dense(128, classes)])


def tiny(channels=1, classes=10, size=28):
    """A small, fast network for tests and quick checks: one convolution stage and one dense layer."""
    features = [L.Conv2D(channels, 4, 3), L.ReLU(), L.MaxPool2D(2)]
    return _with_head(features, channels, size, lambda n: [L.Dense(n, classes)])


def bn(channels=1, classes=10, size=28):
    """Beyond the lecture: blocks of 3x3 convolution, batch normalisation and ReLU (the convolutions
    without a bias, which the normalisation's beta replaces): 32 filters, 2x2 max pooling, 64,
    pooling, 128, pooling, 128 again on what is left (3x3 for MNIST), then global average pooling,
    dropout and one dense layer. Any image of at least 8x8: global pooling makes the head
    independent of the size."""
    def block(cin, cout):
        return [L.Conv2D(cin, cout, 3, padding=1, bias=False), L.BatchNorm2D(cout), L.ReLU()]

    return Sequential(block(channels, 32) + [L.MaxPool2D(2)] + block(32, 64) + [L.MaxPool2D(2)] + block(64, 128)
                      + [L.MaxPool2D(2)] + block(128, 128) + [L.GlobalAvgPool2D(), L.Dropout(0.2), L.Dense(128, classes)])


def _basic_block(cin, cout, stride):
    """ResNet's basic block: two 3x3 convolutions with batch normalisation, added to the input (or to
    its projection, a strided 1x1 convolution, where the block changes the size or the channels),
    then a ReLU (which the residual join applies in its own pass)."""
    block = [L.Conv2D(cin, cout, 3, stride=stride, padding=1, bias=False), L.BatchNorm2D(cout), L.ReLU(),
             L.Conv2D(cout, cout, 3, padding=1, bias=False), L.BatchNorm2D(cout)]
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = [L.Conv2D(cin, cout, 1, stride=stride, bias=False), L.BatchNorm2D(cout)]
    return [L.Residual(block, shortcut), L.ReLU()]


def resnet(channels=1, classes=10, size=28, widths=(16, 32, 64), blocks=1):
    """A small ResNet (He et al. 2016, the CIFAR form): a 3x3 stem, three stages of ``blocks`` basic
    blocks with ``widths`` filters, the second and third starting at stride 2 with a projection
    shortcut (28x28 -> 14 -> 7; 32x32 -> 16 -> 8), then global average pooling and one dense layer.
    Any image of at least 4x4."""
    layers = [L.Conv2D(channels, widths[0], 3, padding=1, bias=False), L.BatchNorm2D(widths[0]), L.ReLU()]
    cin = widths[0]
    for stage, width in enumerate(widths):
        for i in range(blocks):
            layers += _basic_block(cin, width, 2 if stage > 0 and i == 0 else 1)
            cin = width
    return Sequential(layers + [L.GlobalAvgPool2D(), L.Dense(cin, classes)])


MODELS = {"lenet": lenet, "lenet5": lenet5, "mnist-example": mnist_example, "tiny": tiny, "bn": bn,
          "resnet": resnet}

# Each model's own training defaults, where they differ from nbcnn.train.BASE_DEFAULTS (what
# `nbcnn train --model NAME` uses when an option is not given).
DEFAULTS = {
    "bn": dict(epochs=12, batch_size=128, lr=1e-2, schedule="onecycle", optimizer="adamw", weight_decay=5e-4),
    "resnet": dict(epochs=12, batch_size=128, lr=1e-2, schedule="onecycle", optimizer="adamw", weight_decay=5e-4,
                   augment=True),
}
