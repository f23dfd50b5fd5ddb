"""A parameter-server worker: holds the dataset and a copy of the model, computes gradients for the
sample indices the server assigns, and never steps an optimizer of its own.

    python -m cifar_pl.parameter_server.worker --spec SPEC.json --address HOST:PORT [--name NAME]

The spec (written by ``ParameterServerStrategy`` for the workers it starts itself) names the
LightningModule and DataModule classes and their saved hyperparameters, so a worker builds exactly the
model and data of the run. Remote workers are started with ``python train.py ... strategy.role=worker``
instead, and build them from the same Hydra config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

import lightning as L
import torch

from cifar_pl.classifier import ImageClassifier
from cifar_pl.errors import ConfigurationError
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.compression import Compression, GradientEncoder
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.parameter_server.server import parse_address

log = logging.getLogger(__name__)

EXIT_DONE, EXIT_FAILED = 0, 1


@dataclass
class WorkerSettings:
    address: str
    name: str = ""
    secret: bytes | None = None
    connect_timeout: float = 120.0  # keep trying to reach the server for this long
    reconnect_timeout: float = 60.0  # after losing the server (it may be restarting), look for it this long
    backoff_base: float = 0.1  # the first wait before trying again; doubles with every failed try
    backoff_max: float = 10.0  # the longest wait between tries
    idle_timeout: float = 1800.0  # the longest the server may stay silent (it validates between epochs)
    frame_timeout: float = 60.0
    handshake_timeout: float = 30.0
    max_frame: int = 256 * 1024 * 1024
    slowdown: float = 1.0  # an experiment tool: each assignment takes this many times as long (by sleeping)


def data_fingerprint(datamodule: Any) -> dict[str, Any]:
    """What must match between server and workers for sample indices to mean the same images."""
    labels = datamodule.train_set.labels
    return {
        "dataset": datamodule.dataset,
        "train_samples": len(labels),
        "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16],
    }


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward-pass context for a Lightning precision string."""
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class Backoff:
    """Waits between tries that grow exponentially, with jitter: the n-th wait is drawn uniformly from
    ``[d/2, d]``, ``d = min(cap, base * 2**n)``. Workers that lost the server together (it restarted, or
    it cut them off) then come back spread out instead of all at once, and one that is refused again and
    again (struck out for bad gradients, turned away while the server is full) slows down."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.tries = base, cap, 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.tries)
        self.tries = min(self.tries + 1, 60)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.tries = 0


class Worker:
    """Serves gradients to one parameter server until it says training is done."""

    STABLE_AFTER = 30.0  # seconds served on one connection after which the backoff starts over

    def __init__(self, module: ImageClassifier, datamodule: Any, precision: str, settings: WorkerSettings) -> None:
        self.module = module
        self.datamodule = datamodule
        self.precision = precision
        self.settings = settings
        self.device = next(module.parameters()).device
        self.flat = FlatState(module)
        # how gradients are sent: the server says in WELCOME; topk's error-feedback residual lives here
        self.encoder = GradientEncoder(Compression(), self.flat.num_params)
        # fp16 needs loss scaling; bf16 and fp32 do not (a dynamic scale, as Lightning's 16-mixed uses)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision in ("16-mixed", "16") else None

    def hello(self) -> dict[str, Any]:
        return {
            "name": self.settings.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "signature": wire.model_signature(self.module),
            "data": data_fingerprint(self.datamodule),
        }

    def connect(self, deadline: float, backoff: Backoff) -> socket.socket:
        """Connect, trying again with backoff until ``deadline`` (monotonic): the server may not be up yet."""
        host, port = parse_address(self.settings.address)
        while True:
            try:
                timeout = min(10.0, max(deadline - time.monotonic(), 0.1))
                sock = socket.create_connection((host, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as error:
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"cannot reach the parameter server at {host}:{port} ({error}); is it running, and is "
                        f"strategy.address right?"
                    ) from None
                time.sleep(delay)

    def run(self) -> int:
        """Serve until the server says training is done. A server that goes away (a crash, a restart from its
        checkpoint) or cuts this worker off is looked for again for ``reconnect_timeout`` seconds, every try
        after a growing, jittered wait; a refusal (wrong secret, model or protocol version) is final."""
        s = self.settings
        backoff = Backoff(s.backoff_base, s.backoff_max)
        deadline = time.monotonic() + s.connect_timeout
        while True:
            sock = self.connect(deadline, backoff)
            joined: float | None = None
            try:
                welcome = wire.client_handshake(sock, self.hello(), s.secret, s.handshake_timeout)
                joined = time.monotonic()
                self.use_compression(Compression.from_meta(welcome.get("compression")))
                log.info(
                    "worker %s joined as worker-%s (gradients: %s)",
                    s.name,
                    welcome.get("worker_id"),
                    self.encoder.compression.method,
                )
                return self.serve(sock)
            except (wire.PeerClosed, wire.ReadTimeout, wire.WriteTimeout, ConnectionError) as error:
                if s.reconnect_timeout <= 0:
                    raise
                if joined is not None:  # it had joined: the server went away or cut it off
                    if time.monotonic() - joined >= self.STABLE_AFTER:
                        backoff.reset()
                    deadline = time.monotonic() + s.reconnect_timeout
                delay = backoff.next()
                if time.monotonic() + delay > deadline:
                    raise ConnectionError(
                        f"lost the parameter server at {s.address} ({error}) and could not join it again"
                    ) from None
                log.warning("worker %s lost the server (%s); trying again in %.1f s", s.name, error, delay)
                time.sleep(delay)
            finally:
                sock.close()

    def use_compression(self, compression: Compression) -> None:
        """Encode gradients as the server asks. Joining again under the same method keeps topk's residual
        (what was computed and not yet sent is still owed to the model); another method starts afresh."""
        if compression != self.encoder.compression:
            self.encoder = GradientEncoder(compression, self.flat.num_params)

    def serve(self, sock: socket.socket) -> int:
        s = self.settings
        reader = wire.FrameReader(s.max_frame)  # one receive buffer for the connection: handled before the next read
        sent_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        while True:
            message = reader.recv(sock, timeout=s.frame_timeout, idle_timeout=s.idle_timeout)
            if message.type == MessageType.PARAMS:
                params, floats, ints = message.tensors
                self.flat.load_params(params)
                sent_buffers = (floats.clone(), ints.clone())  # the frame's tensors are views on the buffer
            elif message.type == MessageType.ASSIGN:
                if sent_buffers is not None:
                    # every share starts from the BatchNorm statistics the server sent, also a second share at
                    # the same version (ssp ahead, a taken-over share), not from those the last one moved
                    self.flat.load_buffers(*sent_buffers)
                started = time.perf_counter()
                reply = self.compute(message)
                if s.slowdown > 1.0:
                    time.sleep((s.slowdown - 1.0) * (time.perf_counter() - started))
                wire.send_message(sock, reply, s.frame_timeout)
            elif message.type == MessageType.DONE:
                log.info("worker %s: the server finished (%s)", s.name, message.meta.get("reason", ""))
                return EXIT_DONE
            elif message.type == MessageType.ERROR:
                log.warning("worker %s: the server says: %s", s.name, message.meta.get("reason", ""))
            else:
                raise wire.BadFrame(f"unexpected {message.type.name} from the server")

    def _micro_batches(self, message: Message) -> Iterator[torch.Tensor]:
        """The assignment's micro-batches of sample indices, checked against the training set."""
        indices, sizes = message.tensors
        if indices.dtype != torch.int64 or sizes.dtype != torch.int64 or int(sizes.sum()) != len(indices):
            raise wire.BadFrame("ASSIGN holds malformed sample indices")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self.datamodule.train_set)):
            raise wire.BadFrame("ASSIGN names samples outside the training set")
        return iter(torch.split(indices, sizes.tolist()))

    def compute(self, message: Message) -> Message:
        """The gradient over the assigned micro-batches, accumulated exactly as Lightning accumulates: each
        micro-batch's mean loss divided by the server's ``divisor`` (``accumulate_grad_batches``, also for a
        share with fewer micro-batches), with the loss and accuracy sums and the BatchNorm statistics after
        them. The server adds the workers' gradients with weight 1 / planned workers, as DDP averages."""
        epoch, divisor = message.meta.get("epoch"), message.meta.get("divisor")
        if not (_is_count(epoch) and _is_count(divisor) and divisor >= 1):
            raise wire.BadFrame("ASSIGN needs an integer epoch and a divisor of at least 1")
        module, device = self.module, self.device
        micro_batches = list(self._micro_batches(message))
        module.train()
        for _ in range(8):  # fp16 only: retry with a smaller loss scale after an overflow
            module.zero_grad(set_to_none=True)
            samples, loss_sum, correct = 0, 0.0, 0
            for batch_indices in micro_batches:
                images, labels, idx = self.datamodule.train_set[batch_indices]
                x = self.datamodule.transform(images.to(device), idx.to(device), epoch, train=True)
                y = labels.to(device)
                with autocast_for(self.precision, device):
                    loss, hits = module.classification_loss(x, y)
                scaled = loss / divisor
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                samples += len(y)
                loss_sum += float(loss.detach()) * len(y)
                correct += int(hits)
            if self.scaler is None or self._unscale():
                break
        encoding, gradient = self.encoder.encode(self.flat.grads_flat())
        floats, ints = self.flat.buffers_flat()
        meta = {
            "round": message.meta["round"],
            "assignment": message.meta["assignment"],
            "samples": samples,
            "loss_sum": loss_sum,
            "correct": correct,
            **encoding,
        }
        return Message(MessageType.GRADS, meta, [*gradient, floats, ints])

    def _unscale(self) -> bool:
        """Divide the fp16 gradients by the loss scale; False (and a smaller scale) on overflow."""
        assert self.scaler is not None
        scale = self.scaler.get_scale()
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        finite = all(torch.isfinite(g).all() for g in grads)
        if finite:
            for g in grads:
                g.div_(scale)
        self.scaler.update(scale / 2 if not finite else None)
        return finite


