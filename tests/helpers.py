"""Test helpers: writers for the genuine on-disk dataset formats, config composition, and subprocesses."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A small synthetic dataset: enough to train a few real steps in well under a second per epoch.
TINY_SYNTHETIC = [
    "data=synthetic",
    "data.options.train_size=512",
    "data.options.test_size=256",
    "data.val_size=128",
    "data.eval_batch_size=128",
]


# --- genuine on-disk formats -------------------------------------------------------------------------


def cifar_records(count: int, label_bytes: int, num_classes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """``count`` CIFAR binary records: ``label_bytes`` label bytes (the last is the class) then 3072
    channel-major pixels. Returns the bytes, the images ``[N, 3, 32, 32]`` and the class labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count, dtype=np.uint8)
    records = np.empty((count, label_bytes + 3072), dtype=np.uint8)
    if label_bytes == 2:
        records[:, 0] = labels // 5  # coarse label (CIFAR-100 has 20 superclasses of 5)
    records[:, label_bytes - 1] = labels
    records[:, label_bytes:] = images.reshape(count, -1)
    return records.tobytes(), images, labels.astype(np.int64)


def write_cifar10(root: Path, per_file: int = 20, test_count: int = 30) -> dict[str, np.ndarray]:
    """Write ``cifar-10-batches-bin/`` as in the official binary archive; returns what was written."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for i in range(1, 6):
        raw, images, labels = cifar_records(per_file, 1, 10, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        train_images.append(images)
        train_labels.append(labels)
    raw, test_images, test_labels = cifar_records(test_count, 1, 10, seed=99)
    (folder / "test_batch.bin").write_bytes(raw)
    (folder / "batches.meta.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n")
    return {
        "train_images": np.concatenate(train_images),
        "train_labels": np.concatenate(train_labels),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), big-endian int32 dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, train: int = 40, test: int = 20, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[f"{prefix}_images"], written[f"{prefix}_labels"] = images, labels
    return written


# --- configs and runs ----------------------------------------------------------------------------------


def compose_config(tmp_path: Path, overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose a config the way ``train.py`` would, with every path under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def run_script(script: str, args: Sequence[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run one of the repository's entry points exactly as a user would, in ``cwd``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # callers assert on the status and show the output
    )


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


class InterruptAtEpoch(L.Callback):
    """Stands in for Ctrl-C at the start of epoch ``epoch``, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def tensorboard_hparams(log_dir: Path) -> list[dict[str, object]]:
    """The HParams sessions in the event files under ``log_dir`` (TensorBoard's own reader and protos):
    one dict of hyperparameter values per session."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        try:
            contents = acc.PluginTagToContent("hparams").values()
        except KeyError:  # a file without HParams, e.g. the test phase's
            continue
        for content in contents:
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams = data.session_start_info.hparams
                sessions.append(
                    {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()}
                )
    return sessions


# --- parameter server ---------------------------------------------------------------------------------


# Every process this test session starts inherits this variable (tests/conftest.py sets it before any test), so
# the checks below see only the session's own processes, never a training run or another suite running beside it.
SESSION_VARIABLE = "CIFAR_PL_TEST_SESSION"


def _live_processes() -> dict[int, tuple[bytes, int]]:
    """{pid: (command line, parent pid)} of every running (not zombie) process started by this test session."""
    marker = f"{SESSION_VARIABLE}={os.environ.get(SESSION_VARIABLE, '')}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (proc / "cmdline").read_bytes()
            fields = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            found[int(proc.name)] = (cmdline, int(fields[1]))
    return found


def worker_processes() -> list[int]:
    """PIDs of parameter-server worker processes this test session started that are still running."""
    return [pid for pid, (cmdline, _) in _live_processes().items() if b"cifar_pl.parameter_server.worker" in cmdline]


# what the project starts: train.py/evaluate.py, parameter-server workers, DDP ranks and benchmark helpers
_PROJECT_MARKERS = (
    b"train.py",
    b"evaluate.py",
    b"cifar_pl.parameter_server",
    b"multiprocessing.spawn",
    b"multiprocessing.forkserver",
    b"experiments/benchmark.py",
)


def project_processes() -> set[int]:
    """PIDs of this test session's children and of the project processes it started, still running."""
    me = os.getpid()
    return {
        pid
        for pid, (cmdline, parent) in _live_processes().items()
        if pid != me and (parent == me or any(m in cmdline for m in _PROJECT_MARKERS))
    }


