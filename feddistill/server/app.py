"""The ServerApp: parse the run config once, then hand over to :func:`run_server`."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from feddistill.config import Config, parse_config
from feddistill.server.run import run_server


def setup_logging(level: int = logging.INFO) -> None:
    """Our round lines go to stdout even when Flower's own logs are quieted."""
    logger = logging.getLogger("feddistill")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def make_server_app(
    overrides: Mapping[str, Any] | None = None, *, progress: str = "off"
) -> ServerApp:
    """A ServerApp whose config is ``context.run_config`` updated with ``overrides``.

    ``flwr run`` uses the module-level ``app`` (no overrides); ``feddistill simulate`` passes
    its command-line options here because the simulation engine hands the app no run config,
    and asks for a progress display (``progress``, see :func:`run_server`).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg: Config = parse_config({**dict(context.run_config), **dict(overrides or {})})
        if overrides is None and cfg.mode == "simulation":
            cfg = match_federation_size(cfg, grid)
        run_server(grid, cfg, progress=progress)

    return server_app


def match_federation_size(cfg: Config, grid: Grid, settle_s: float = 3.0) -> Config:
    """Under ``flwr run`` the federation, not our config, decides how many nodes exist.

    Simulated nodes learn their partition from ``partition-id`` in ``[0, num-supernodes)``, so
    ``data.num-clients`` must equal the number of nodes; when it does not (Flower's default
    local federation has 2 nodes), follow the federation and say so instead of waiting forever
    for nodes that will never connect.
    """
    log = logging.getLogger("feddistill")
    count, stable_since = 0, time.monotonic()
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
        elif count and time.monotonic() - stable_since >= settle_s:
            break
        time.sleep(0.2)
    if count and count != cfg.data.num_clients:
        log.warning(
            "the federation has %d nodes but data.num-clients = %d: partitioning over %d clients "
            "(set --federation-config 'num-supernodes=%d' to keep the config's value)",
            count,
            cfg.data.num_clients,
            count,
            cfg.data.num_clients,
        )
        server = cfg.server
        cfg = cfg.with_overrides(
            {
                "data.num-clients": count,
                "server.clients-per-round": float(min(server.clients_per_round, count))
                if server.clients_per_round >= 1
                else server.clients_per_round,
                "server.evaluate-clients": float(min(server.evaluate_clients, count))
                if server.evaluate_clients >= 1
                else server.evaluate_clients,
            }
        )
    return cfg


app = make_server_app()
