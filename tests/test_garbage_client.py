"""One client sends garbage every round: the round completes with the others (issue 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from feddistill import keys
from feddistill.client import app as real_client
from feddistill.records import payload_record
from tests.conftest import simulate_with, tiny_config

garbage_app = ClientApp()


@garbage_app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real_client.train(msg, context)
    if int(context.node_config["partition-id"]) == 0 and not reply.has_error():
        junk = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint8)
        reply.content[keys.ARRAYS] = payload_record(junk)
    return reply


@garbage_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real_client.evaluate(msg, context)


def test_round_completes_without_the_garbage_client(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        **{
            "compression.uplink": "topk:0.1+q4+ef",
            "compression.downlink": "q8",
            "compression.downlink-protocol": "stateless",
            "server.local-only": "off",
        },
    )
    results = simulate_with(cfg, garbage_app)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert r["replies"] == 2 and r["failures"] == 1
        (reason,) = r["failure_reasons"]
        assert "invalid payload" in reason
    assert results["final"]["failures_total"] == 2
    assert results["final"]["accuracy"] is not None


refusing_app = ClientApp()


@refusing_app.train()
def refuse(msg: Message, context: Context) -> Message:
    return real_client._error_reply(msg, ValueError("this node refuses every round"))


@refusing_app.evaluate()
def evaluate_refusing(msg: Message, context: Context) -> Message:
    return real_client.evaluate(msg, context)


def test_run_stops_after_max_failed_rounds_in_a_row(tmp_path: Path) -> None:
    """Every client refuses: the run stops after server.max-failed-rounds rounds, not after
    all of them, and results.json says why; the student is still written."""
    cfg = tiny_config(
        tmp_path,
        **{"rounds": 5, "server.max-failed-rounds": 2, "server.local-only": "auto"},
    )
    results = simulate_with(cfg, refusing_app)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    stopped = results["final"]["stopped"]
    assert stopped["round"] == 2
    assert "rounds 1-2 all left the global unchanged" in stopped["reason"]
    assert "this node refuses every round" in stopped["reason"]
    assert results["final"]["local_only_accuracy"] is None  # a stopped run skips the baseline
    assert (Path(cfg.output_dir) / "student").is_dir()