class KillWorkerAt(L.Callback):
    """SIGKILLs local worker ``name`` a moment after round ``round`` of epoch ``epoch`` starts, i.e. while
    it is computing its share of that round."""

    def __init__(self, epoch: int, round: int, name: str = "local-1", delay: float = 0.02) -> None:
        self.epoch, self.round, self.name, self.delay = epoch, round, name, delay

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.round:
            import threading

            threading.Timer(self.delay, trainer.strategy.local_workers.kill, args=(self.name,)).start()


class SignalSelfAt(L.Callback):
    """Sends a real signal (SIGINT, SIGTERM, SIGKILL; ``SIGTERM+SIGINT``: both, in that order) as batch
    ``batch`` of epoch ``epoch`` starts (a round, on a parameter server), from rank 0 (``every_rank``: from
    every rank), ``times`` times, then waits ``pause`` seconds. ``target``: ``self`` (this process), ``group``
    (its process group, as Ctrl-C in a terminal does: start it in a session of its own; ``group=true`` says
    the same) or ``launcher`` (the process group of the process that started this one: a torchrun launcher,
    which passes the signal on to its workers)."""

    def __init__(
        self,
        epoch: int,
        batch: int,
        signal: str,
        group: bool = False,
        target: str = "self",
        every_rank: bool = False,
        times: int = 1,
        pause: float = 0.0,
    ) -> None:
        self.epoch, self.batch, self.signal = epoch, batch, signal
        self.target = "group" if group else target
        self.every_rank, self.times, self.pause = every_rank, times, pause

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch:
            return
        if trainer.global_rank == 0 or self.every_rank:
            import signal as signals
            import time

            for _ in range(self.times):
                for name in self.signal.split("+"):  # "SIGTERM+SIGINT": one after the other
                    number = getattr(signals, name)
                    if self.target == "group":
                        os.killpg(os.getpgid(0), number)
                    elif self.target == "launcher":
                        os.killpg(os.getpgid(os.getppid()), number)
                    else:
                        os.kill(os.getpid(), number)
            time.sleep(self.pause)


class SignalSelfDuring(L.Callback):
    """Sends this process a real signal once, as the first batch of ``phase`` (``validation`` in epoch
    ``epoch``, after the sanity check; or ``test``) starts."""

    def __init__(self, phase: str, signal: str, epoch: int = 0) -> None:
        self.phase, self.signal, self.epoch, self.sent = phase, signal, epoch, False

    def _send(self, trainer: L.Trainer, phase: str) -> None:
        in_epoch = phase == "test" or trainer.current_epoch == self.epoch
        if phase == self.phase and in_epoch and not self.sent and not trainer.sanity_checking:
            import signal as signals

            self.sent = True
            os.kill(os.getpid(), getattr(signals, self.signal))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._send(trainer, "validation")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._send(trainer, "test")


