"""Worker processes on this machine, for ``strategy.role=local``: started with the run, ended with it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class LocalWorkers:
    """``count`` worker processes running ``python -m cifar_pl.parameter_server.worker``.

    They stop by themselves when the server says training is done, when its connection drops, or when
    this process disappears (each worker watches its parent); ``stop`` ends any that are left.
    """

    def __init__(self, count: int, spec: Path, address: str, log_dir: Path, threads: int) -> None:
        self.count, self.spec, self.address, self.log_dir, self.threads = count, spec, address, log_dir, threads
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        for i in range(self.count):
            name = f"local-{i}"
            with open(self.log_dir / f"{name}.log", "ab") as output:
                self.processes[name] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cifar_pl.parameter_server.worker",
                        "--spec",
                        str(self.spec),
                        "--address",
                        self.address,
                        "--name",
                        name,
                        "--parent-pid",
                        str(os.getpid()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        log.info("started %d local workers (logs in %s)", self.count, self.log_dir)

    def kill(self, name: str) -> None:
        """End one worker abruptly (tests and demonstrations of worker failure)."""
        self.processes[name].kill()

    def stop(self, grace: float = 10.0) -> dict[str, int | None]:
        """Wait up to ``grace`` seconds for the workers to finish, then terminate and kill the rest."""
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=3.0)
        return {name: p.returncode for name, p in self.processes.items()}
