"""Checkpoints are written atomically: a failed write leaves the previous checkpoint whole, and the temporary
file of a writer killed outright is removed when the next run starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cifar_pl.checkpointing import AtomicCheckpointIO
from cifar_pl.files import remove_stale_temporaries
from tests.helpers import REPO, compose_config


class Unsaveable:
    def __reduce__(self):
        raise RuntimeError("the disk is full")  # fails halfway through serialisation


def test_a_checkpoint_replaces_the_previous_one_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk is full"):
        io.save_checkpoint({"step": 2, "x": Unsaveable()}, path)

    def crash(*args):  # the process dies between writing the temporary file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 3, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_the_trainer_saves_through_it(tmp_path):
    from cifar_pl.training import build_trainer

    cfg = compose_config(tmp_path)
    assert isinstance(build_trainer(cfg, [], False).strategy.checkpoint_io, AtomicCheckpointIO)


def test_a_writer_killed_outright_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    """SIGKILL between writing the temporary file and renaming it: no finally runs, so the temporary stays;
    remove_stale_temporaries (called as train.py starts) removes it once its writer is gone and it is old,
    and leaves everything else alone."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "from cifar_pl import files\n"
            "def stall(descriptor):\n"  # the data is written; the rename would come next
            "    print('written', flush=True); time.sleep(60)\n"
            "files.os.fsync = stall\n"
            f"files.write_atomically({str(target)!r}, b'x' * 1000)\n",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    leftover = tmp_path / f".last.ckpt.{writer.pid}.tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover.name, "last.ckpt"]
    assert target.read_bytes() == b"the previous checkpoint"

    live = tmp_path / f".metrics.json.{os.getpid()}.tmp"  # a writer still at work (this process)
    live.write_bytes(b"")
    other = tmp_path / ".notes.tmp"  # not named as ours
    other.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [], "a fresh temporary may belong to a writer on another machine"
    an_hour_ago = time.time() - 3600
    for path in (leftover, live, other):
        os.utime(path, (an_hour_ago, an_hour_ago))
    assert remove_stale_temporaries(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "last.ckpt"])


class OneGpu:
    """torch.cuda as a machine with one GPU shows it (these tests run on CPU): each device's RNG state."""

    def __init__(self) -> None:
        self.states = {0: torch.full((16,), 7, dtype=torch.uint8)}

    def get_rng_state(self, device: int | str = "cuda") -> torch.Tensor:
        return self.states[0 if device == "cuda" else int(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str = "cuda") -> None:
        index = 0 if device == "cuda" else int(device)
        if index not in self.states:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        self.states[index] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.states[i].clone() for i in sorted(self.states)]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for index, state in enumerate(states):
            self.set_rng_state(state, index)


@pytest.fixture
def one_gpu(monkeypatch) -> OneGpu:
    gpu = OneGpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(gpu, name))
    return gpu


def test_exact_resume_saves_and_restores_this_process_s_gpu_random_state_only(one_gpu):
    from cifar_pl.callbacks import ExactResume

    saved = ExactResume().state_dict()
    assert torch.equal(saved["cuda"], one_gpu.states[0]), "one state: this process's device"
    # a checkpoint from a machine with two GPUs, in the format that saved every visible GPU's state
    first, second = torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    ExactResume().load_state_dict({"torch": torch.get_rng_state(), "cuda": [first, second]})
    assert torch.equal(one_gpu.states[0], first) and list(one_gpu.states) == [0]
    ExactResume().load_state_dict({**saved, "cuda": second})
    assert torch.equal(one_gpu.states[0], second)
