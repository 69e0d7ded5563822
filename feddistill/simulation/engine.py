"""Run the federation on Flower's simulation engine (Ray backend) from Python.

``flwr.simulation.run_simulation`` is marked deprecated in Flower 1.41 in favour of the
``flwr run`` command line, which has no Python-API equivalent; ``feddistill simulate`` needs an
in-process call (its options become the ServerApp's config), so this module is the one place that
calls it, with the deprecation notice silenced. ``flwr run .`` remains fully supported and runs the
very same ServerApp/ClientApp.

Scale: memory and time per round should depend on the clients per round, not on
``data.num-clients``. Flower registers one virtual node per client and its dispatcher thread
asks *every* node for pending messages every 0.1 s; with messages in flight each ask scans them
all, so a sweep costs GIL-holding Python in proportion to the nodes, stealing a core from the
clients (measured figures: docs/simulation.md, "Many clients on one host").
:func:`dispatch_to_addressed_nodes` swaps that thread's loop, for the duration of :func:`simulate`
only, for one that asks only the nodes that have a pending message (the same ``get_message_ins``
calls; being cheap, it sweeps every 10 ms instead of 100 ms).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feddistill.config import Config
from feddistill.run_inputs import partitions, source_splits
from feddistill.simulation.cluster import probe_cluster

OFFLINE_ENV = {
    # Flower would otherwise try to install the app's dependencies with uv on every run,
    # send telemetry and check for updates: all need the network.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    # Ray: no usage stats upload, no dashboard, quiet workers.
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_environment() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def preflight(cfg: Config) -> None:
    """Fail before Ray starts: bad data, columns or partition settings raise DataError."""
    source_splits(cfg)
    if cfg.mode == "simulation":
        partitions(cfg)


@contextlib.contextmanager
def quiet_flower(verbose: bool) -> Iterator[None]:
    """Keep Flower's and Ray's start-up chatter out of the way unless --verbose."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    names = ["flwr", "ray", "filelock", "datasets", "transformers"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" when the student is saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if bars:
                hf_logging.enable_progress_bar()


# Seconds between dispatcher sweeps. Flower's loop waits 0.1 s (its sweep being costly); a sweep
# here reads a handful of in-flight messages, so a shorter wait cuts each phase's start latency.
DISPATCH_PERIOD = 0.01


def resolve_gpus(
    gpus_per_client: float, cuda_devices: int | None = None, where: str = "this machine"
) -> tuple[float, str]:
    """GPUs to reserve per client, and a note for the user when the request cannot be met.

    ``cuda_devices`` defaults to what torch sees (on a Ray cluster: the GPUs of its best-equipped
    node, named by ``where``). Without CUDA, Ray would build an empty actor pool and Flower stop
    with "ActorPool is empty": running the clients on CPU is what the user can still get, so that
    is what happens, with a note.
    """
    if gpus_per_client < 0:
        raise ValueError(f"--gpus-per-client must be >= 0, got {gpus_per_client}")
    if gpus_per_client == 0:
        return 0.0, ""
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_devices == 0:
        return 0.0, (
            f"no CUDA device{'' if where == 'this machine' else ' in ' + where}: running "
            f"clients on CPU (--gpus-per-client {gpus_per_client:g} ignored)"
        )
    if gpus_per_client > cuda_devices:
        raise ValueError(
            f"--gpus-per-client {gpus_per_client:g} asks for more GPUs per client than the "
            f"{cuda_devices} {where} has; use a fraction such as 0.5 to share one"
        )
    return float(gpus_per_client), ""


@contextlib.contextmanager
def dispatch_to_addressed_nodes() -> Iterator[None]:
    """Make Flower's simulation dispatcher cost O(messages in flight), not O(virtual nodes).

    Flower 1.41's ``vce_api.add_messages_to_queue`` calls ``state.get_message_ins(node_id,
    limit=1)`` for every registered node every 0.1 s (see the module docstring for its cost).
    The replacement (:func:`feddistill.flower_compat.addressed_dispatcher`) makes those same
    calls for only the nodes that have an undelivered message in the in-memory link state, every
    ``DISPATCH_PERIOD``; for any other state class it runs Flower's loop. Restored on exit.
    """
    from feddistill import flower_compat

    with flower_compat.addressed_dispatcher(DISPATCH_PERIOD):
        yield


