"""Checkpoints are written atomically: a failed write leaves the previous checkpoint whole."""

from __future__ import annotations

import os

import pytest
import torch

from cifar_pl.checkpointing import AtomicCheckpointIO
from tests.helpers import compose_config


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
