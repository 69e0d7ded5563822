"""Run the federation on Flower's simulation engine (Ray backend) from Python.

``flwr.simulation.run_simulation`` is marked deprecated in Flower 1.41 in favour of the
``flwr run`` command line, which has no Python-API equivalent; ``feddistill simulate`` needs an
in-process call (its options become the ServerApp's config), so this module is the one place that
calls it, with the deprecation notice silenced. ``flwr run .`` remains fully supported and runs the
very same ServerApp/ClientApp.
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
from feddistill.task import partitions, source_splits

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
    names = ["flwr", "ray", "filelock", "datasets", "transformers"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def backend_config(cpus_per_client: float, gpus_per_client: float, verbose: bool) -> dict[str, Any]:
    init_args: dict[str, Any] = {"include_dashboard": False}
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
) -> dict[str, Any]:
    """Run the whole federation; returns the parsed ``results.json``."""
    offline_environment()
    from flwr.simulation import run_simulation

    from feddistill.client.app import app as client_app
    from feddistill.server.app import make_server_app

    preflight(cfg)
    server_app = make_server_app(cfg.to_flat())
    with quiet_flower(verbose):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_name="ray",
            backend_config=backend_config(cpus_per_client, gpus_per_client, verbose),
            verbose_logging=verbose,
        )
    results = Path(cfg.output_dir).expanduser().resolve() / "results.json"
    if not results.exists():
        raise RuntimeError(f"the simulation ended without writing {results}; rerun with --verbose")
    return json.loads(results.read_text())
