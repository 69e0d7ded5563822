"""Fixtures of the deployment tests: every process they start is stopped, even on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.federation import Federation, Processes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "logs")
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def federation(tmp_path: Path, processes: Processes) -> Federation:
    return Federation(tmp_path / "federation", processes)
