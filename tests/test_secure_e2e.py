"""Secure aggregation end to end through Flower's simulation engine (Ray): every round's
protocol runs over the Message API, its bytes are recorded by step, nothing fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from feddistill.simulation.engine import simulate
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def test_tiny_federation_with_secure_aggregation_completes_and_counts_every_step(
    tmp_path: Path,
) -> None:
    # Prepare: 4 clients, all sampled, threshold 3 (one may drop after masking)
    cfg = tiny_config(
        tmp_path,
        **{
            "rounds": 2,
            "data.num-clients": 4,
            "server.clients-per-round": 4,
            "server.evaluate-clients": 4,
            "server.weighting": "uniform",
            "server.local-only": "off",
            "secure.aggregation": True,
            "secure.dropout": 0.25,
        },
    )

    # Execute
    results = simulate(cfg)

    # Assert: each round aggregated all four masked vectors and recorded the protocol's bytes
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["round_failure"] is None and r["failures"] == 0
        assert r["secure_survivors"] == 4
        assert set(r["secure_bytes"]) == {"setup", "share", "unmask"}
        assert all(v > 0 for v in r["secure_bytes"].values())
        assert r["secure_dropouts"] == 0 and 0 < r["secure_bits_per_weight"] < 32
    assert results["final"]["accuracy"] is not None


def test_distributed_dp_inside_secure_aggregation_reports_epsilon_every_round(
    tmp_path: Path,
) -> None:
    # Prepare: the same federation, the clients adding Skellam noise of multiplier 1
    cfg = tiny_config(
        tmp_path,
        **{
            "rounds": 2,
            "data.num-clients": 4,
            "server.clients-per-round": 4,
            "server.evaluate-clients": 4,
            "server.weighting": "uniform",
            "server.local-only": "off",
            "secure.aggregation": True,
            "secure.dropout": 0.25,
            "privacy.mode": "distributed",
            "privacy.noise-multiplier": 1.0,
        },
    )

    # Execute
    results = simulate(cfg)

    # Assert: every round aggregated, with its epsilon growing and the noise on the mean
    rounds = results["rounds"]
    assert [r["round_failure"] for r in rounds] == [None, None]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]
    assert all(r["privacy"]["noise_std"] > 0 for r in rounds)
    assert results["final"]["privacy_guarantee"].startswith(f"(epsilon={eps[1]:.3g},")
