"""Measurement: what nbcnn's kernels and steps cost, and how that compares with PyTorch.

``profile``: the training step timed kernel by kernel (``nbcnn profile``) and the machine's
measured peak; ``static``: the CUDA kernels' machine code, compiled without a GPU (``nbcnn
profile --static``); ``bench``: the benchmark suite (``nbcnn bench``); ``stepbench``: the loop a
PyTorch user writes, timed in fresh processes; ``peer``: an nbcnn network as its PyTorch peer.
Nothing in the rest of nbcnn imports this package.
"""