@contextlib.contextmanager
def record_partitions() -> Iterator[None]:
    """Publish the simulation's node id -> partition id mapping to the server in this process.

    Flower creates the virtual nodes with random ids (``vce_api._register_nodes``, wrapped by
    :func:`feddistill.flower_compat.on_nodes_registered`); the mapping lets
    :func:`feddistill.server.grids.node_order` order nodes by partition. Cleared on exit.
    """
    from feddistill import flower_compat
    from feddistill.server.grids import SIMULATED_PARTITIONS

    def publish(mapping: dict[int, int]) -> None:
        SIMULATED_PARTITIONS.clear()
        SIMULATED_PARTITIONS.update(mapping)

    try:
        with flower_compat.on_nodes_registered(publish):
            yield
    finally:
        SIMULATED_PARTITIONS.clear()


def backend_config(
    cpus_per_client: float, gpus_per_client: float, verbose: bool, ray_address: str | None = None
) -> dict[str, Any]:
    """Flower's Ray backend settings; ``ray_address`` joins that cluster instead of starting one.

    Nothing here sets Ray's ``num_cpus``/``num_gpus`` init arguments, which Ray refuses when
    connecting to an existing cluster: a node's resources are what its ``ray start`` declared.
    """
    init_args: dict[str, Any] = {"include_dashboard": False}
    if ray_address is not None:
        init_args["address"] = ray_address
    if not verbose:
        init_args.update({"logging_level": logging.ERROR, "log_to_driver": False})
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }


def simulate(
    cfg: Config,
    *,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    verbose: bool = False,
    progress: str = "off",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the whole federation; returns the parsed ``results.json``.

    ``progress`` (``off``, ``auto``, ``tty``, ``lines``) draws round progress on stderr;
    ``gpus_per_client`` > 0 without a CUDA device logs a note and runs the clients on CPU.
    ``ray_address`` (``HOST:PORT`` of a running Ray head) runs the clients on that cluster
    instead of a Ray instance of this process; it is checked first (see
    :mod:`feddistill.simulation.cluster`). This process must run on a node of the cluster; the
    clients' ``cache-dir`` should be a folder every node sees at the same path
    (docs/ray-cluster.md says what happens otherwise).
    """
    from feddistill.server.tracking import require_backend

    require_backend(cfg.tracking)  # a missing tracking package: say so before seconds of imports
    offline_environment()
    if cpus_per_client <= 0:
        raise ValueError(f"--cpus-per-client must be > 0, got {cpus_per_client}")
    log = logging.getLogger("feddistill")
    if ray_address is None:
        gpus_per_client, note = resolve_gpus(gpus_per_client)
    else:
        cluster = probe_cluster(ray_address)
        log.info(cluster.summary())
        if cluster.max_node_cpus < cpus_per_client:
            raise ValueError(
                f"--cpus-per-client {cpus_per_client:g}: no node of the Ray cluster at "
                f"{ray_address} has that many CPUs (largest: {cluster.max_node_cpus:g})"
            )
        gpus_per_client, note = resolve_gpus(
            gpus_per_client, cluster.max_node_gpus, f"the Ray cluster at {ray_address}"
        )
        ray_address = cluster.address
    if note:
        log.warning(note)
    if cfg.train.device == "cuda" and gpus_per_client == 0:
        raise ValueError(
            "train.device = 'cuda' but the simulated clients get no GPU "
            + (f"({note.rstrip('.')})" if note else "(--gpus-per-client 0)")
            + ": give them a share with --gpus-per-client (e.g. 0.25), or set "
            "train.device = 'auto' or 'cpu'"
        )
    preflight(cfg)
    from flwr.simulation import run_simulation

    from feddistill.client.app import app as client_app
    from feddistill.server.app import make_server_app

    server_app = make_server_app(cfg.to_flat(), progress=progress)
    with quiet_flower(verbose), dispatch_to_addressed_nodes(), record_partitions():
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_name="ray",
            backend_config=backend_config(cpus_per_client, gpus_per_client, verbose, ray_address),
            verbose_logging=verbose,
        )
    results = Path(cfg.output_dir).expanduser().resolve() / "results.json"
    if not results.exists():
        raise RuntimeError(f"the simulation ended without writing {results}; rerun with --verbose")
    return json.loads(results.read_text())
