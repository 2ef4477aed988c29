"""A few training steps of a small network on the CUDA path and on the CPU, from one seed,
give the same losses and weights (to float32 rounding)."""

import numpy as np
import pytest

import nbcnn
from nbcnn import layers as L
from nbcnn import ops
from nbcnn.losses import SoftmaxCrossEntropy
from nbcnn.optim import SGD, Adam


def run(device, make_optimizer, steps=3, batch=3):
    rng = np.random.default_rng(11)
    images = rng.standard_normal((steps * batch, 1, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 4, steps * batch).astype(np.int32)
    L.set_seed(0)
    model = nbcnn.Sequential([L.Conv2D(1, 2, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                              L.Dense(2 * 3 * 3, 4)]).to(device)
    optimizer = make_optimizer(model.parameters())
    loss_fn = SoftmaxCrossEntropy()
    x, y = nbcnn.to_device(images, device), nbcnn.to_device(labels, device)
    losses = []
    for step in range(steps):
        idx = nbcnn.to_device(np.arange(step * batch, (step + 1) * batch, dtype=np.int32), device)
        logits = model.forward(ops.gather_rows(x, idx))
        losses.append(loss_fn.forward(logits, ops.gather_rows(y, idx)))
        model.backward(loss_fn.backward(), need_dx=False)
        optimizer.step()
    return losses, [nbcnn.to_numpy(p.data) for p in model.parameters()]


@pytest.mark.parametrize("make_optimizer", [lambda p: Adam(p, lr=0.01), lambda p: SGD(p, lr=0.1, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_cuda_training_steps_match_cpu(make_optimizer):
    cpu_losses, cpu_params = run("cpu", make_optimizer)
    gpu_losses, gpu_params = run("cuda", make_optimizer)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5)
    for g, c in zip(gpu_params, cpu_params):
        np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-5)


def test_model_and_input_on_different_devices():
    model = nbcnn.Sequential([L.ReLU()]).to("cuda")
    with pytest.raises(ValueError, match="the input is on cpu but the model is on cuda"):
        model.forward(np.zeros((1, 2), np.float32))


def test_a_filter_too_large_for_the_gpu_kernels_is_refused_when_planned():
    # 64 x 31 x 31 taps: neither the implicit product's tap table nor the direct kernel's input
    # region fits in a block's 48 KiB of shared memory
    model = nbcnn.Sequential([L.Conv2D(64, 1, 31, stride=8)]).to("cuda")
    with pytest.raises(ValueError, match=r"a 31x31 filter at stride \(8, 8\) needs \d+ bytes of shared memory"):
        model.forward(nbcnn.to_device(np.zeros((1, 64, 64, 64), np.float32), "cuda"))


def test_a_large_filter_the_direct_kernel_could_not_stage_runs_as_a_product():
    """One channel, 31 x 31 at stride 8: too large for the direct kernel's shared memory, and what
    the implicit product takes (961 taps in its table); the same answer as the CPU."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 64, 64)).astype(np.float32)
    cpu = nbcnn.Sequential([L.Conv2D(1, 2, 31, stride=8)])
    want = cpu.forward(x)
    got = nbcnn.to_numpy(cpu.to("cuda").forward(nbcnn.to_device(x, "cuda")))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_predict_on_cuda_matches_cpu(tmp_path):
    from PIL import Image

    from nbcnn.predict import predict

    L.set_seed(2)
    model = nbcnn.Sequential([L.Conv2D(1, 2, 3, padding=1), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(18, 3)])
    model.save(tmp_path / "model.npz", mean=0.2, std=0.3, input_shape=[1, 6, 6])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(paths[-1])
    on_cpu, on_gpu = predict(tmp_path / "model.npz", paths, "cpu"), predict(tmp_path / "model.npz", paths, "cuda")
    for c, g in zip(on_cpu, on_gpu):
        assert c["class"] == g["class"]
        np.testing.assert_allclose(g["probabilities"], c["probabilities"], rtol=1e-5)


def run_bn(device, steps=3, batch=4):
    """A conv-BN-ReLU, dropout, global pooling network with AdamW and augmented batches, through the Trainer."""
    from nbcnn.step import Augment, Trainer

    rng = np.random.default_rng(12)
    images = rng.standard_normal((steps * batch, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, steps * batch).astype(np.int32)
    L.set_seed(1)
    model = nbcnn.Sequential([L.Conv2D(2, 3, 3, padding=1, bias=False), L.BatchNorm2D(3), L.ReLU(),
                              L.Dropout(0.3), L.GlobalAvgPool2D(), L.Dense(3, 3)]).to(device)
    trainer = Trainer(model, SoftmaxCrossEntropy(), nbcnn.optim.AdamW(model.parameters(), lr=0.01),
                      augment=Augment(1, flip=True, fill=-0.5, seed=4))
    x, y = nbcnn.to_device(images, device), nbcnn.to_device(labels, device)
    order = nbcnn.to_device(np.arange(steps * batch, dtype=np.int32), device)
    loss = trainer.run_epoch(x, y, order, batch)
    return loss, [nbcnn.to_numpy(p.data) for p in model.parameters()], {
        k: nbcnn.to_numpy(v) for k, v in model.buffers().items()}


def test_cuda_bn_dropout_augment_training_matches_cpu():
    cpu_loss, cpu_params, cpu_buffers = run_bn("cpu")
    gpu_loss, gpu_params, gpu_buffers = run_bn("cuda")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    for g, c in zip(gpu_params, cpu_params):
        np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-5)
    for name in cpu_buffers:
        np.testing.assert_allclose(gpu_buffers[name], cpu_buffers[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_gradient_sum_of_a_gpu_rank_goes_through_the_host():
    """A group of one (MPI's COMM_SELF): a GPU gradient is scaled and summed through a host copy,
    the path ranks take where CuPy's NCCL is missing or several ranks share a GPU."""
    MPI = pytest.importorskip("mpi4py.MPI")
    from nbcnn.distributed import Group

    group = Group(MPI.COMM_SELF)
    group.gpu_shared = True  # no NCCL
    values = np.arange(6, dtype=np.float32)
    grad = nbcnn.to_device(values.copy(), "cuda")
    group.sum_gradient_(grad, 0.25)
    np.testing.assert_array_equal(nbcnn.to_numpy(grad), values * np.float32(0.25))
    weights = nbcnn.to_device(values + 1, "cuda")
    group.broadcast_(weights)
    np.testing.assert_array_equal(nbcnn.to_numpy(weights), values + 1)


def run_residual(device, steps=2, batch=3):
    """A residual network (identity and projection shortcuts, the ReLUs fused around them, a LeakyReLU
    and a GELU) trained through the Trainer with label smoothing and gradient clipping."""
    from nbcnn.step import ClipGradNorm, Trainer

    rng = np.random.default_rng(13)
    images = rng.standard_normal((steps * batch, 2, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, steps * batch).astype(np.int32)
    L.set_seed(2)
    model = nbcnn.Sequential([
        L.Conv2D(2, 2, 3, padding=1), L.ReLU(),
        L.Residual([L.Conv2D(2, 2, 3, padding=1, bias=False), L.BatchNorm2D(2), L.LeakyReLU(0.1)]), L.ReLU(),
        L.Residual([L.Conv2D(2, 3, 3, stride=2, padding=1), L.GELU()], [L.Conv2D(2, 3, 1, stride=2)]),
        L.Tanh(), L.GlobalAvgPool2D(), L.Dense(3, 3), L.Sigmoid(), L.Dense(3, 3)]).to(device)
    clip = ClipGradNorm(0.05)  # small enough to clip every step
    trainer = Trainer(model, SoftmaxCrossEntropy(label_smoothing=0.1), SGD(model.parameters(), lr=0.5),
                      hooks=[clip])
    x, y = nbcnn.to_device(images, device), nbcnn.to_device(labels, device)
    order = nbcnn.to_device(np.arange(steps * batch, dtype=np.int32), device)
    loss = trainer.run_epoch(x, y, order, batch)
    return loss, clip.last_norm(), [nbcnn.to_numpy(p.data) for p in model.parameters()]


def test_cuda_residual_training_matches_cpu():
    cpu_loss, cpu_norm, cpu_params = run_residual("cpu")
    gpu_loss, gpu_norm, gpu_params = run_residual("cuda")
    assert cpu_norm > 0.05  # the clipping did something
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    assert gpu_norm == pytest.approx(cpu_norm, rel=1e-5)
    for g, c in zip(gpu_params, cpu_params):
        np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-5)
