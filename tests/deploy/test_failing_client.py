"""One of three devices fails every round (its file lacks the label column): the rounds go on with
the other two, and results.json names the device and its error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.federation import Federation, write_csv

pytestmark = pytest.mark.deploy


def test_a_device_with_bad_data_fails_alone(tmp_path: Path, federation: Federation) -> None:
    # Prepare: three registered devices; sn2's file has its labels under another column name.
    fed = federation
    fed.start_superlink()
    data = {
        "sn0": write_csv(tmp_path / "sn0.csv", 60, seed=0),
        "sn1": write_csv(tmp_path / "sn1.csv", 60, seed=1),
        "sn2": write_csv(tmp_path / "sn2.csv", 60, seed=2, label_column="topic"),
    }
    for device, path in data.items():
        key = fed.key(device)
        fed.register(device, key)
        fed.start_supernode(device, key, path)

    # Execute: two rounds that sample all three devices (training only, to keep it short).
    out = tmp_path / "run"
    fed.flwr_run(out, write_csv(tmp_path / "test.csv", 80, seed=99), n=3, n_eval=0, rounds=2)

    # Assert: each round aggregated two replies and recorded sn2's error with its node id.
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    bad = fed.node_ids["sn2"]
    for r in results["rounds"]:
        assert r["replies"] == 2 and r["failures"] == 1
        (reason,) = r["failure_reasons"]
        assert reason.startswith(f"node {bad}: client error: DataError: data-path "), reason
        assert "data.label-column='label' is not a column" in reason, reason
        assert "'topic'" in reason  # the columns the file does have
        assert str(bad) not in r["bytes_up_per_client"]
    assert results["final"]["failures_total"] == 2
