"""A real deployment on loopback: TLS SuperLink with node authentication, SuperNodes with their
own data files, ``flwr run``, a resumed run, then ``feddistill export`` and ``predict``.

Every command is the one docs/deploy.md shows (see :mod:`tests.deploy.federation`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.deploy.federation import LABELS, Federation, command, write_csv

pytestmark = pytest.mark.deploy


def test_tls_federation_with_node_auth(tmp_path: Path, federation: Federation) -> None:
    # Prepare: certificates, SuperLink, keys; two registered devices and one unknown key.
    fed = federation
    fed.start_superlink()
    keys = {device: fed.key(device) for device in ("sn0", "sn1", "rogue")}
    for device in ("sn0", "sn1"):
        fed.register(device, keys[device])
    listed = fed.run(command("list", federation=fed.name)).stdout
    assert all(str(fed.node_ids[d]) in listed for d in ("sn0", "sn1")), listed
    data = {d: write_csv(tmp_path / f"{d}.csv", 60, seed=i) for i, d in enumerate(keys)}
    test_csv = write_csv(tmp_path / "test.csv", 80, seed=99)
    for device in ("sn0", "sn1"):
        fed.start_supernode(device, keys[device], data[device])
    rogue = fed.start_supernode("rogue", keys["rogue"], data["rogue"])

    # Execute: two rounds with compressed updates both ways.
    out = tmp_path / "run"
    fed.flwr_run(out, test_csv, n=2, n_eval=2, rounds=2)

    # Assert: every round heard both devices, compressed, with centralized evaluation.
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mode"] == "deployment"
    assert results["labels"] == LABELS.split(",")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    ids = {str(fed.node_ids["sn0"]), str(fed.node_ids["sn1"])}
    for r in results["rounds"]:
        assert r["replies"] == 2 and r["failures"] == 0, r["failure_reasons"]
        assert set(r["bytes_up_per_client"]) == ids and set(r["bytes_down_per_client"]) == ids
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["compression_ratio_up"] > 2.0  # topk:0.1+q8 on the uplink
        assert 0.0 <= r["accuracy"] <= 1.0  # data.test-source on the server
        assert "eval-accuracy" in r["federated_evaluation"]
        # each device also judged the global it received on its own validation rows
        assert r["arrival_evaluation"]["clients"] == 2, r["arrival_evaluation"]
    assert results["final"]["rounds_completed"] == 2
    assert results["final"]["local_only_accuracy"] is None  # no client data on the server
    assert (out / "state" / "server.npz").is_file()

    # The unregistered key was refused and its SuperNode gave up.
    deadline = time.time() + 60
    while rogue.proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert rogue.proc.returncode not in (None, 0), rogue.output()
    assert "Failed to activate SuperNode" in rogue.output()

    # Resume: raise `rounds` and continue where the run stopped (same node ids, same SuperLink).
    fed.flwr_run(out, test_csv, n=2, n_eval=2, rounds=3, resume=" resume=true")
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    assert [e["from_round"] for e in results["events"] if e["event"] == "resume"] == [2]
    assert results["rounds"][2]["replies"] == 2

    # The student exports for CPU and predicts one of the run's labels.
    fed.run(command("export", out=out), timeout=120)
    assert (out / "export" / "export.json").is_file()
    printed = fed.run(command("predict", out=out), timeout=120).stdout
    label = printed.split("\t")[0]
    assert label in LABELS.split(","), printed
