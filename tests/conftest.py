"""Shared fixtures: tiny configs that run in seconds on 2 CPU cores, fully offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from feddistill.config import Config, parse_config

for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

TINY: dict[str, Any] = {
    "rounds": 2,
    "data.num-examples": 300,
    "data.num-test": 100,
    "data.num-clients": 3,
    "data.min-partition-size": 20,
    "data.max-length": 24,
    "model.teacher": "builtin:micro",
    "model.student-layers": 1,
    "teacher.epochs": 1,
    "train.local-epochs": 1,
    "train.rising-epochs": 0,  # 1 epoch every round: the tiny runs stay fast
    "server.clients-per-round": 3,
    "server.evaluate-clients": 3,
    "server.round-timeout": 300.0,
}


def tiny_config(tmp_path: Path, **overrides: Any) -> Config:
    flat = {**TINY, "output-dir": str(tmp_path / "out"), **overrides}
    return parse_config(flat)


def simulate_with(cfg: Config, client_app: Any) -> dict[str, Any]:
    """Run ``cfg`` through Flower's simulation engine with ``client_app`` (e.g. one whose node
    misbehaves) and the project's ServerApp; the run's results.json."""
    import json
    import warnings

    from flwr.simulation import run_simulation

    from feddistill.server.app import make_server_app
    from feddistill.simulation.engine import backend_config, offline_environment

    offline_environment()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg.to_flat()),
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config(1.0, 0.0, verbose=False),
        )
    return json.loads((Path(cfg.output_dir) / "results.json").read_text())


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path)
