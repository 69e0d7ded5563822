"""Two hostile clients in a real 3-node simulation: the rounds complete, the model stays finite.

Node of partition 0 sends a 1e6-valued update with a metric no schema declares; node of
partition 1 claims 1e12 examples. Under ``run_simulation`` the server does not know the
partition sizes (``feddistill simulate`` would cap it at the partition's size), so the claim is
capped at ``server.max-examples-factor`` times the round's median; the huge update is scaled
down to the round's median norm by the norm bound (``clip-to-median``, the default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from feddistill import keys
from feddistill.client import app as real_client
from feddistill.client.work import load_initial
from feddistill.codec import encode, parse_spec
from feddistill.records import payload_record
from tests.conftest import simulate_with, tiny_config

hostile_app = ClientApp()


@hostile_app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real_client.train(msg, context)
    pid = int(context.node_config["partition-id"])
    if reply.has_error() or pid > 1:
        return reply
    metrics = dict(reply.content[keys.METRICS])
    if pid == 0:
        inp = real_client.unpack(msg)
        models = load_initial(inp.cfg, inp.labels, inp.init_digest)
        huge = {n: np.full(s, 1e6, np.float32) for n, s in models.schema}
        spec = parse_spec(inp.cfg.compression.uplink)
        reply.content[keys.ARRAYS] = payload_record(encode(huge, spec).payload)
        metrics["bonus"] = 1.0
    else:
        metrics[keys.NUM_EXAMPLES] = 1e12
    reply.content[keys.METRICS] = MetricRecord(metrics)
    return reply


@hostile_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real_client.evaluate(msg, context)


@pytest.mark.slow
def test_rounds_complete_and_the_model_stays_finite(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        **{
            "compression.uplink": "topk:0.1+q4+ef",
            "compression.downlink": "q8",
            "compression.downlink-protocol": "stateless",
            "server.local-only": "off",
            "server.round-timeout": 900.0,  # round 1 fine-tunes teachers; this machine is shared
        },
    )
    results = simulate_with(cfg, hostile_app)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert not r["failure_reasons"] and r["replies"] == 3
        ((clipped),) = r["clipped"]
        norms = sorted(r["update_norms"].values())
        assert clipped["norm"] == pytest.approx(norms[-1]) and clipped["norm"] > 1e6
        assert clipped["bound"] == pytest.approx(norms[1])  # the low median of three
        ((capped),) = r["capped_examples"]
        assert capped["claimed"] == 10**12 and capped["cap"] < 10**5
        assert not r["aggregation_errors"]
    assert results["final"]["accuracy"] is not None
    for r in (1, 2):
        saved = load_file(str(Path(cfg.output_dir) / "checkpoints" / f"round-{r:04d}.safetensors"))
        assert all(np.isfinite(a).all() for a in saved.values())
