"""Worker processes on this machine, for ``strategy.role=local``: started with the run, ended with it, and
started again when one ends before it has joined."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cifar_pl.errors import ConfigurationError
from cifar_pl.parameter_server.protocol import SECRET_ENV

log = logging.getLogger(__name__)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class LocalWorkers:
    """``count`` worker processes running ``python -m cifar_pl.parameter_server.worker``.

    They stop by themselves when the server says training is done, when its connection drops, or when
    this process disappears (each worker watches its parent); ``stop`` ends any that are left. The run's
    shared secret reaches them through their environment, never their command line (which any local user
    can read in ``ps``).
    """

    MAX_RESTARTS = 2  # per worker, for one that ends before it has joined

    def __init__(
        self,
        count: int,
        spec: Path,
        address: str,
        log_dir: Path,
        threads: int,
        secret: bytes | None = None,
        slowdown: list[float] | None = None,
    ) -> None:
        self.count, self.spec, self.address, self.log_dir, self.threads = count, spec, address, log_dir, threads
        # worker local-i takes slowdown[i] times as long per assignment (an experiment tool: stragglers on demand)
        self.slowdown = {f"local-{i}": factor for i, factor in enumerate(slowdown or []) if factor != 1.0}
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        if secret is not None:
            self.env[SECRET_ENV] = secret.decode()
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[str]] = {}  # name -> how each earlier start of it ended
        self.given_up: set[str] = set()

    def command(self, name: str) -> list[str]:
        """The command line of worker ``name`` (it holds no secret)."""
        return [
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
            *(["--slowdown", str(self.slowdown[name])] if name in self.slowdown else []),
        ]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _launch(self, name: str) -> None:
        with open(self.log_path(name), "ab") as output:
            self.processes[name] = subprocess.Popen(
                self.command(name), stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=self.env
            )

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            self._launch(f"local-{i}")
        log.info("started %d local workers (logs in %s)", self.count, self.log_dir)

    def log_tail(self, name: str, lines: int = 6) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(empty log)"

    def look_after(self, joined: set[str], needed: int) -> None:
        """Start again, at most ``MAX_RESTARTS`` times each, the workers that ended without being among
        ``joined`` (the names of the workers connected now), with the reason logged. Raises a
        ``ConfigurationError`` with the tail of the worker's log once too few are left to reach ``needed``."""
        for name, process in self.processes.items():
            code = process.poll()
            if code is None or name in joined or name in self.given_up:
                continue
            ended = self.restarts.setdefault(name, [])
            ended.append(describe_exit(code))
            if len(ended) <= self.MAX_RESTARTS:
                log.warning(
                    "local worker %s ended before joining the parameter server (%s); starting it again (%d of %d). "
                    "Its log ends: %s",
                    name,
                    ended[-1],
                    len(ended),
                    self.MAX_RESTARTS,
                    self.log_tail(name),
                )
                self._launch(name)
                continue
            self.given_up.add(name)
            left = self.count - len(self.given_up)
            if left < needed:
                raise ConfigurationError(
                    f"local worker {name} ended before joining the parameter server {len(ended)} times "
                    f"({', '.join(ended)}), so only {left} of the {needed} workers needed can still join. The end "
                    f"of its log ({self.log_path(name)}): {self.log_tail(name)}"
                )
            log.warning(
                "local worker %s ended before joining %d times (%s); going on without it (%d workers left)",
                name,
                len(ended),
                ", ".join(ended),
                left,
            )

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
