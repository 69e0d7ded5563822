"""Central DP through Flower's simulation engine: epsilon per round, the guarantee at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from feddistill.simulation.engine import simulate
from tests.conftest import tiny_config


@pytest.mark.slow
def test_tiny_federation_with_central_dp_writes_epsilon_per_round(tmp_path: Path) -> None:
    # Prepare: 4 clients, 2 expected per round (Poisson, q = 0.5), fixed clip, error feedback on.
    cfg = tiny_config(
        tmp_path,
        **{
            "rounds": 3,
            "data.num-clients": 4,
            "server.clients-per-round": 2,
            "server.evaluate-clients": 2,
            "server.weighting": "uniform",
            "server.local-only": "off",
            "privacy.mode": "central",
            "privacy.clip": 0.5,
            "privacy.noise-multiplier": 1.0,
        },
    )

    # Execute
    results = simulate(cfg)

    # Assert
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1]
    for r in rounds:
        p = r["privacy"]
        assert p["delta"] == pytest.approx(4**-1.1)
        assert p["noise_multiplier"] == 1.0 and p["clip"] == 0.5 and p["sampling_rate"] == 0.5
        assert "norm-bit" not in r["train"]  # the exact clipped count stays out of results
        if r["replies"]:
            assert 0.0 <= p["clipped_fraction"] <= 1.0
            assert p["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    final = results["final"]["privacy_guarantee"]
    assert final.startswith(f"(epsilon={eps[-1]:.3g}, delta={4**-1.1:.3g})-DP for each client's")
