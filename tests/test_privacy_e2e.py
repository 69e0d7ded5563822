"""Central DP through Flower's simulation engine: epsilon per round, the guarantee at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from feddistill.simulation.engine import simulate
from tests.conftest import tiny_config

ADAPTIVE = {
    "privacy.adaptive-clip": True,
    "privacy.clipped-count-stddev": 1.0,
    "privacy.noise-multiplier": 0.0,
    "privacy.target-epsilon": 20.0,
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", [{}, ADAPTIVE], ids=["fixed-clip", "adaptive-target-eps"])
def test_tiny_federation_with_central_dp_writes_epsilon_per_round(
    tmp_path: Path, variant: dict
) -> None:
    # Prepare: 4 clients, 2 expected per round (Poisson, q = 0.5), error feedback on (default
    # uplink); a fixed clip and sigma, or an adaptive clip and sigma derived from epsilon 20.
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
            **variant,
        },
    )

    # Execute
    results = simulate(cfg)

    # Assert
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    eps = [r["privacy"]["epsilon"] for r in rounds]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and eps[0] < eps[-1]
    sigma = rounds[0]["privacy"]["noise_multiplier"]
    for r in rounds:
        p = r["privacy"]
        assert p["delta"] == pytest.approx(4**-1.1) and p["sampling_rate"] == 0.5
        assert p["noise_multiplier"] == sigma
        assert "norm-bit" not in r["train"]  # the exact clipped count stays out of results
        if not variant:
            assert sigma == 1.0 and p["clip"] == 0.5
            if r["replies"]:
                assert 0.0 <= p["clipped_fraction"] <= 1.0
                assert p["noise_std"] == pytest.approx(1.0 * 0.5 / 2)
    if variant:  # sigma was derived for 3 rounds: epsilon lands at (not above) the target
        assert eps[-1] <= 20.0 and eps[-1] == pytest.approx(20.0, rel=0.01)
    final = results["final"]["privacy_guarantee"]
    assert final.startswith(f"(epsilon={eps[-1]:.3g}, delta={4**-1.1:.3g})-DP for each client's")
