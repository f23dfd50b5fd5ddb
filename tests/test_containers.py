"""The container deployment, for real: the image built from the repository's Dockerfile, run standalone with an
outputs volume, and the parameter server of compose.yaml (podman-compose) as separate containers on a bridge
network, server and workers in network namespaces of their own, talking by service name. Faults are real too:
a worker container killed, and a worker cut off from the network and reconnected.

Left out of the default ``pytest`` run (the image is several GB and the first build takes minutes); run them with
``pytest -m container``. The sandbox-specific podman settings are in tests/containers.py.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import containers as c
from tests.helpers import TINY_SYNTHETIC

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(c.missing_tools() is not None, reason=str(c.missing_tools())),
    pytest.mark.timeout(3600),  # the first image build downloads and installs PyTorch
]

# 384 training samples (512 less 128 held out): 3 rounds of 2 workers x 4 micro-batches of 16 per epoch; one
# thread per process, as server and workers share this machine's cores
DISTRIBUTED = [*TINY_SYNTHETIC, "data.batch_size=16", "trainer.enable_progress_bar=false", "num_threads=1"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[dict]:
    env = c.sandbox_env(tmp_path_factory.mktemp("podman"))
    started = time.monotonic()
    built = c.build_image(env)
    print(f"\nimage {c.IMAGE}: {json.dumps({k: v for k, v in built.items() if k != 'log_tail'})}")
    yield {"env": env, "seconds": time.monotonic() - started, **built}


@pytest.fixture
def deployment(tmp_path, image):
    """A compose project of its own (its own network, containers and host folders), taken down afterwards."""
    project = f"cifarpltest{uuid.uuid4().hex[:8]}"
    secret_file = tmp_path / "ps_secret"
    secret_file.write_text(secrets.token_hex(32) + "\n")
    secret_file.chmod(0o644)  # the container's user (uid 1000) reads it through the bind mount
    outputs, data = tmp_path / "outputs", tmp_path / "data"
    c.world_writable(outputs, data)
    env = dict(
        image["env"],
        CIFAR_PL_IMAGE=c.IMAGE,
        CIFAR_PL_SECRET_FILE=str(secret_file),
        CIFAR_PL_OUTPUTS=str(outputs),
        CIFAR_PL_DATA=str(data),
        CIFAR_PL_WORKERS="2",
    )
    handle = Deployment(project, env, outputs, secret_file)
    try:
        yield handle
    finally:
        for name in handle.containers():  # what each container said, for a failing test
            print(f"----- {name} -----\n{c.logs(env, name)[-3000:]}")
        c.compose(env, project, "down", timeout=120)
        c.podman(env, "network", "rm", "--force", handle.network, check=False)


class Deployment:
    def __init__(self, project: str, env: dict[str, str], outputs: Path, secret_file: Path) -> None:
        self.project, self.env, self.outputs, self.secret_file = project, env, outputs, secret_file
        self.network = f"{project}_default"
        self.server = f"{project}_server_1"
        self.workers = [f"{project}_worker_1", f"{project}_worker_2"]

    def up(self, *overrides: str) -> None:
        self.env["CIFAR_PL_ARGS"] = " ".join(overrides)
        c.compose(self.env, self.project, "up", "-d", "--no-build", "server", "worker")

    def containers(self) -> list[str]:
        out = c.podman(self.env, "ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}", check=False)
        return [line.split()[-1] for line in out.stdout.splitlines()[1:] if line.strip()]

    def address(self, container: str) -> str:
        """The container's address on the deployment's bridge network."""
        return c.inspect(self.env, container)["NetworkSettings"]["Networks"][self.network]["IPAddress"]

    def run_dir(self) -> Path:
        runs = [p.parent for p in self.outputs.glob("*/*/.hydra")]
        assert len(runs) == 1, runs
        return runs[0]

    def report(self) -> dict:
        return json.loads((self.run_dir() / "parameter_server" / "report.json").read_text())

    def server_log(self) -> str:
        return c.logs(self.env, self.server)


def hostname(env: dict[str, str], container: str) -> str:
    return c.inspect(env, container)["Config"]["Hostname"]


def assert_exactly_once(report: dict, epochs: int, samples: int) -> None:
    assert [e["epoch"] for e in report["epochs"]] == list(range(epochs)), report["epochs"]
    for epoch in report["epochs"]:
        assert epoch["samples"] == samples and epoch["used_once"] == samples, epoch
        assert epoch["unused"] == 0 and epoch["used_more_than_once"] == 0 and epoch["every_sample_exactly_once"]


def test_standalone_run_writes_metrics_and_a_checkpoint_to_the_host_as_a_non_root_user(tmp_path, image):
    env = image["env"]
    outputs = tmp_path / "outputs"
    c.world_writable(outputs)
    started = time.monotonic()
    result = c.podman(
        env,
        "run",
        "--rm",
        "--volume",
        f"{outputs}:/outputs",
        c.IMAGE,
        *TINY_SYNTHETIC,
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        timeout=300,
        check=False,
    )
    print(f"standalone run: {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [metrics_file] = outputs.glob("*/*/metrics.json")  # the run directory Hydra made under /outputs
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1 and metrics["dataset"] == "synthetic"
    assert metrics["run_dir"].startswith("/outputs/")
    checkpoint = outputs / Path(metrics["checkpoint"]).relative_to("/outputs")
    assert checkpoint.is_file() and checkpoint.stat().st_size > 100_000
    assert (metrics_file.parent / "checkpoints" / "last.ckpt").is_file()
    # rootful podman maps no user namespace: the uid that owns the files is the one training ran as
    assert metrics_file.stat().st_uid != 0 and checkpoint.stat().st_uid != 0
    assert metrics_file.stat().st_uid == int(
        c.podman(env, "run", "--rm", "--entrypoint", "id", c.IMAGE, "-u").stdout.strip()
    )


def test_server_and_two_workers_in_separate_containers_train_over_the_bridge_network(deployment):
    started = time.monotonic()
    deployment.up(*DISTRIBUTED, "trainer.max_epochs=2")
    env = deployment.env
    server = c.inspect(env, deployment.server)
    assert list(server["NetworkSettings"]["Networks"]) == [deployment.network]
    addresses = {deployment.address(w) for w in deployment.workers}  # while they run: an exited one has none
    # the secret reaches the containers as a file only: never in the environment or on the command line
    secret = deployment.secret_file.read_text().strip()
    for name in [deployment.server, *deployment.workers]:
        config = c.inspect(env, name)["Config"]
        assert secret not in json.dumps(config["Env"]) and secret not in json.dumps(config["Cmd"])
        assert "strategy.secret_file=/run/secrets/ps_secret" in config["Cmd"]
    assert c.wait_exit(env, deployment.server, timeout=600) == 0, deployment.server_log()[-5000:]
    for worker in deployment.workers:
        assert c.wait_exit(env, worker, timeout=60) == 0, c.logs(env, worker)[-3000:]
    print(f"distributed run: {time.monotonic() - started:.1f} s")

    report = deployment.report()
    metrics = json.loads((deployment.run_dir() / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert report["workers_planned"] == 2 and report["address"] == "0.0.0.0:29400"
    joined = [e for e in report["events"] if e["event"] == "joined"]
    # both workers, each from its own container (host name) and its own address on the bridge network
    hosts = {hostname(env, w) for w in deployment.workers}
    assert {e["host"] for e in joined} == hosts and len(joined) == 2
    assert {e["worker"].rsplit("(", 1)[1].split(":")[0] for e in joined} == addresses
    assert len(report["rounds_per_worker"]) == 2 and all(n == 6 for n in report["rounds_per_worker"].values())
    assert_exactly_once(report, epochs=2, samples=384)
    assert all(e["reassigned_samples"] == 0 for e in report["epochs"])


# 1,024 training samples: 8 rounds per epoch; a recovery checkpoint after every 2nd round marks "mid-run" on the
# host, and the round timeout bounds how long the server waits for a worker that has gone quiet
FAULTS = [
    *DISTRIBUTED,
    "data.options.train_size=1152",
    "callbacks.recovery_checkpoint.every_n_train_steps=2",
    "strategy.round_timeout=3",
]


def mid_run(deployment: Deployment) -> Path:
    """Wait until the server has saved its first recovery checkpoint (round 2 done), on the host."""
    return c.wait_for(
        lambda: next(deployment.outputs.glob("*/*/checkpoints/recovery.ckpt"), None), 300, "the server's round 2"
    )


def test_a_worker_container_killed_mid_run_has_its_share_reassigned_and_training_completes(deployment):
    started = time.monotonic()
    deployment.up(*FAULTS, "trainer.max_epochs=4")
    env = deployment.env
    victim, survivor = deployment.workers
    victim_host = hostname(env, victim)
    mid_run(deployment)
    c.podman(env, "kill", victim)  # SIGKILL: no goodbye, the container's network namespace goes with it
    assert c.wait_exit(env, deployment.server, timeout=600) == 0, deployment.server_log()[-5000:]
    assert c.wait_exit(env, survivor, timeout=60) == 0, c.logs(env, survivor)[-3000:]
    print(f"killed-worker run: {time.monotonic() - started:.1f} s")

    report = deployment.report()
    assert json.loads((deployment.run_dir() / "metrics.json").read_text())["status"] == "completed"
    left = [e for e in report["events"] if e["event"] == "left" and victim_host in e["worker"]]
    assert left and left[0]["round"] < 32, report["events"]  # it went mid-run
    reassigned = [e for e in report["events"] if e["event"] == "reassigned" and victim_host in e["worker"]]
    assert reassigned and sum(e["reassigned_samples"] for e in report["epochs"]) >= reassigned[0]["samples"] > 0
    assert_exactly_once(report, epochs=4, samples=1024)
    assert report["rounds"] == 32


def test_a_worker_cut_off_from_the_network_mid_run_rejoins_and_training_completes(deployment):
    started = time.monotonic()
    deployment.up(*FAULTS, "trainer.max_epochs=6")  # 48 rounds: time to rejoin before the end
    env = deployment.env
    victim = deployment.workers[0]
    victim_host = hostname(env, victim)
    address = deployment.address(victim)
    mid_run(deployment)
    c.podman(env, "network", "disconnect", deployment.network, victim)
    cut = time.monotonic()

    def dropped() -> bool:  # the server gave up on it: its shares went to the other worker, then it was let go
        return any(
            "parameter server: left" in line and victim_host in line for line in deployment.server_log().splitlines()
        )

    c.wait_for(dropped, 120, "the server to drop the worker that went quiet", interval=0.5)
    # back on the network with its old address, as after a switch or cable fault
    c.podman(env, "network", "connect", "--ip", address, deployment.network, victim)
    print(f"cut off for {time.monotonic() - cut:.1f} s")
    assert c.wait_exit(env, deployment.server, timeout=900) == 0, deployment.server_log()[-5000:]
    for worker in deployment.workers:  # the one cut off too: it rejoined and was told when training finished
        assert c.wait_exit(env, worker, timeout=120) == 0, c.logs(env, worker)[-3000:]
    print(f"network-fault run: {time.monotonic() - started:.1f} s")

    report = deployment.report()
    events = [(e["event"], e.get("worker", ""), e["round"]) for e in report["events"]]
    assert json.loads((deployment.run_dir() / "metrics.json").read_text())["status"] == "completed"
    mine = [(kind, who, round_) for kind, who, round_ in events if victim_host in who]
    assert [kind for kind, _, _ in mine if kind in ("joined", "left")] == ["joined", "left", "joined"], events
    assert (
        any(kind == "reassigned" for kind, _, _ in mine) and sum(e["reassigned_samples"] for e in report["epochs"]) > 0
    )
    # it came back (same container, a new connection) while there was work left, and was given some: late for
    # the three rounds before it was dropped, it had computed for at most left-3 rounds until then
    left_at = next(round_ for kind, _, round_ in mine if kind == "left")
    rejoined_at = [round_ for kind, _, round_ in mine if kind == "joined"][-1]
    computed = sum(n for who, n in report["rounds_per_worker"].items() if victim_host in who)
    assert rejoined_at < report["rounds"] == 48 and computed > left_at - 3, report["rounds_per_worker"]
    assert_exactly_once(report, epochs=6, samples=1024)
