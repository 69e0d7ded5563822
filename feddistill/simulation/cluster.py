"""Run the simulation on an existing Ray cluster: check the address before Flower connects to it.

``feddistill simulate --ray-address HOST:PORT`` hands the address to Flower's Ray backend as
``backend_config["init_args"]["address"]``; Flower then calls ``ray.init(address=...,
include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": ...}}, ...)`` only if Ray is not
initialized yet (``RayBackend.init_ray`` in flwr 1.42). Flower adds no ``num_cpus``/``num_gpus``
there on this path (``flwr run``'s federation options ``init_args_num_cpus``/``_num_gpus`` would,
and Ray refuses those when connecting to a cluster); the per-client resources go in
``client_resources`` and Flower sizes its actor pool node by node from ``ray.nodes()``.

Why a probe first: ``ray.init`` to an address where no cluster answers does not fail, it retries
(Ray 2.55 makes 20 tries, each ~36 s of "Failed to connect to GCS" warnings here: minutes on
end).
:func:`probe_cluster` therefore tries a plain TCP connection (refused or unreachable: an error at
once), then connects a throw-away Ray driver in a subprocess bounded by a timeout, which also
returns each live node's CPUs and GPUs so that a request no node can host fails here, naming the
address, rather than as Flower's "ActorPool is empty".
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass

# Run by a throw-away Python: connect, list the live nodes' resources, disconnect.
_PROBE = """
import json, logging, sys, warnings
warnings.simplefilter("ignore")
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False,
         include_dashboard=False)
nodes = [
    {"ip": n["NodeManagerAddress"], "cpus": float(n["Resources"].get("CPU", 0)),
     "gpus": float(n["Resources"].get("GPU", 0))}
    for n in ray.nodes() if n["Alive"]
]
ray.shutdown()
print("FEDDISTILL-PROBE " + json.dumps(nodes))
"""
_MARK = "FEDDISTILL-PROBE "


@dataclass(frozen=True)
class NodeResources:
    ip: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterInfo:
    """What the live nodes of a Ray cluster offer (one entry per node)."""

    address: str
    nodes: tuple[NodeResources, ...]

    @property
    def cpus(self) -> float:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(n.gpus for n in self.nodes)

    @property
    def max_node_cpus(self) -> float:
        return max((n.cpus for n in self.nodes), default=0.0)

    @property
    def max_node_gpus(self) -> int:
        """GPUs of the best-equipped node: a client (one Ray actor) runs on a single node."""
        return int(max((n.gpus for n in self.nodes), default=0.0))

    def summary(self) -> str:
        return (
            f"Ray cluster at {self.address}: {len(self.nodes)} nodes, {self.cpus:g} CPUs, "
            f"{self.gpus:g} GPUs"
        )


def parse_ray_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a cluster's head (the GCS address ``ray start --head`` prints).

    ``auto`` is refused: it picks whichever cluster was last started on this machine, which on a
    shared host may be someone else's; ``ray://`` (Ray Client) runs the driver elsewhere and is
    not supported by this command.
    """
    text = address.strip()
    if text.startswith("ray://"):
        raise ValueError(
            f"--ray-address {address!r}: Ray Client addresses (ray://) are not supported; run "
            "`feddistill simulate` on a node of the cluster and give the head's HOST:PORT "
            "(the GCS address, default port 6379)"
        )
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--ray-address {address!r}: expected HOST:PORT of the Ray head (the address "
            "`ray start --head` prints, e.g. 10.0.0.1:6379)"
        )
    return host, int(port)


def probe_cluster(address: str, timeout: float = 60.0) -> ClusterInfo:
    """Check that a Ray cluster answers at ``address``; its live nodes' resources.

    Raises:
        ValueError: naming the address, when nothing listens there, the connection does not
            complete within ``timeout`` seconds, or the cluster has no live node.
    """
    host, port = parse_ray_address(address)
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except OSError as err:
        raise ValueError(
            f"--ray-address {address}: cannot connect ({err.strerror or err}); is a Ray head "
            f"running there (`ray start --head --port {port} ...`, see docs/ray-cluster.md)?"
        ) from None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, address.strip()],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"--ray-address {address}: the port is open but no Ray cluster answered within "
            f"{timeout:g} s (is it the head's GCS port, and the same Ray version?)"
        ) from None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"--ray-address {address}: could not join the Ray cluster: {tail}")
    nodes = tuple(NodeResources(**n) for n in json.loads(lines[-1][len(_MARK) :]))
    if not nodes:
        raise ValueError(f"--ray-address {address}: the Ray cluster has no live node")
    return ClusterInfo(address.strip(), nodes)
