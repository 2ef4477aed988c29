"""Data-parallel training on MPI (mpi4py): every rank holds the model, each global minibatch is
split between the ranks, and after backward one allreduce gives every rank the gradient of the
whole batch, so every rank takes the same step.

    rank r of R, global batch rows [start, stop), b = stop - start:
        shard   rows [start + r*b // R, start + (r+1)*b // R)       (sizes differ by at most one)
        grad    the shard's mean-loss gradient, times n_r / b, summed over the ranks by allreduce
                = the gradient of the mean loss over the whole batch

So `mpiexec -n R nbcnn train --distributed --batch-size B` trains the model that `nbcnn train
--batch-size B` trains, up to the order of float additions. What differs by design: BatchNorm2D
normalises with each rank's shard statistics (as PyTorch's DistributedDataParallel without
SyncBatchNorm), and the dropout masks and augmentation draws are each rank's own.

On GPUs each rank takes one GPU (its rank among the ranks of its node), and the gradient is
summed by NCCL (CuPy's ``cupy.cuda.nccl``) on the device when CuPy is installed, else by MPI on a
host copy.
"""

import os

import numpy as np

from nbcnn.device import to_numpy


class DistributedError(ValueError):
    """--distributed cannot run as asked (no mpi4py, no mpiexec, too many ranks): a usage error."""


# The group of a run whose ranks have started working together. Before that, every rank checks
# the same things and fails the same way, so rank 0 alone reports and each exits; after it, a
# failure on one rank (a full disk on rank 0) must end the others, which would wait forever in
# the next collective: the CLI aborts the job through this group.
ACTIVE = None


def environment_rank():
    """This process's rank as the MPI launcher announced it (0 when not launched by one)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError('--distributed needs mpi4py and an MPI: pip install -e ".[mpi]", then launch with '
                               'mpiexec -n R nbcnn train --distributed ...') from None
    return MPI


def local_ranks(comm):
    """(this rank's index among the ranks on its own machine, how many there are)."""
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    return node.Get_rank(), node.Get_size()


class Group:
    """The ranks of one job and the collectives training needs; ``Group.world()`` joins MPI's."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._nccl = None
        self._host = None  # a host copy of the gradient, for the MPI path on a GPU
        self.gpu_shared = False  # more ranks than GPUs on this machine: NCCL cannot serve them

    @classmethod
    def world(cls):
        MPI = _mpi()
        group = cls(MPI.COMM_WORLD)
        if group.size == 1:
            raise DistributedError("--distributed: this process is alone; launch it with mpiexec -n R nbcnn train "
                                   "--distributed ... (R processes), or leave out --distributed")
        return group

    @property
    def is_root(self):
        return self.rank == 0

    def shard(self, start, stop):
        """The rows of [start, stop) this rank takes."""
        b = stop - start
        return start + self.rank * b // self.size, start + (self.rank + 1) * b // self.size

    def select_gpu_if_any(self):
        """Make this rank's GPU (its local rank, modulo the GPUs present) the current one."""
        from nbcnn.device import cuda_unavailable_reason

        if cuda_unavailable_reason() is not None:
            return
        from numba import cuda

        count = len(cuda.gpus)
        if count:
            index, ranks_here = local_ranks(self.comm)
            cuda.select_device(index % count)
            # NCCL wants one rank per GPU; ranks sharing one sum on the host instead (every rank must
            # choose alike, so the decision is the job's)
            self.gpu_shared = bool(self.comm.allreduce(ranks_here > count, op=_mpi().LOR))

    # --------------------------------------------------------------------- collectives

    def broadcast_(self, array):
        """Overwrite ``array`` (host or GPU) on every rank with rank 0's."""
        from nbcnn.device import copy_into

        host = np.ascontiguousarray(to_numpy(array))
        self.comm.Bcast(host, root=0)
        copy_into(array, host)

    def sum(self, values):
        """The element-wise sum over the ranks of a few host numbers (float64)."""
        from mpi4py import MPI

        values = np.ascontiguousarray(values, dtype=np.float64)
        out = np.empty_like(values)
        self.comm.Allreduce(values, out, op=MPI.SUM)
        return out

    def sum_gradient_(self, grad, scale):
        """grad = sum over ranks of scale_r * grad_r, in place (host or GPU array)."""
        from mpi4py import MPI

        if isinstance(grad, np.ndarray):
            if scale != 1.0:
                grad *= grad.dtype.type(scale)
            self.comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)
            return
        if self._nccl is None:
            self._nccl = (not self.gpu_shared and _Nccl.start(self)) or False
        if self._nccl:
            self._nccl.sum_(grad, scale)
            return
        from nbcnn.device import copy_into

        if self._host is None or self._host.shape != tuple(grad.shape):
            self._host = np.empty(tuple(grad.shape), grad.dtype)
        copy_into(self._host, grad)
        self._host *= self._host.dtype.type(scale)
        self.comm.Allreduce(MPI.IN_PLACE, self._host, op=MPI.SUM)
        copy_into(grad, self._host)

    def abort(self, code):
        self.comm.Abort(code)


class _Nccl:
    """The gradient sum on the GPUs through NCCL (CuPy), when CuPy is installed."""

    def __init__(self, comm, cp, nccl):
        self.comm, self.cp, self.nccl = comm, cp, nccl

    @classmethod
    def start(cls, group):
        """The NCCL communicator of the group, or None where any rank lacks CuPy (all ranks agree)."""
        try:
            import cupy as cp
            from cupy.cuda import nccl
            have = True
        except ImportError:
            have = False
        if not group.comm.allreduce(have, op=_mpi().LAND):
            return None
        uid = nccl.get_unique_id() if group.is_root else None
        uid = group.comm.bcast(uid, root=0)
        return cls(nccl.NcclCommunicator(group.size, uid, group.rank), cp, nccl)

    def sum_(self, grad, scale):
        cp = self.cp
        g = cp.asarray(grad)  # a view through __cuda_array_interface__, no copy
        if scale != 1.0:
            g *= g.dtype.type(scale)
        kind = self.nccl.NCCL_FLOAT32 if g.dtype == np.float32 else self.nccl.NCCL_FLOAT64
        # the default stream, where nbcnn's kernels run: the sum follows the backward in order
        self.comm.allReduce(g.data.ptr, g.data.ptr, g.size, kind, self.nccl.NCCL_SUM, 0)


def gradient_hook(group):
    """A Trainer hook: sum the gradient of the whole global batch over the ranks."""
    def hook(trainer):
        group.sum_gradient_(trainer.optimizer.buffer.grad, trainer.batch_share)
    return hook

