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
    "server.clients-per-round": 3,
    "server.evaluate-clients": 3,
    "server.round-timeout": 300.0,
}


def tiny_config(tmp_path: Path, **overrides: Any) -> Config:
    flat = {**TINY, "output-dir": str(tmp_path / "out"), **overrides}
    return parse_config(flat)


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return tiny_config(tmp_path)
