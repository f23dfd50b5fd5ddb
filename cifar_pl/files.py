"""Files written whole or not at all: to a temporary file beside the target, flushed to disk, then renamed
over it, and the folder flushed too (the rename itself reaches the disk only then). A crash at any moment
leaves the previous file or the new one, never a torn one; a reader never sees half a file. Checkpoints,
metrics.json, downloads and the parameter server's reports all go through here.

A process killed outright (SIGKILL, the OOM killer, a power cut) never reaches the clean-up of its
temporary file; ``remove_stale_temporaries`` removes such leftovers when the next run starts."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# .<target name>.<pid of the writer>.tmp: hidden, beside its target, and telling whose it is
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp$")


def temporary_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def replacing(path: Path | str) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: Path | str, data: bytes | memoryview) -> None:
    with replacing(path) as f:
        f.write(data)


def copy_atomically(source: Path | str, target: Path | str) -> None:
    with open(source, "rb") as src, replacing(target) as dst:
        shutil.copyfileobj(src, dst, length=2**20)


def write_json(path: Path | str, payload: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(payload, indent=2) + "\n").encode())


def _running_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, under another user
        return True
    return True


def remove_stale_temporaries(*folders: Path | str, min_age_s: float = 300.0) -> list[Path]:
    """Remove the temporary files that writers killed outright left in ``folders``: only files named as this
    module names them, whose writer is no longer running on this machine, untouched for ``min_age_s``
    (a writer on another machine sharing the folder is still running or long gone by then). Returns them."""
    removed = []
    now = time.time()
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # absent or unreadable: nothing of ours there
            continue
        for entry in entries:
            match = _TEMPORARY.match(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s
                if stale and not _running_here(int(match["pid"])):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:  # removed meanwhile, or not ours to remove
                continue
    return removed