class RaiseAt(L.Callback):
    """A crash (RuntimeError) as batch ``batch`` of epoch ``epoch`` starts."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError(f"a crash in batch {batch_idx} of epoch {self.epoch}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boundary_frames(max_frame: int) -> list[bytes]:
    """Frames whose lengths sit just below, at and just above every cap: the handshake's frame cap, the
    round loop's (``max_frame``) and the JSON meta's, announced in a bare header (plus a few bytes) or sent
    whole. None of them may make a worker, nor make the server allocate what is announced."""
    from cifar_pl.parameter_server import protocol as wire

    header, hello = wire.HEADER, wire.MessageType.HELLO
    frames = []
    for cap in (wire.HANDSHAKE_MAX_FRAME, max_frame):
        for length in (cap - 1, cap, cap + 1):
            for kind in (hello, wire.MessageType.GRADS):
                frames.append(header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, kind, 0, length) + bytes(100))
    for meta_length in (wire.MAX_META - 1, wire.MAX_META, wire.MAX_META + 1):  # whole frames
        meta = b'{"protocol": %d, "nonce": "%s", "tensors": []}' % (wire.PROTOCOL_VERSION, b"00" * 32)
        meta += b" " * (meta_length - len(meta))
        body = meta_length.to_bytes(4, "big") + meta
        frames.append(header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, hello, 0, len(body)) + body)
    return frames


def malformed_frames(count: int, seed: int, max_frame: int = 256 * 1024 * 1024) -> list[bytes]:
    """A seeded corpus of frames a parameter server must refuse: ``boundary_frames(max_frame)`` first, then
    garbage, mutated and truncated valid frames, lying length prefixes, wrong versions and types, malformed
    JSON and tensor descriptors."""
    import random

    import torch

    from cifar_pl.parameter_server import protocol as wire

    rng = random.Random(seed)
    hello = b"".join(
        bytes(p) for p in wire.encode(wire.Message(wire.MessageType.HELLO, {"name": "fuzz", "nonce": "00" * 32}))
    )
    grads = b"".join(
        bytes(p) for p in wire.encode(wire.Message(wire.MessageType.GRADS, {"round": 1}, [torch.ones(64)]))
    )
    header = wire.HEADER

    def payload_frame(meta: bytes, tail: bytes = b"", kind: int = wire.MessageType.HELLO) -> bytes:
        body = len(meta).to_bytes(4, "big") + meta + tail
        return header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, kind, 0, len(body)) + body

    makers = [
        lambda: rng.randbytes(rng.randint(1, 300)),
        lambda: bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in rng.choice([hello, grads])),
        lambda: rng.choice([hello, grads])[: rng.randint(1, len(hello) - 1)],
        lambda: header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.MessageType.HELLO, 0, rng.randint(2**31, 2**63)),
        lambda: header.pack(wire.MAGIC, rng.choice([0, 2, 9, 255]), wire.MessageType.HELLO, 0, 8) + bytes(8),
        lambda: header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, rng.choice([0, 13, 99, 255]), 0, 8) + bytes(8),
        lambda: (
            header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.MessageType.HELLO, rng.randint(1, 65535), 8) + bytes(8)
        ),
        lambda: header.pack(rng.randbytes(4), wire.PROTOCOL_VERSION, wire.MessageType.HELLO, 0, 8) + bytes(8),
        lambda: payload_frame(rng.randbytes(rng.randint(0, 200))),
        lambda: payload_frame(b'{"tensors": [{"dtype": "object", "shape": [1]}]}', bytes(8)),
        lambda: payload_frame(b'{"tensors": [{"dtype": "float32", "shape": [1099511627776]}]}'),
        lambda: payload_frame(b"[" * 5000 + b"]" * 5000),
        lambda: payload_frame(
            b'{"tensors": []}', kind=rng.choice([wire.MessageType.GRADS, wire.MessageType.AUTH, wire.MessageType.DONE])
        ),
        lambda: (2**32 - 1).to_bytes(4, "big").join([header.pack(wire.MAGIC, wire.PROTOCOL_VERSION, 1, 0, 100), b""]),
    ]
    boundaries = boundary_frames(max_frame)[:count]
    return boundaries + [rng.choice(makers)() for _ in range(count - len(boundaries))]


def fire_frames(host: str, port: int, count: int, seed: int) -> int:
    """Send each malformed frame on its own connection (run in a separate process, like an attacker);
    returns how many were sent."""
    import socket

    sent = 0
    for frame in malformed_frames(count, seed):
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(frame)
        except OSError:
            pass  # the server may already have closed on us: that is the point
        sent += 1
    return sent
