"""Secure aggregation through the real apps: the server wrapper's steps over a Grid that hands
each message to the ClientApp, with dropouts, counted bytes and a failed round kept apart."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from feddistill.client.app import app
from feddistill.config import ConfigError
from feddistill.run_inputs import initial_models, source_splits
from feddistill.strategies.factory import build_strategy
from tests.conftest import tiny_config

SECURE = {
    "secure.aggregation": True,
    "server.weighting": "uniform",
    "data.num-clients": 4,
    "server.clients-per-round": 4,
    "server.evaluate-clients": 4,
    "secure.dropout": 0.25,  # threshold 3 of 4
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


class LoopbackGrid:
    """Just what the strategies ask of a Grid; each message goes to the ClientApp of its node.

    ``drop[action]`` lists the nodes that never answer messages of that action.
    """

    def __init__(self, tmp_path: Path, nodes: int) -> None:
        self.contexts = {
            100 + pid: Context(
                run_id=1,
                node_id=100 + pid,
                node_config={"partition-id": pid, "num-partitions": nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(nodes)
        }
        self.drop: dict[str, set[int]] = {}
        self.ids = itertools.count(1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{next(self.ids)}"
            if node in self.drop.get(msg.metadata.message_type, set()):
                continue
            replies.append(app(msg, self.contexts[node]))
        return replies


def _setup(tmp_path: Path, **overrides):
    cfg = tiny_config(tmp_path, **{**SECURE, **overrides})
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    strategy = build_strategy(cfg, 4, models.schema, models.init_arrays)
    from feddistill.records import server_config

    config = ConfigRecord(server_config(cfg.to_json(), labels.names, models.digest, b"run-A-id"))
    arrays = ArrayRecord({n: Array(a) for n, a in models.init_arrays.items()})
    return cfg, models, strategy, config, arrays


def _train_round(strategy, arrays, config, grid, server_round=1):
    messages = list(strategy.configure_train(server_round, arrays, config, grid))
    replies = grid.send_and_receive(messages)
    return messages, strategy.aggregate_train(server_round, replies)


def test_a_secure_round_moves_the_global_on_the_shared_pattern_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feddistill.secagg import protocol
    from feddistill.secagg.quantize import dequantize_one

    cfg, models, strategy, config, arrays = _setup(tmp_path)
    grid = LoopbackGrid(tmp_path, 4)
    plain: list[np.ndarray] = []  # what each client masked: only this test looks
    masked_input = protocol.Client.masked_input

    def spy(self, values, received, spec):
        plain.append(dequantize_one(np.asarray(values), spec))
        return masked_input(self, values, received, spec)

    monkeypatch.setattr(protocol.Client, "masked_input", spy)

    messages, (new, _) = _train_round(strategy, arrays, config, grid)

    assert len(messages) == 4 and new is not None
    before = np.concatenate([models.init_arrays[n].ravel() for n in models.names])
    after = np.concatenate([new[n].numpy().ravel() for n in models.names])
    moved = np.flatnonzero(before != after)
    assert 0 < len(moved) <= round(cfg.secure.keep * before.size)  # the round's pattern
    # the server's step is server.lr x the mean of what the clients masked, nothing else
    from feddistill.secagg.quantize import shared_pattern

    assert strategy.secure is not None and len(plain) == 4
    pattern = shared_pattern(strategy.secure.pattern_seed, 1, before.size, cfg.secure.keep)
    expected = cfg.server.lr * np.mean(plain, axis=0)
    np.testing.assert_allclose((after - before)[pattern], expected, atol=1e-6)
    assert np.all(np.isfinite(after))
    stats = strategy.traffic[1]
    assert stats.replies == 4 and stats.failures == []
    assert set(stats.secure_bytes) == {"setup", "share", "unmask"}
    assert all(v > 0 for v in stats.secure_bytes.values())
    assert stats.secure_dropouts == 0
    # all steps of a client, per exchanged weight: far below float32's 32 bits
    assert 0.0 < stats.secure_bits_per_weight < 32.0
    # a reply is the masked vector, one byte a shared weight (m = 5 + 2 bits), plus ~1 KB of
    # metrics (the arrival figures included) and record framing
    kept = round(cfg.secure.keep * before.size)
    assert all(kept < up < kept + 1280 for up in stats.bytes_up.values()), (kept, stats.bytes_up)


def test_a_dropout_after_masking_is_survived_and_too_many_fail_the_round(tmp_path: Path) -> None:
    _, _, strategy, config, arrays = _setup(tmp_path)
    grid = LoopbackGrid(tmp_path, 4)
    grid.drop["train"] = {101}  # shared its keys, never sent its masked vector

    _, (new, _) = _train_round(strategy, arrays, config, grid)

    assert new is not None and strategy.traffic[1].replies == 3
    assert strategy.traffic[1].secure_dropouts == 1
    assert [n for n, _ in strategy.traffic[1].failures] == [101]

    grid.drop["train"] = {101, 102}  # two of four: below the threshold of 3
    _, (new, _) = _train_round(strategy, arrays, config, grid, server_round=2)
    assert new is None
    assert "threshold is 3" in strategy.traffic[2].round_failure


def test_secure_aggregation_is_refused_for_rules_that_need_each_update(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs each update on its own"):
        tiny_config(tmp_path, **{**SECURE, "server.strategy": "fedmedian"})
    with pytest.raises(ConfigError, match=r"server\.weighting = 'uniform'"):
        tiny_config(tmp_path, **{**SECURE, "server.weighting": "examples"})
    with pytest.raises(ConfigError, match="at least 3 clients per round"):
        tiny_config(tmp_path, **{**SECURE, "server.clients-per-round": 2})


def test_a_round_left_with_two_clients_after_setup_sends_no_update(tmp_path: Path) -> None:
    """Threshold 3 of 4 would allow one dropout, but the setup never goes ahead with fewer than
    three clients: with two, each would learn the other's update from the sum."""
    _, _, strategy, config, arrays = _setup(tmp_path, **{"secure.dropout": 0.49})  # t = 3
    grid = LoopbackGrid(tmp_path, 4)
    grid.drop["train.secagg_setup"] = {101, 102}

    messages, (new, _) = _train_round(strategy, arrays, config, grid)

    assert messages == [] and new is None
    assert sorted(n for n, _ in strategy.traffic[1].failures) == [101, 102]
    assert "setup left fewer clients" in strategy.traffic[1].round_failure  # named, no crash
