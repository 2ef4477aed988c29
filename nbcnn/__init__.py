"""nbcnn: Numba kernels for convolutional neural networks, on the CPU and on NVIDIA GPUs.

The raw kernels are in ``nbcnn.kernels``; ``nbcnn.layers``, ``nbcnn.Sequential``,
``nbcnn.losses`` and ``nbcnn.optim`` build and train networks on either device.
"""

import time

# When nbcnn was first imported: `nbcnn train` reports how long after this its first step ended
# (imports, the data, Numba's compilation or cache loads, the step itself).
STARTED = time.perf_counter()

__version__ = "0.1.0"

from nbcnn import layers, losses, optim  # noqa: E402  (usable as nbcnn.optim.SGD after import nbcnn)
from nbcnn.device import Device, resolve_device, to_device, to_numpy  # noqa: E402
from nbcnn.model import Sequential  # noqa: E402
from nbcnn.step import Trainer  # noqa: E402

__all__ = ["Device", "Sequential", "Trainer", "layers", "losses", "optim", "resolve_device", "to_device", "to_numpy",
           "__version__"]
