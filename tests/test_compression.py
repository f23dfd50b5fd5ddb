"""Gradient compression (``strategy.compression``): the codec on real frames, topk's error feedback, strict
refusal of malformed frames by a real server over real sockets, the bytes each method puts on the wire,
one run through train.py, and DDP's communication hooks on gloo."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_pl.ddp import register_comm_hook
from cifar_pl.errors import ConfigurationError
from cifar_pl.models import build_network
from cifar_pl.parameter_server import protocol as wire
from cifar_pl.parameter_server.compression import (
    Compression,
    GradientDecoder,
    GradientEncoder,
    fp16_scale,
    largest,
)
from cifar_pl.parameter_server.packing import FlatState
from cifar_pl.parameter_server.protocol import Message, MessageType
from cifar_pl.training import train
from tests import test_ps_server
from tests.helpers import TINY_SYNTHETIC, compose_config, tensorboard_scalars
from tests.test_ps_server import FakeWorker, answer_with, join, micro_batches

make_server = test_ps_server.make_server  # the fixture: a real ParameterServer on 127.0.0.1, stopped afterwards


def through_the_wire(meta: dict, tensors: list[torch.Tensor]) -> Message:
    """A GRADS frame encoded to bytes and decoded back, as the server's reader hands it over."""
    blob = b"".join(bytes(part) for part in wire.encode(Message(MessageType.GRADS, meta, tensors)))
    return wire.decode(blob[: wire.HEADER.size], bytearray(blob[wire.HEADER.size :]))


def round_trip(encoder: GradientEncoder, decoder: GradientDecoder, grad: torch.Tensor) -> torch.Tensor:
    meta, tensors = encoder.encode(grad)
    message = through_the_wire(meta, tensors)
    return decoder.decode(message.meta, message.tensors)[0]


# --- the codec on real frames --------------------------------------------------------------------------------


def test_topk_error_feedback_sends_every_part_of_every_gradient_eventually():
    """Over many steps, what was sent plus what the worker holds back is exactly the sum of the true
    gradients (integer-valued, so every float32 sum is exact); once gradients stop, the residual drains."""
    n, compression = 1000, Compression("topk", 0.03)
    encoder, decoder = GradientEncoder(compression, n), GradientDecoder(compression, n)
    generator = torch.Generator().manual_seed(0)
    true_sum, sent_sum = torch.zeros(n), torch.zeros(n)
    for _ in range(300):
        grad = torch.randint(-50, 51, (n,), generator=generator).float()
        true_sum += grad
        sent = round_trip(encoder, decoder, grad)
        assert int((sent != 0).sum()) <= compression.topk_count(n) == 30
        sent_sum += sent
        assert encoder.residual is not None
        assert torch.equal(sent_sum + encoder.residual, true_sum)
    assert not torch.equal(sent_sum, true_sum)  # a share was held back, not sent
    for _ in range(n // 30 + 1):  # nothing new: every held-back entry goes out in turn
        sent_sum += round_trip(encoder, decoder, torch.zeros(n))
    assert torch.equal(sent_sum, true_sum) and not encoder.residual.any()


def test_the_sampled_topk_picks_exactly_what_torch_topk_picks():
    generator = torch.Generator().manual_seed(2)
    magnitude = torch.randn(300_000, generator=generator).abs()
    assert torch.equal(largest(magnitude, 3000).sort().values, torch.topk(magnitude, 3000).indices.sort().values)
    ties = torch.randint(0, 4, (300_000,), generator=generator).float()  # a quarter of the entries tie at the top
    picked = largest(ties, 3000)
    assert picked.unique().numel() == 3000 and bool((ties[picked] == 3).all())


def test_a_non_finite_gradient_reaches_the_server_as_such_and_leaves_the_residual_as_it_was():
    n, compression = 100, Compression("topk", 0.05)
    encoder, decoder = GradientEncoder(compression, n), GradientDecoder(compression, n)
    round_trip(encoder, decoder, torch.arange(n, dtype=torch.float32))
    assert encoder.residual is not None
    held = encoder.residual.clone()
    poisoned = torch.ones(n)
    poisoned[7] = math.nan
    assert torch.isnan(round_trip(encoder, decoder, poisoned)).any()  # the server's NaN check then rejects it
    assert torch.equal(encoder.residual, held)


def test_bf16_and_fp16_round_trips_and_fp16_never_overflows():
    n = 4096
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1)) * 1e6  # past float16's 65504 unscaled
    grad[:4] = torch.tensor([3e6, -1e-1, 0.0, 7.0])
    bf16 = round_trip(GradientEncoder(Compression("bf16"), n), GradientDecoder(Compression("bf16"), n), grad)
    assert torch.equal(bf16, grad.to(torch.bfloat16).float())
    assert not torch.isfinite(grad.half()).all()  # what an unscaled cast would have sent
    fp16 = round_trip(GradientEncoder(Compression("fp16"), n), GradientDecoder(Compression("fp16"), n), grad)
    assert torch.isfinite(fp16).all()
    torch.testing.assert_close(fp16[grad.abs() > 1e3], grad[grad.abs() > 1e3], rtol=2**-10, atol=0)
    for peak in (1e-30, 3e-5, 1.0, 2.0**15, 65504.0, 1e30):
        scale = fp16_scale(torch.tensor([peak, -peak / 3]))
        assert math.frexp(scale)[0] == 0.5 and 2**14 <= peak * scale <= 2**15, peak


