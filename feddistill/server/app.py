"""The ServerApp: parse the run config once, then hand over to :func:`run_server`."""

from __future__ import annotations

import logging
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


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is ``context.run_config`` updated with ``overrides``.

    ``flwr run`` uses the module-level ``app`` (no overrides); ``feddistill simulate`` passes
    its command-line options here because the simulation engine hands the app no run config.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        cfg: Config = parse_config({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, cfg)

    return server_app


app = make_server_app()
