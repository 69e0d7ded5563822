"""Secure aggregation in a real deployment on loopback: a TLS SuperLink with node
authentication, four SuperNodes with their own data (three sampled a round), two rounds, and
the first SuperNode of round 2 to mask its update killed then (its error-feedback residual of
round 2 is on disk, which happens just before its masked vector is sent).

Whether the kill lands before that vector leaves (the node is then a dropout of the masked
step) or after it (a dropout of the unmasking step) depends on timing; both are dropouts after
masking that SecAgg+ must survive with threshold 2 of 3, and the test accepts either.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.deploy.federation import TINY_MODEL, Federation, command, kill_tree, write_csv

pytestmark = pytest.mark.deploy

SECURE = (
    ' secure.aggregation=true server.weighting="uniform" secure.dropout=0.34'
    " server.round-timeout=300 teacher.max-minutes=1"
)
# Each of a secure round's four exchanges starts a fresh ClientApp process per node (torch and
# transformers imported anew): round 1 takes about 117 s on an idle 2-core machine with clients
# training for 5 s, so a 120 s timeout left no margin on a loaded CI runner.


def test_secure_aggregation_survives_a_supernode_killed_after_masking(
    tmp_path: Path, federation: Federation
) -> None:
    # Prepare: four registered devices with their own data, three sampled a round, so the run
    # can still sample three once one is gone
    fed = federation
    fed.start_superlink()
    devices = ("sn0", "sn1", "sn2", "sn3")
    keys = {d: fed.key(d) for d in devices}
    for d in devices:
        fed.register(d, keys[d])
    data = {d: write_csv(tmp_path / f"{d}.csv", 60, seed=i) for i, d in enumerate(devices)}
    test_csv = write_csv(tmp_path / "test.csv", 80, seed=99)
    nodes = {d: fed.start_supernode(d, keys[d], data[d]) for d in devices}

    # Execute: two rounds; in round 2, kill the first device that has masked its update
    out = tmp_path / "run"
    argv = command(
        "run",
        federation=fed.name,
        labels="world,sports,business,science",
        n=4,
        n_eval=2,
        test=test_csv,
        rounds=2,
        out=out,
        model=TINY_MODEL + SECURE,
        resume="",
    )
    argv = [a.replace("server.clients-per-round=4", "server.clients-per-round=3") for a in argv]
    run = fed.processes.start("flwr-run", argv, fed.env("operator"))
    deadline = time.time() + 400
    killed = None
    while killed is None:
        for d in devices:
            if list((fed.root / "cache" / d).rglob("residual-*-000002.npz")):
                killed = d
                break
        else:
            assert run.proc.poll() is None, run.output()[-4000:]
            assert time.time() < deadline, "no device masked a round-2 update:\n" + run.output()
            time.sleep(0.02)
    kill_tree(nodes[killed].proc.pid)
    fed.processes.wait(run, 600)

    # Assert: both rounds summed securely; round 2 with the killed device named as dropped
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    first, second = rounds
    assert first["round_failure"] is None and first["secure_survivors"] == 3
    assert first["secure_dropouts"] == 0 and first["failures"] == 0, first["failure_reasons"]
    assert second["round_failure"] is None, (second["round_failure"], second["failure_reasons"])
    dead = str(fed.node_ids[killed])
    assert any(r.startswith(f"node {dead}:") for r in second["failure_reasons"]), second
    assert second["secure_survivors"] + second["secure_dropouts"] == 3
    assert set(second["secure_bytes"]) == {"setup", "share", "unmask"}
    assert 0.0 <= second["accuracy"] <= 1.0