def _tiny_frames(compression: Compression, n: int) -> tuple[dict, list[torch.Tensor]]:
    return GradientEncoder(compression, n).encode(torch.arange(n, dtype=torch.float32) - n / 2)


TOPK = Compression("topk", 0.25)  # of 15 parameters here, 4; of the tiny server model's 21, 6


def malformed_topk(kind: str, n: int = 15) -> tuple[dict, list[torch.Tensor]]:
    """A topk gradient for an ``n``-parameter model with one thing wrong."""
    meta, (indices, values) = _tiny_frames(TOPK, n)
    if kind == "out of range":
        indices[-1] = n
    elif kind == "negative":
        indices[0] = -1
    elif kind == "duplicate":
        indices[1] = indices[0]
    elif kind == "unsorted":
        indices = indices.flip(0)
    elif kind == "too few":
        indices, values = indices[:-1], values[:-1]
    elif kind == "too many":
        indices, values = torch.cat([indices, torch.tensor([0], dtype=torch.int32)]), torch.cat([values, values[:1]])
    elif kind == "counts differ":
        values = values[:-1]
    elif kind == "int64 indices":
        indices = indices.long()
    elif kind == "float indices":
        indices = indices.float()
    elif kind == "float16 values":
        values = values.half()
    elif kind == "2-d indices":
        indices = indices.reshape(2, 2)
    elif kind == "values missing":
        return meta, [indices]
    elif kind == "another method":
        meta = {"compression": "bf16"}
    elif kind == "no method":
        meta = {}
    return meta, [indices, values]


MALFORMATIONS = [
    "out of range",
    "negative",
    "duplicate",
    "unsorted",
    "too few",
    "too many",
    "counts differ",
    "int64 indices",
    "float indices",
    "float16 values",
    "2-d indices",
    "values missing",
    "another method",
    "no method",
]


@pytest.mark.parametrize("kind", MALFORMATIONS)
def test_every_malformed_topk_frame_is_refused_by_the_decoder(kind: str):
    meta, tensors = malformed_topk(kind)
    message = through_the_wire(meta, tensors)
    with pytest.raises(wire.BadFrame):
        GradientDecoder(TOPK, 15).decode(message.meta, message.tensors)
    good = through_the_wire(*_tiny_frames(TOPK, 15))  # the same frame unharmed decodes
    assert GradientDecoder(TOPK, 15).decode(good.meta, good.tensors)[0].count_nonzero() == 4