def _import(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def build_from_spec(spec: dict[str, Any]) -> tuple[ImageClassifier, Any]:
    """The run's DataModule (set up) and LightningModule, built in the same order as train.py so that a
    worker's random state matches a single-process run's (dropout draws the same masks)."""
    L.seed_everything(spec["seed"], verbose=False)
    datamodule = _import(spec["datamodule"]["target"])(**spec["datamodule"]["hparams"])
    module = _import(spec["module"]["target"])(**spec["module"]["hparams"])
    if not isinstance(module, ImageClassifier):
        raise TypeError(f"the spec's module {spec['module']['target']} is not an ImageClassifier")
    datamodule.prepare_data()
    datamodule.setup("fit")
    device = torch.device(spec.get("device", "cpu"))
    return module.to(device), datamodule


def _exit_with_parent(parent_pid: int) -> None:
    """A worker the server started must not outlive it, even if the server was killed outright (then it
    cannot say goodbye, and a worker still connecting would otherwise retry until its timeout)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(EXIT_FAILED)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A parameter-server worker started by the server itself.")
    parser.add_argument("--spec", required=True, help="JSON written by ParameterServerStrategy")
    parser.add_argument("--address", required=True, help="HOST:PORT of the server")
    parser.add_argument("--name", default="", help="how the server's log names this worker")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--slowdown", type=float, default=1.0, help="take this many times as long per assignment")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
        # Ctrl-C in a terminal reaches the whole process group: the server finishes its round, saves and
        # then tells its workers to stop, so they must not quit under it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(args.spec) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec["threads"]))
    try:
        secret = wire.load_secret(spec.get("secret_file"))
        module, datamodule = build_from_spec(spec)
        settings = WorkerSettings(args.address, args.name, secret, slowdown=args.slowdown, **spec.get("timeouts", {}))
        return Worker(module, datamodule, spec["precision"], settings).run()
    except (wire.ProtocolError, ConnectionError, OSError, ConfigurationError) as error:
        log.error("worker %s stops: %s", args.name, error)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
