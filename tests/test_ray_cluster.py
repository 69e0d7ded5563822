"""``feddistill simulate --ray-address``: the address checks, and two Ray nodes on loopback.

The cluster test starts a Ray head and a second Ray node on this machine, each a ``ray start
--block`` process in its own process group, runs docs/ray-cluster.md's ``feddistill simulate``
command against the head (a tiny model instead of MiniLM) and stops both groups by PID. Other Ray
sessions may run on the same machine, so every port Ray lets one set is given explicitly (from a
block of free ports below the kernel's ephemeral range), the dashboard is off, and Ray's files go
to a temporary folder of the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from feddistill.cli import main
from feddistill.client.work import ClientError, load_initial, received_arrays
from feddistill.codec import parse_spec
from feddistill.codec.chain import ChainSender, unpack_chain
from feddistill.run_inputs import source_splits
from feddistill.server.run import resolve_paths
from feddistill.simulation.cluster import ClusterInfo, parse_ray_address, probe_cluster
from feddistill.simulation.engine import backend_config
from tests.conftest import TINY, tiny_config
from tests.deploy.federation import BIN, Processes, Started

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ray-cluster.md"

# -- docs/ray-cluster.md: the commands, with the doc's values and the test's ---------------------
TEMPLATES: dict[str, str] = {
    "env": "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 "
    "FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0",
    "head": "ray start --head --node-ip-address {head_ip} --port {port} --num-cpus {cpus} "
    "--include-dashboard=false --block",
    "worker": "ray start --address {head_ip}:{port} --node-ip-address {node_ip} "
    "--num-cpus {cpus} --block",
    "status": "ray status --address {head_ip}:{port}",
    "simulate": "feddistill simulate --ray-address {head_ip}:{port} --num-clients {n} "
    "--clients-per-round {k} --rounds {rounds} --out {out} --set cache-dir={cache}{model}",
}
DOC_VALUES: dict[str, Any] = {
    "head_ip": "10.0.0.1",
    "node_ip": "10.0.0.2",
    "port": 6379,
    "cpus": 8,
    "n": 100,
    "k": 10,
    "rounds": 20,
    "out": "runs/ray1",
    "cache": "/shared/feddistill/cache",
    "model": " --teacher offline:all-minilm-l6-v2 --set data.max-length=64",
}


def doc_commands() -> list[str]:
    """Each line of the doc's ``sh`` blocks (continuation lines joined)."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def command(name: str, **values: Any) -> list[str]:
    """argv of template ``name`` with the test's ``values``, once its doc form is in the doc."""
    in_doc = TEMPLATES[name].format(**DOC_VALUES)
    assert in_doc in doc_commands(), f"docs/ray-cluster.md lost the command:\n{in_doc}"
    return shlex.split(TEMPLATES[name].format(**{**DOC_VALUES, **values}))


def test_every_doc_command_is_one_the_cluster_test_runs() -> None:
    # Prepare
    rendered = {t.format(**DOC_VALUES) for t in TEMPLATES.values()}

    # Execute
    untested = [c for c in doc_commands() if c not in rendered]

    # Assert
    for name in TEMPLATES:
        command(name)
    assert not untested, f"docs/ray-cluster.md has commands no test runs: {untested}"