@pytest.mark.parametrize(
    "scale", [None, 0.0, -2.0, 3.0, "1", True, 2.0**200, math.inf, pytest.param(10**400, id="10**400")]
)
def test_an_fp16_frame_with_a_bad_scale_is_refused(scale):
    meta, tensors = _tiny_frames(Compression("fp16"), 15)
    meta = {**meta, "scale": scale} if scale is not None else {"compression": "fp16"}
    if isinstance(scale, int) and not isinstance(scale, bool):  # no frame carries it: the decoder alone
        message = Message(MessageType.GRADS, meta, tensors)
    else:
        message = through_the_wire(meta, tensors)
    with pytest.raises(wire.BadFrame, match="scale"):
        GradientDecoder(Compression("fp16"), 15).decode(message.meta, message.tensors)


@pytest.mark.parametrize("field", ["scale", "loss_sum", "samples"])
def test_a_huge_json_integer_cuts_its_sender_off_and_the_round_goes_on(make_server, field):
    """JSON allows 10**400; Python reads it as an int that float() and math.isfinite cannot take
    (OverflowError). The frame is refused as malformed, the sender cut off, its share handed on."""
    fp16 = Compression("fp16")
    server = make_server(compression=fp16)
    spoilt = encoded_answer(fp16)

    def huge(assign: Message, flat: FlatState) -> Message:
        reply = spoilt(assign, flat)
        reply.meta[field] = 10**400
        return reply

    good = FakeWorker(server.address, encoded_answer(fp16), name="good")
    bad = FakeWorker(server.address, huge, name="bad")
    join(server, good, bad)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.samples == 64 and len(result.workers) == 1 and "good" in result.workers[0]
    assert [c.name for c in server.live_workers] == result.workers
    assert server.accounting.report()[0]["every_sample_exactly_once"]
    with pytest.raises(wire.BadFrame, match="beyond the 64 bits"):
        through_the_wire({field: 10**400}, [])


# --- a real server over real sockets ------------------------------------------------------------------------


def encoded_answer(compression: Compression, value: float = 1.0, spoil: str | None = None):
    """As ``answer_with(value)``, but entry i of the gradient times i + 1 (no ties: topk sends the last
    entries), encoded by the real encoder (a fresh one each time, so every topk answer sends the same
    entries), or spoilt."""
    plain = answer_with(value)

    def answer(assign: Message, flat: FlatState) -> Message:
        reply = plain(assign, flat)
        reply.tensors[0] = reply.tensors[0] * torch.arange(1, flat.num_params + 1)
        if spoil is not None:
            meta, gradient = malformed_topk(spoil, flat.num_params)
        else:
            meta, gradient = GradientEncoder(compression, flat.num_params).encode(reply.tensors[0])
        reply.meta.update(meta)
        reply.tensors = [*gradient, *reply.tensors[1:]]
        return reply

    return answer


@pytest.mark.parametrize("spoil", ["out of range", "duplicate", "too many", "int64 indices"])
def test_a_server_refuses_malformed_topk_frames_and_the_round_uses_only_good_gradients(make_server, spoil):
    server = make_server(compression=TOPK)
    good = FakeWorker(server.address, encoded_answer(TOPK), name="good")
    bad = FakeWorker(server.address, encoded_answer(TOPK, spoil=spoil), name="bad")
    join(server, good, bad)
    result = server.run_round(0, micro_batches(8), version=0)
    assert result.samples == 64 and result.workers == [c.name for c in server.live_workers if "good" in c.name]
    assert result.gradient.nonzero().flatten().tolist() == list(range(15, 21))  # the good worker's top 6
    assert any(e["event"] == "rejected contribution" and "malformed gradient" in e["reason"] for e in server.events)
    deadline = time.monotonic() + 5  # the refusal reaches the worker's thread after the round may have ended
    while not bad.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any("malformed gradient" in reason for reason in bad.errors)
    assert server.accounting.report()[0]["every_sample_exactly_once"]


