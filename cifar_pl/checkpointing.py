"""Checkpoints written atomically: to a temporary file in the same folder, flushed to disk, then renamed
over the old one. A crash at any moment leaves either the previous checkpoint or the new one, never a
torn file. (Lightning's default writes to a temporary file in the system's temp folder and moves it; when
that folder is on another file system, e.g. a tmpfs /tmp, the move is a copy and is not atomic.)"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_pl.files import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` for local paths, with write-then-rename saves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options; got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file at all
        write_atomically(path, buffer.getbuffer())
