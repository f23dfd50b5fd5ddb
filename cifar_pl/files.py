"""Files written whole or not at all: to a temporary file beside the target, flushed to disk, then renamed
over it. A crash at any moment leaves the previous file or the new one, never a torn one; a reader never
sees half a file. Checkpoints, metrics.json and the parameter server's reports all go through here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomically(path: Path | str, data: bytes | memoryview) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, payload: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(payload, indent=2) + "\n").encode())