# -- the address checks (no cluster) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.1:6379", ("10.0.0.1", 6379)), (" head.lan:7000 ", ("head.lan", 7000))],
)
def test_ray_address_is_host_and_port(address: str, expected: tuple[str, int]) -> None:
    assert parse_ray_address(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("auto", "expected HOST:PORT"),
        ("10.0.0.1", "expected HOST:PORT"),
        ("10.0.0.1:0", "expected HOST:PORT"),
        ("10.0.0.1:ray", "expected HOST:PORT"),
        ("ray://10.0.0.1:10001", "Ray Client"),
    ],
)
def test_bad_ray_address_is_refused_naming_it(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        parse_ray_address(address)
    assert repr(address) in str(err.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_simulate_with_no_cluster_at_the_address_fails_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a port nothing listens on (Ray itself would retry there for many minutes)
    address = f"127.0.0.1:{_closed_port()}"

    # Execute
    code = main(["simulate", "--ray-address", address, "--out", str(tmp_path / "out")])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert f"--ray-address {address}: cannot connect" in err
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_an_open_port_where_no_ray_cluster_answers_fails_within_the_timeout() -> None:
    # Prepare: something listens, accepts and says nothing (not a Ray head)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"

        # Execute / Assert: an error naming the address, not Ray's minutes of retries
        with pytest.raises(ValueError, match=re.escape(f"--ray-address {address}: ")):
            probe_cluster(address, timeout=15)


def test_backend_config_joins_the_cluster_without_declaring_resources() -> None:
    # Ray refuses num_cpus/num_gpus in ray.init when it connects to an existing cluster
    local = backend_config(1.0, 0.0, verbose=False)
    joined = backend_config(1.0, 0.25, verbose=False, ray_address="10.0.0.1:6379")

    assert "address" not in local["init_args"]
    assert joined["init_args"]["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "num_gpus"} & set(joined["init_args"])
    assert joined["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}


# -- a client that Ray places on another node (per-node caches) ----------------------------------
def test_a_client_on_a_node_without_its_downlink_version_fails_once_then_gets_the_model(
    tmp_path: Path,
) -> None:
    """What docs/ray-cluster.md says of per-node caches: the chained downlink works on any node
    that some client brought to a recent version, fails on a node that has none (one lost
    round), and after the server forgets the client a chain from version 0 works anywhere."""
    # Prepare: the server's chain and three nodes' cache folders; client 7 ran on node A
    cfg = resolve_paths(tiny_config(tmp_path))
    _, _, labels = source_splits(cfg)
    models = load_initial(cfg, labels, "")
    sender = ChainSender(
        models.init_arrays, parse_spec(cfg.compression.downlink), chain=b"raycache"
    )
    node_a, node_b, node_c = (tmp_path / n for n in ("a", "b", "c"))
    rng = np.random.default_rng(0)

    def next_global() -> None:
        sender.advance(
            {
                n: a + rng.standard_normal(a.shape).astype(np.float32) * 0.01
                for n, a in sender.broadcast.items()
            }
        )

    def serve(client: int, node: Path) -> dict[str, np.ndarray]:
        payload, version = sender.message_for(client)
        arrays = received_arrays(models, cfg, payload, node)
        sender.acknowledge(client, version)
        return arrays

    next_global()
    serve(7, node_a)
    serve(8, node_b)  # node B now holds version 1 too
    next_global()

    # Execute / Assert: client 7 on node B starts from the version client 8 left there
    assert all(np.array_equal(v, sender.broadcast[n]) for n, v in serve(7, node_b).items())
    next_global()
    payload, _ = sender.message_for(7)
    with pytest.raises(ClientError, match="not in this node's cache"):
        received_arrays(models, cfg, payload, node_c)  # node C never ran a client
    sender.forget(7)  # the server, on that error reply
    payload, _ = sender.message_for(7)
    # from version 0, which any node rebuilds (deltas 1..3 here; a float32 model when smaller)
    assert unpack_chain(payload, max_payload_bytes=1 << 26).first_needed == 0
    arrays = received_arrays(models, cfg, payload, node_c)
    assert all(np.array_equal(v, sender.broadcast[n]) for n, v in arrays.items())


# -- a two-node cluster on loopback ---------------------------------------------------------------
SINGLE_PORTS = (
    "node-manager",
    "object-manager",
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "metrics-export",
    "runtime-env-agent",
)
HEAD_PORTS = ("gcs", "ray-client-server", "dashboard")
WORKER_PORTS = 16  # --min-worker-port .. --max-worker-port of each node


def free_port_block(size: int) -> int:
    """First port of ``size`` consecutive free ports below the ephemeral range (32768+), so
    that no process asking the kernel for any free port can take one before Ray binds it."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32768 - size)
        socks = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {size} free ports in 20000-32767")


def isolation_flags(ports: Iterator[int], head: bool, temp_dir: Path) -> list[str]:
    """Flags that keep a test node off every default port and out of /tmp/ray."""
    names = (*HEAD_PORTS[1:], *SINGLE_PORTS) if head else SINGLE_PORTS
    flags = [f"--{name}-port={next(ports)}" for name in names]
    low = next(ports)
    for _ in range(WORKER_PORTS - 1):
        next(ports)
    flags += [f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}"]
    flags += ["--object-store-memory=100000000", "--disable-usage-stats"]
    if head:
        flags.append(f"--temp-dir={temp_dir}")
    return flags


def wait_for_port(port: int, node: Started, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise NodeExited(node)
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.5)
    raise AssertionError(f"{node.name}: port {port} not open after {timeout} s")


def wait_for_nodes(address: str, count: int, nodes: list[Started], timeout: float) -> ClusterInfo:
    """Poll the cluster until it has ``count`` live nodes; NodeExited if a node's process ends."""
    deadline = time.monotonic() + timeout
    info = None
    while time.monotonic() < deadline:
        for node in nodes:
            if node.proc.poll() is not None:
                raise NodeExited(node)
        info = probe_cluster(address, timeout=max(5.0, min(60.0, deadline - time.monotonic())))
        if len(info.nodes) == count:  # == : a node killed on a retry must be seen dead
            return info
        time.sleep(1.0)
    raise AssertionError(f"the cluster at {address} has {info} after {timeout} s, not {count}")


class NodeExited(Exception):
    def __init__(self, node: Started) -> None:
        super().__init__(f"{node.name} exited:\n{node.output()[-3000:]}")
        self.node = node


def start_node(
    procs: Processes,
    name: str,
    argv: Callable[[], tuple[list[str], str]],
    env: dict[str, str],
    count: int,
    others: list[Started],
    attempts: int = 3,
) -> tuple[Started, str, ClusterInfo]:
    """Start a Ray node until the cluster has ``count`` nodes: (the node, the address, info).

    Ray gives a new node's raylet 30 s (a constant in ``ray._private.node``) to register with
    the GCS; on a machine loaded by other work that can pass, and ``ray start`` exits. Such a
    node's group is killed and the node started again, on fresh ports (``argv`` gives new ones).
    """
    for attempt in range(attempts):
        cmd, address = argv()
        node = procs.start(f"{name}-{attempt}", cmd, env)
        try:
            if not others:  # the head: its GCS port first
                wait_for_port(int(address.rsplit(":", 1)[1]), node, timeout=120)
            return node, address, wait_for_nodes(address, count, [*others, node], timeout=180)
        except NodeExited as exited:
            if exited.node is not node or "timed out during startup" not in str(exited):
                raise AssertionError(str(exited)) from None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
    raise AssertionError(f"{name} did not start in {attempts} attempts:\n{node.output()[-3000:]}")


# Which nodes ran the clients: the GCS keeps the (finished) actors and where they lived.
_ACTOR_NODES = """
import json, logging, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
actors = state.actors().values()
print(json.dumps(sorted({a["Address"]["NodeID"] for a in actors
                         if "ClientAppActor" in a["ActorClassName"]})))
"""


def assert_groups_gone(started: list[Started], timeout: float) -> None:
    """Every process group the test started is empty (its leaders reaped)."""
    deadline = time.monotonic() + timeout
    for s in started:
        while True:
            try:
                os.killpg(s.proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"process group {s.proc.pid} ({s.name}) lives"
            time.sleep(0.2)


def _lives(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay
    # under the 107 characters of a Unix socket path, which pytest's tmp_path can exceed.
    path = Path(tempfile.mkdtemp(prefix="fdray-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_tiny_federation_on_a_two_node_ray_cluster(tmp_path: Path, ray_tmp: Path) -> None:
    # Prepare: a head and a second node, 1 CPU each, so that each runs one client at a time
    attempts = 3  # per node, see start_node
    head_ports = 1 + len(HEAD_PORTS) + len(SINGLE_PORTS) + WORKER_PORTS
    first = free_port_block(attempts * (head_ports + len(SINGLE_PORTS) + WORKER_PORTS))
    ports = iter(range(first, first + 1000))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # flags say where
    env |= dict(item.split("=", 1) for item in command("env")[1:])  # the doc's export line
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_TMPDIR": str(ray_tmp)}
    values = {"head_ip": "127.0.0.1", "node_ip": "127.0.0.1", "cpus": 1}

    def head_argv() -> tuple[list[str], str]:
        values["port"] = gcs = next(ports)
        flags = isolation_flags(ports, True, ray_tmp)
        return command("head", **values) + flags, f"127.0.0.1:{gcs}"

    def worker_argv() -> tuple[list[str], str]:
        flags = isolation_flags(ports, False, ray_tmp)
        return command("worker", **values) + flags, f"127.0.0.1:{values['port']}"

    tiny = tmp_path / "tiny.toml"
    flat = {**TINY, "server.local-only": "off"}
    tiny.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in flat.items()))
    out, cache = tmp_path / "out", tmp_path / "shared-cache"
    sim_values = {"n": 3, "k": 3, "rounds": 2, "out": out, "cache": cache}
    procs = Processes(tmp_path / "logs")
    started_at = time.monotonic()
    try:
        head, address, _ = start_node(procs, "ray-head", head_argv, env, 1, [], attempts)
        _, _, cluster = start_node(procs, "ray-worker", worker_argv, env, 2, [head], attempts)
        sim_argv = command("simulate", **values, **sim_values, model=f" --config {tiny}")
        # `ray status` reads the autoscaler's report, which lags the GCS by a few seconds:
        # the doc's command is rerun until it shows both nodes (or a minute has passed).
        for attempt in range(30):
            status = procs.start(f"ray-status-{attempt}", command("status", **values), env)
            if procs.wait(status, 120).output().count("node_") >= 2:
                break
            time.sleep(2)
        ready_at = time.monotonic()

        # Execute: the doc's command (tiny model), as a subprocess of this test
        sim = procs.start("simulate", [*sim_argv, "--progress", "off"], env)
        procs.wait(sim, timeout=600)
        ran_at = time.monotonic()
        placed = subprocess.run(
            [sys.executable, "-c", _ACTOR_NODES, address],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=True,
        )

        # Assert: both nodes served clients; every round complete, nothing failed
        assert [n.cpus for n in cluster.nodes] == [1.0, 1.0]
        assert status.output().count("node_") >= 2, status.output()
        assert len(json.loads(placed.stdout.strip().splitlines()[-1])) == 2
        assert "Ray cluster at 127.0.0.1" in sim.output() and "2 nodes" in sim.output()
        results = json.loads((out / "results.json").read_text())
        assert results["final"]["rounds_completed"] == 2
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        for r in results["rounds"]:
            assert r["failures"] == 0 and r["replies"] == 3
            assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= results["final"]["accuracy"] <= 1.0
        # the clients' state is in the folder both nodes share
        assert sorted(p.name for p in (cache / "clients").iterdir()) == [
            f"partition-{i}-of-3" for i in range(3)
        ]
        print(f"cluster up in {ready_at - started_at:.0f} s, federation {ran_at - ready_at:.0f} s")
    finally:
        leaders = [s for s in procs.started if s.name.startswith("ray-")]
        descendants = []
        for s in leaders:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(s.proc.pid).children(recursive=True)
        procs.stop_all(grace=10.0)  # SIGTERM to each group (killpg), then SIGKILL what is left
        assert_groups_gone(procs.started, timeout=30)
        assert not [p for p in descendants if _lives(p)]
