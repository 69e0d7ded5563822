"""The validation curve at no extra bytes: each training client evaluates the global it
received on its validation split before it trains, and the server reads those figures as the
previous round's global (docs/aggregation.md, "The validation curve")."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.client import app as real_client
from feddistill.client.work import node_data
from feddistill.codec import encode, parse_spec
from feddistill.distill.train import encode_texts, evaluate, pick_device
from feddistill.models.build import set_arrays
from feddistill.records import payload_record, server_config
from feddistill.run_inputs import initial_models, source_splits
from feddistill.server.output_model import validation_curve
from feddistill.strategies.admission import arrival_evaluation
from tests.conftest import simulate_with, tiny_config
from tests.test_admission import HONEST, SCHEMA, _metrics, _reply, _wrapper
from tests.test_client_app import _context


def test_arrival_figures_are_weighted_by_rows_capped_and_clamped() -> None:
    # two honest clients, one without validation rows (left out), one liar
    honest = arrival_evaluation([(0.5, 1.0, 10), (0.8, 0.5, 30), (0.0, 0.0, 0)], 10.0)
    assert honest == pytest.approx(
        {
            keys.EVAL_ACCURACY: (0.5 * 10 + 0.8 * 30) / 40,
            keys.EVAL_LOSS: (1.0 * 10 + 0.5 * 30) / 40,
            "examples": 40.0,
            "clients": 2.0,
        }
    )
    # the liar claims 1e9 rows and an accuracy of 50: it weighs 10 x the low median (10) at most,
    # and its accuracy counts as 1
    lied = arrival_evaluation([(0.5, 1.0, 10), (0.5, 1.0, 10), (50.0, -3.0, 10**9)], 10.0)
    assert lied is not None
    assert lied[keys.EVAL_ACCURACY] == pytest.approx((0.5 * 20 + 1.0 * 100) / 120)
    assert lied[keys.EVAL_LOSS] == pytest.approx((1.0 * 20 + 0.0 * 100) / 120)
    assert arrival_evaluation([(0.9, 0.1, 0)], 10.0) is None
    assert arrival_evaluation([], 10.0) is None


def test_the_arrival_curve_judges_the_previous_rounds_global() -> None:
    rounds = [
        {"round": 1, "arrival_evaluation": {"eval-accuracy": 0.25}, "federated_evaluation": {}},
        {"round": 2, "arrival_evaluation": {}, "federated_evaluation": {"eval-accuracy": 0.6}},
        {"round": 3, "arrival_evaluation": {"eval-accuracy": float("nan")}},
        {"round": 4, "arrival_evaluation": {"eval-accuracy": 0.7}},
    ]
    assert validation_curve(rounds, "arrival") == [(0, 0.25), (3, 0.7)]
    assert validation_curve(rounds, "arrival", first=1, last_round=2) == []
    assert validation_curve(rounds, "federated") == [(2, 0.6)]
    assert validation_curve(rounds, "") == []


def test_a_training_client_reports_the_received_global_on_its_validation_split(
    tmp_path: Path,
) -> None:
    # Arrange: the initial student as the received global (a zero delta, stateless downlink)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    cfg = tiny_config(
        tmp_path, **{"compression.downlink": "q8", "compression.downlink-protocol": "stateless"}
    )
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    config = {**server_config(cfg.to_json(), labels.names, models.digest, b"run-A-id")}
    config[keys.SERVER_ROUND] = 1
    content = RecordDict(
        {
            keys.ARRAYS: payload_record(encode(zero, parse_spec("q8")).payload),
            keys.CONFIG: ConfigRecord(config),
        }
    )
    context = _context(tmp_path)

    # Act
    reply = real_client.train(
        Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context
    )

    # Assert: the figures are those of the initial student on this node's validation rows
    assert not reply.has_error()
    metrics = reply.content.metric_records[keys.METRICS]
    data = node_data(cfg, labels, dict(context.node_config))
    student = copy.deepcopy(models.student)
    set_arrays(student, models.init_arrays)
    val = encode_texts(
        models.student_tokenizer, data.val.texts, data.val.labels, cfg.data.max_length
    )
    direct = evaluate(student, val, device=pick_device("cpu"))
    assert len(data.val) > 0 and metrics[keys.ARRIVAL_EXAMPLES] == float(len(data.val))
    assert metrics[keys.ARRIVAL_ACCURACY] == pytest.approx(direct.accuracy, abs=1e-6)
    assert metrics[keys.ARRIVAL_LOSS] == pytest.approx(direct.loss, rel=1e-5)


def test_the_wrapper_weighs_arrival_figures_itself_and_hands_the_inner_strategy_none() -> None:
    rng = np.random.default_rng(1)
    wrapper = _wrapper()
    zero = {n: np.zeros(shape, np.float32) for n, shape in SCHEMA}
    payload = encode(zero, parse_spec("none")).payload
    with_val = [
        _metrics(**{keys.ARRIVAL_EXAMPLES: 4.0, keys.ARRIVAL_LOSS: 1.0, keys.ARRIVAL_ACCURACY: a})
        for a in rng.uniform(0, 1, len(HONEST) - 1)
    ]
    older = {  # an older client without the figures still trains
        k: v for k, v in _metrics().items() if k not in keys.ARRIVAL_KEYS
    }
    replies = [_reply(n, payload, m) for n, m in zip(HONEST, [*with_val, older], strict=True)]

    arrays, metrics = wrapper.aggregate_train(1, replies)

    stats = wrapper.traffic[1]
    assert arrays is not None and stats.replies == len(HONEST)
    assert stats.arrival_metrics["clients"] == len(with_val)
    expected = np.mean([m[keys.ARRIVAL_ACCURACY] for m in with_val])
    assert stats.arrival_metrics[keys.EVAL_ACCURACY] == pytest.approx(expected)
    assert metrics is not None and not set(metrics) & set(keys.ARRIVAL_KEYS)


def test_the_default_federation_gets_its_curve_from_arrival_and_sends_no_evaluation(
    tmp_path: Path,
) -> None:
    """3 rounds of the tiny federation with federated evaluation off (the default): each round
    records its clients' arrival figures, no evaluation message is sent, and the rising rule
    still has its curve (and keeps the rising epochs: too few rounds for a plateau)."""
    cfg = tiny_config(
        tmp_path,
        **{
            "rounds": 3,
            "server.evaluate-clients": 0,
            "train.rising-epochs": 2,
            "server.local-only": "off",
        },
    )
    assert cfg.validation_curve == "arrival"

    results = simulate_with(cfg, real_client.app)

    rounds = results["rounds"]
    assert [r["eval_bytes_down"] for r in rounds] == [0, 0, 0]
    assert all(r["federated_evaluation"] == {} for r in rounds)
    for r in rounds:
        arrived = r["arrival_evaluation"]
        assert arrived["examples"] > 0 and 0.0 <= arrived[keys.EVAL_ACCURACY] <= 1.0
        assert not set(r["train"]) & set(keys.ARRIVAL_KEYS)
    assert [r["local_epochs"] for r in rounds] == [2, 2, 2]
    assert results["initial"]["accuracy"] is not None