def test_bytes_from_workers_halve_with_bf16_and_topk_sends_under_a_tenth(make_server):
    """The project's CNN (104,362 parameters), two workers, the server's own byte counters."""
    module = build_network("cnn", 3, 10)
    received = {}
    for method in ("none", "bf16", "fp16", "topk"):
        compression = Compression(method)  # topk_ratio: the default 0.01
        server = make_server(module, compression=compression, max_frame=2**22)
        workers = [FakeWorker(server.address, encoded_answer(compression), module=module) for _ in range(2)]
        join(server, *workers)
        sent_before = server.bytes_to_workers
        result = server.run_round(0, micro_batches(8), version=0)
        assert result.samples == 64 and torch.isfinite(result.gradient).all()
        received[method] = server.bytes_from_workers
        assert server.bytes_to_workers - sent_before > 2 * 4 * FlatState(module).num_params  # float32 parameters
        server.stop("measured")
    assert 0.49 < received["bf16"] / received["none"] < 0.52
    assert 0.49 < received["fp16"] / received["none"] < 0.52
    assert received["topk"] < received["none"] / 10


# --- through train.py ------------------------------------------------------------------------------------------


def test_a_bf16_run_reports_its_bytes_per_round_and_its_model_stays_finite(tmp_path: Path):
    """In async mode, whose contributions take another path through the server than sync's rounds (which the
    real-server test above covers): the codec sits where either path accepts a gradient."""
    overrides = [
        *TINY_SYNTHETIC,
        "data.options.train_size=256",  # 128 after the validation hold-out: 2 rounds of 4 micro-batches
        "data.batch_size=16",
        "trainer.enable_progress_bar=false",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "test_after_fit=false",
        "strategy=parameter_server",
        "strategy.workers=1",
        "strategy.compression=bf16",
        "strategy.mode=async",
    ]
    cfg = compose_config(tmp_path, overrides)
    result = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    report = json.loads((run_dir / "parameter_server" / "report.json").read_text())
    n = sum(p.numel() for p in build_network("cnn", 3, 10).parameters())
    grads = report["bytes_per_round"]["from_workers"]
    # one GRADS frame per round: 2 bytes per parameter, the BatchNorm statistics (under 4% of it) and its meta
    assert 2 * n < grads < 2 * n * 1.05, grads
    assert report["bytes_per_round"]["to_workers"] > 4 * n  # float32 parameters go out every round
    assert report["compression"] == {"method": "bf16", "topk_ratio": 0.01} and report["mode"] == "async"
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    scalars = tensorboard_scalars(run_dir)
    logged = scalars["ps/bytes_from_workers"]
    assert len(logged) == result["global_step"] and all(2 * n < value < 2 * n * 1.05 for _, value in logged)
    assert "ps/bytes_to_workers" in scalars


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            ["strategy=parameter_server", "strategy.compression=powersgd"],
            "one of none, bf16, fp16, topk with strategy=parameter_server. (powersgd exists only with strategy=ddp.)",
        ),
        (["strategy=parameter_server", "strategy.topk_ratio=1.5"], "strategy.topk_ratio=1.5 is not valid"),
        (["strategy=ddp", "strategy.compression=topk"], "one of none, fp16, bf16, powersgd with strategy=ddp"),
    ],
)
def test_a_compression_the_engine_does_not_have_is_one_paragraph(tmp_path, overrides, says):
    cfg = compose_config(tmp_path, [*TINY_SYNTHETIC, *overrides])
    with pytest.raises(ConfigurationError) as caught:
        train(cfg)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and str(caught.value) in record["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was built


# --- DDP's communication hooks on gloo ---------------------------------------------------------------------------


@pytest.fixture
def gloo_group():
    """A one-process gloo group in this process: DDP runs its communication hook as with more ranks."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("hook", ["none", "fp16", "bf16", "powersgd"])
def test_ddp_communication_hooks_run_on_gloo_and_shape_the_gradient(gloo_group, hook):
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    register_comm_hook(model, hook, rank=1, start_step=2)
    x = torch.randn(16, 64)
    for step in range(3):  # powersgd: plain all-reduce for 2 steps, then rank-1 approximations
        weight = model.module[2].weight
        (reference,) = torch.autograd.grad(model.module(x).square().sum(), weight)  # the module alone: no hook
        model.zero_grad()
        model(x).square().sum().backward()
        got = weight.grad
        if hook == "none" or (hook == "powersgd" and step < 2):
            torch.testing.assert_close(got, reference)
        elif hook in ("fp16", "bf16"):
            half = torch.float16 if hook == "fp16" else torch.bfloat16
            assert torch.equal(got, reference.to(half).float()) and not torch.equal(got, reference)
        else:
            assert torch.linalg.matrix_rank(got) == 1 and not torch.allclose(got, reference)


def test_strategy_ddp_registers_its_hook_on_cpu_and_fp16_without_a_loss_scaler_falls_back_to_bf16(gloo_group, caplog):
    """Lightning registers communication hooks on CUDA only; ours on CPU too, as DDP's own logging data
    shows. fp16 unscaled would turn a gradient entry above 65,504 into inf, NaN after clipping."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from cifar_pl.ddp import SpawnDDPStrategy

    registered = {}
    for hook in ("none", "fp16", "bf16", "powersgd"):
        strategy = SpawnDDPStrategy(
            compression=hook,
            parallel_devices=[torch.device("cpu")],
            precision_plugin=MixedPrecision("bf16-mixed", "cpu"),
        )
        strategy.model = DistributedDataParallel(nn.Linear(4, 2))
        with caplog.at_level("WARNING", logger="cifar_pl.ddp"):
            strategy._register_ddp_hooks()
        registered[hook] = strategy.model._get_ddp_logging_data().get("comm_hook", "")
    assert registered["none"] == ""
    assert "bf16_compress_hook" in registered["bf16"] and "powerSGD_hook" in registered["powersgd"]
    assert "bf16_compress_hook" in registered["fp16"]  # no loss scaler under bf16-mixed: bf16's range instead
    assert "without a loss scaler" in caplog.text and "all-reduced in bf16 instead" in caplog.text


# --- the experiment's table ------------------------------------------------------------------------------------


def test_the_compression_table_reads_the_measured_bytes_and_computes_ddps(tmp_path):
    from omegaconf import OmegaConf

    from experiments import compression_table

    sweep = tmp_path / "sweep"
    jobs = {"0_ps": ["+compression=ps_topk"], "1_ddp": ["+compression=ddp_bf16"]}
    for name, overrides in jobs.items():
        job = sweep / name
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(compose_config(tmp_path, [*TINY_SYNTHETIC, *overrides]), job / ".hydra" / "config.yaml")
        metrics = {"status": "completed", "epochs": 2, "seconds_per_epoch": 2.0, "test/acc": 0.5, "best_val/acc": 0.25}
        (job / "metrics.json").write_text(json.dumps(metrics))
    (sweep / "0_ps" / "parameter_server").mkdir()
    report = {"bytes_per_round": {"to_workers": 836640, "from_workers": 20784.5}}
    (sweep / "0_ps" / "parameter_server" / "report.json").write_text(json.dumps(report))
    assert compression_table.main([str(sweep)]) == 0
    lines = (sweep / "compression.md").read_text().splitlines()
    n = sum(p.numel() for p in build_network("cnn", 3, 10).parameters())
    # 512 synthetic images less 128 held out, over 2 s; DDP's bf16 hook: 2 bytes per parameter from each of 2 ranks
    assert lines[2] == "| 0 | parameter server | topk 0.01 | completed | 2 | 192 | 20,784 | 836,640 | 50.00 | 25.00 |"
    ddp = f"| 1 | DDP | bf16 | completed | 2 | 192 | {4 * n:,} (computed) | none (no central copy) | 50.00 | 25.00 |"
    assert lines[3] == ddp


def test_bytes_per_round_are_a_rounds_worth_in_every_mode():
    """In async a step is one worker's share: its figures sum `workers` steps, so that the report's
    bytes per round mean the same in every mode (all workers together)."""
    from cifar_pl.parameter_server.strategy import ParameterServerStrategy

    per_step = {"sync": [(200, 20), (600, 60), (1000, 100)], "async": [(100, 10), (100, 10), (300, 30), (300, 30)]}
    per_step["async"] += [(500, 50), (500, 50), (700, 70)]  # an unfinished round at the end is left out
    for mode, steps in per_step.items():
        strategy = ParameterServerStrategy(workers=2, mode=mode)
        strategy.round_bytes.extend(steps)
        assert strategy.bytes_per_round() == {"to_workers": 600, "from_workers": 60}, mode
