"""DDP as users start it: spawned by train.py on one machine, or by torchrun on each of several machines (here
two torchrun launchers on 127.0.0.1 stand in for two machines), through Ctrl-C, resume and the final test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_SYNTHETIC, free_port, run_script

RUN = [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]


def _torchrun(nodes: int, per_node: int, node: int, port: int, args: list[str], cwd: Path) -> subprocess.Popen:
    """The README's command: torchrun --nnodes N --nproc-per-node P --node-rank R ... train.py strategy=ddp
    trainer.num_nodes=N trainer.devices=P ..., in a session of its own (as in its own terminal)."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run"),
        *("--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--node-rank", str(node)),
        *("--master-addr", "127.0.0.1", "--master-port", str(port)),
        *(str(REPO / "train.py"), "strategy=ddp", f"trainer.num_nodes={nodes}", f"trainer.devices={per_node}"),
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _launch(topology: tuple[int, int], args: list[str], run_dir: Path, cwd: Path) -> list[tuple[int, str]]:
    """Start one launcher per machine (node 0 writes into run_dir, node n into run_dir-n) and wait for all."""
    nodes, per_node = topology
    port = free_port()
    launchers = [
        _torchrun(nodes, per_node, node, port, [*args, f"hydra.run.dir={run_dir}{f'-{node}' if node else ''}"], cwd)
        for node in range(nodes)
    ]
    results = []
    try:
        for launcher in launchers:
            output, _ = launcher.communicate(timeout=240)
            results.append((launcher.returncode, output))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:  # a hang: take the launcher and its workers down
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    return results


# One topology each way: stopped with one launcher of two processes, resumed with two launchers of one. (Ctrl-C
# on two launchers, resumed with one, passed too; it is left out to keep the suite within CI's 10 minutes.)
@pytest.mark.parametrize(
    ("stopped", "resumed"),
    [((1, 2), (2, 1))],
    ids=["ctrl-c-one-launcher-two-processes,resume-two-launchers"],
)
def test_torchrun_stops_on_ctrl_c_and_resumes_to_the_test_and_metrics_json(tmp_path, stopped, resumed):
    # Ctrl-C reaches the launcher, which passes it on to its workers (they run in sessions of their own): as
    # batch 5 of 12 starts on rank 0, inside the second accumulation window, so training stops after step 2
    chaos = [
        "+callbacks.chaos._target_=tests.helpers.SignalSelfAt",
        "+callbacks.chaos.epoch=0",
        "+callbacks.chaos.batch=5",
        "+callbacks.chaos.signal=SIGINT",
        "+callbacks.chaos.target=launcher",
        f"+callbacks.chaos.every_rank={stopped[0] > 1}",  # a Ctrl-C on every machine
        "+callbacks.chaos.pause=2",  # the launcher's SIGINT reaches the workers before the step ends
        "callbacks.graceful_interrupt.sync_every_n_steps=1",
    ]
    started = time.monotonic()
    results = _launch(stopped, [*RUN, *chaos], tmp_path / "first", tmp_path)
    assert all(code != 0 for code, _ in results), [output[-2000:] for _, output in results]
    assert time.monotonic() - started < 200, "nothing hung"
    assert "SIGINT: stopping at the end of this optimizer step" in results[0][1]
    interrupted = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert interrupted["status"] == "interrupted" and "test/acc" not in interrupted
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 2), results[0][1][-3000:]

    # the same command on every machine, with the checkpoint (readable by every rank) to resume from
    results = _launch(resumed, [*RUN, f"ckpt_path={last}"], tmp_path / "resumed", tmp_path)
    assert [code for code, _ in results] == [0] * len(results), [output[-3000:] for _, output in results]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 3, metrics
    assert 0 <= metrics["test/acc"] <= 1 and "Test accuracy:" in results[0][1]
    assert not any((tmp_path / f"resumed-{node}" / "metrics.json").exists() for node in range(1, resumed[0]))


def test_a_user_error_in_a_spawned_ddp_rank_reaches_the_user_as_one_paragraph(tmp_path):
    """A missing dataset is found by the spawned ranks, not by train.py's own process: it must still arrive as
    the one-paragraph error with status 2, not as torch's ProcessRaisedException and its traceback."""
    missing = ["data.download=false", f"data.root={tmp_path / 'empty'}"]
    args = ["strategy=ddp", "trainer.devices=2", *missing, *RUN[-2:], f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_script("train.py", args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: CIFAR-10 is not available: looked in" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("DatasetError: CIFAR-10 is not available")
