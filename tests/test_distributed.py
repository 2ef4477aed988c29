"""Data-parallel training under mpiexec: two ranks train the model one process trains."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nbcnn import cli
from nbcnn.train import Config, train
from tests.helpers import write_dataset

pytest.importorskip("mpi4py", reason="the mpi extra is not installed")
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec in this environment (pip install -e '.[mpi]')")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("quadrants"), n_train=200)  # 200 = 12 batches of 16 and one of 8


def mpirun(ranks, *args, script=None, timeout=240):
    """``mpiexec -n ranks`` of ``nbcnn`` (or of a script), one Numba thread per rank."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    command = [sys.executable, script] if script else [sys.executable, "-m", "nbcnn"]
    return subprocess.run([MPIEXEC, "-n", str(ranks), *command, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


TRAIN = ("train", "--device", "cpu", "--model", "tiny", "--batch-size", 16, "--lr", 0.01, "--seed", 3,
         "--no-progress")


def weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k != "__model__"}


def test_two_ranks_train_what_one_process_trains(data_dir, tmp_path):
    done = mpirun(2, *TRAIN, "--distributed", "--data-dir", data_dir, "--epochs", 1, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("epoch 1:") == 1  # rank 0 alone prints
    one = train(Config(device="cpu", data_dir=data_dir, model="tiny", epochs=1, batch_size=16, lr=0.01, seed=3,
                       out=str(tmp_path / "one"), progress=False), log=lambda *_: None)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two[0]["ranks"] == 2
    a, b = weights(tmp_path / "one" / "model.npz"), weights(tmp_path / "two" / "model.npz")
    assert a.keys() == b.keys()
    for name in a:  # 13 steps, the last over 8 rows: the same updates up to the order of additions
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert abs(100 * two[0]["test_accuracy"] - 100 * one[0]["test_accuracy"]) <= 0.3
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=1e-5)


def test_resume_with_another_number_of_ranks(data_dir, tmp_path):
    out = tmp_path / "run"
    assert mpirun(2, *TRAIN, "--distributed", "--data-dir", data_dir, "--epochs", 1, "--out", out).returncode == 0
    resumed = mpirun(3, *TRAIN, "--distributed", "--data-dir", data_dir, "--epochs", 2, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = train(Config(device="cpu", data_dir=data_dir, model="tiny", epochs=2, batch_size=16, lr=0.01, seed=3,
                         out=str(tmp_path / "whole"), progress=False), log=lambda *_: None)
    a, b = weights(tmp_path / "whole" / "model.npz"), weights(out / "model.npz")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2]
    assert whole[-1]["epoch"] == 2


def test_user_mistakes_exit_2_with_one_line(data_dir, tmp_path, capsys, monkeypatch):
    # alone: not launched by mpiexec
    assert cli.main([str(a) for a in (*TRAIN, "--distributed", "--data-dir", data_dir, "--out", tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this process is alone" in err[0] and "mpiexec -n R" in err[0]
    # more ranks than the global batch
    done = mpirun(3, *TRAIN, "--distributed", "--data-dir", data_dir, "--batch-size", 2, "--out", tmp_path / "r")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 ranks share a global batch of 2" in lines[0]
    # no mpi4py
    import builtins

    real_import = builtins.__import__

    def no_mpi(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi)
    assert cli.main([str(a) for a in (*TRAIN, "--distributed", "--data-dir", data_dir, "--out", tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[mpi]"' in err[0]


def test_a_rank_that_dies_ends_the_job_and_the_checkpoint_survives(data_dir, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text("""
import sys
from mpi4py import MPI
from nbcnn import cli
from nbcnn.step import Trainer

real_step, steps = Trainer.step, [0]

def step(self, xb, yb):  # rank 1 fails in the second epoch (13 steps an epoch)
    steps[0] += 1
    if MPI.COMM_WORLD.rank == 1 and steps[0] == 20:
        raise RuntimeError("rank 1 lost its GPU")
    real_step(self, xb, yb)

Trainer.step = step
sys.exit(cli.main(sys.argv[1:]))
""")
    out = tmp_path / "run"
    done = mpirun(2, *TRAIN, "--distributed", "--data-dir", data_dir, "--epochs", 3, "--out", out, script=script)
    assert done.returncode != 0
    assert "rank 1 lost its GPU" in done.stderr and "(rank 1 of 2; ending the job)" in done.stderr
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1]
    assert cli.main(["evaluate", "--checkpoint", str(out / "model.npz"), "--data-dir", data_dir, "--device", "cpu"]) == 0
