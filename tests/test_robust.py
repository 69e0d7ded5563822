"""Robust aggregation: Flower's Krum, MultiKrum, Bulyan, FedMedian, FedTrimmedAvg through the
compressed wrapper; the settings checked against the clients per round; short rounds skipped.

Parity: with the "none" codec, the strategy ``build_strategy`` makes from the config gives
exactly what Flower's own class gives on the same dense replies (one of them an attacker's).
"""

from __future__ import annotations

import inspect
import logging
import re
import shlex
from pathlib import Path

import flwr.serverapp.strategy as flower_strategies
import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.aggregation import STRATEGIES, requirement, trim_needed
from feddistill.cli import SIMULATE_OPTIONS, main
from feddistill.codec import encode, parse_spec
from feddistill.config import ConfigError, ServerConfig, parse_config
from feddistill.records import payload_record
from feddistill.server.results import RunRecord
from feddistill.strategies import CompressedStrategy, build_strategy
from feddistill.strategies.robust import ReplyFloor

SCHEMA = [("layer.weight", (6, 5)), ("layer.bias", (6,))]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SCHEMA}


def _request(node: int) -> Message:
    return Message(
        RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )


def _reply(node: int, record: ArrayRecord, n: int, request: Message | None = None) -> Message:
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0})
    content = RecordDict({keys.ARRAYS: record, keys.METRICS: metrics})
    return Message(content, reply_to=request or _request(node))


def _encoded(delta: dict[str, np.ndarray]) -> ArrayRecord:
    return payload_record(encode(delta, parse_spec("none")).payload)


def _cfg(strategy: str, per_round: int, **extra: object):
    return parse_config(
        {
            "server.strategy": strategy,
            "data.num-clients": per_round,
            "server.clients-per-round": per_round,
            "server.evaluate-clients": 0,
            "compression.uplink": "none",
            "compression.downlink": "none",
            **extra,
        }
    )


def _built(cfg, initial: dict[str, np.ndarray], global_w: dict[str, np.ndarray]):
    strategy = build_strategy(cfg, cfg.data.num_clients, SCHEMA, initial)
    strategy._receive_global(ArrayRecord({n: Array(a) for n, a in global_w.items()}))
    return strategy


# -- one declaration ----------------------------------------------------------------------------
def test_every_declared_strategy_exists_in_flower_with_its_arguments() -> None:
    fields = set(ServerConfig.__dataclass_fields__)
    for name, choice in STRATEGIES.items():
        cls = getattr(flower_strategies, choice.flower)
        accepted = set(inspect.signature(cls.__init__).parameters)
        for arg, field_name in choice.params:
            assert arg in accepted, f"{name}: {choice.flower} takes no {arg!r}"
            assert field_name in fields, f"{name}: ServerConfig has no {field_name!r}"
        assert issubclass(cls, Strategy)


def test_config_and_cli_offer_exactly_the_declared_strategies() -> None:
    (help_text,) = [h for flag, _, _, h in SIMULATE_OPTIONS if flag == "--strategy"]
    for name in STRATEGIES:
        assert name in help_text
    with pytest.raises(ConfigError, match=r"server.strategy = 'fedsgd'.*'krum', 'multikrum'"):
        parse_config({"server.strategy": "fedsgd"})


# -- parity with Flower on dense weights --------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "extra", "reference"),
    [
        ("fedmedian", {}, FedMedian),
        ("fedtrimmedavg", {"server.trim-beta": 0.2}, lambda: FedTrimmedAvg(beta=0.2)),
        ("krum", {"server.num-malicious": 2}, lambda: Krum(num_malicious_nodes=2)),
        (
            "multikrum",
            {"server.num-malicious": 1, "server.multikrum-select": 3},
            lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
        ),
        (
            "multikrum",
            {"server.num-malicious": 1},  # 0 = per round n - f
            lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=6),
        ),
        ("bulyan", {"server.num-malicious": 1}, lambda: Bulyan(num_malicious_nodes=1)),
    ],
    ids=["fedmedian", "fedtrimmedavg", "krum", "multikrum", "multikrum-auto", "bulyan"],
)
def test_built_robust_strategy_equals_flower_on_dense_weights(name, extra, reference) -> None:
    # Prepare: 7 replies (Bulyan's 4f + 3), one of them a x100 attacker
    rng = np.random.default_rng(0)
    initial, global_w = _arrays(rng), _arrays(rng)
    deltas = [_arrays(rng, 0.1) for _ in range(7)]
    deltas[3] = {n: d * 100 for n, d in deltas[3].items()}
    sizes = [10, 30, 5, 55, 20, 8, 12]
    dense = [
        _reply(i, ArrayRecord({n: Array(global_w[n] + d[n]) for n in global_w}), s)
        for i, (d, s) in enumerate(zip(deltas, sizes, strict=True))
    ]
    compressed = [
        _reply(i, _encoded(d), s) for i, (d, s) in enumerate(zip(deltas, sizes, strict=True))
    ]
    # The rule alone is under test: admission's norm bound (which would reject the x100 reply
    # before the rule sees it) is off here and tested in tests/test_admission.py.
    no_bound = {"server.max-update-norm-ratio": 0.0}
    strategy = _built(_cfg(name, 7, **extra, **no_bound), initial, global_w)

    # Execute
    expected, expected_metrics = reference().aggregate_train(1, dense)
    got, metrics = strategy.aggregate_train(1, compressed)

    # Assert
    assert isinstance(strategy.inner, ReplyFloor)
    assert got is not None and expected is not None
    for n, _ in SCHEMA:
        np.testing.assert_array_equal(got[n].numpy(), expected[n].numpy())
        assert np.abs(got[n].numpy() - global_w[n]).max() < 1.0  # the attacker was left out
    assert dict(metrics) == dict(expected_metrics)
    assert strategy.traffic[1].round_failure == ""


# -- the settings against the clients per round -------------------------------------------------
@pytest.mark.parametrize(
    ("beta", "needed"),
    [(0.2, 5), (0.1, 10), (0.25, 4), (0.3, 4), (0.34, 3), (0.49, 3), (0.01, 100)],
)
def test_trimmed_mean_trims_from_the_count_flower_trims_at(beta: float, needed: int) -> None:
    assert trim_needed(beta) == needed
    assert int(beta * needed) == 1 and int(beta * (needed - 1)) == 0  # Flower's expression


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"server.strategy": "fedtrimmedavg", "server.clients-per-round": 4},
            "invalid config server.strategy = 'fedtrimmedavg': FedTrimmedAvg with "
            "server.trim-beta = 0.2 (trims int(beta * n) a side) needs at least 5 replies per "
            "round, but a round samples 4 (server.clients-per-round = 4, data.num-clients = 10); "
            "expected server.clients-per-round >= 5, or server.trim-beta >= 0.25 (and < 0.5)",
        ),
        (
            {"server.strategy": "fedtrimmedavg", "server.trim-beta": 0.0},
            "invalid config server.strategy = 'fedtrimmedavg': server.trim-beta = 0 trims "
            "nothing at any number of replies; expected server.trim-beta in (0, 0.5), or "
            "server.strategy = 'fedavg' with server.weighting = 'uniform' for a plain mean",
        ),
        (
            {"server.strategy": "fedtrimmedavg", "server.trim-beta": 0.5},
            "invalid config server.trim-beta = 0.5: expected a number in [0, 0.5)",
        ),
        (
            {"server.strategy": "fedmedian", "server.clients-per-round": 0.2},
            "invalid config server.strategy = 'fedmedian': FedMedian (over 2 replies the median "
            "is their mean) needs at least 3 replies per round, but a round samples 2 "
            "(server.clients-per-round = 0.2, data.num-clients = 10); expected "
            "server.clients-per-round >= 3 (no setting of it works with 2)",
        ),
        (
            {"server.strategy": "fedmedian", "data.num-clients": 2},
            "invalid config server.strategy = 'fedmedian': FedMedian (over 2 replies the median "
            "is their mean) needs at least 3 replies per round, but a round samples 2 "
            "(server.clients-per-round = 5, data.num-clients = 2); expected "
            "server.clients-per-round >= 3 and data.num-clients >= 3 (no setting of it works "
            "with 2)",
        ),
        (
            {"server.strategy": "krum", "server.num-malicious": 2},
            "invalid config server.strategy = 'krum': Krum with server.num-malicious = 2 "
            "(n > 2f + 2) needs at least 7 replies per round, but a round samples 5 "
            "(server.clients-per-round = 5, data.num-clients = 10); expected "
            "server.clients-per-round >= 7, or server.num-malicious <= 1",
        ),
        (
            {"server.strategy": "multikrum", "server.multikrum-select": 5},
            "invalid config server.strategy = 'multikrum': MultiKrum with "
            "server.num-malicious = 1, server.multikrum-select = 5 (n > 2f + 2 and "
            "n >= m + max(f, 1)) needs at least 6 replies per round, but a round samples 5 "
            "(server.clients-per-round = 5, data.num-clients = 10); expected "
            "server.clients-per-round >= 6, or server.multikrum-select <= 4 (or 0: n - f per "
            "round)",
        ),
        (
            {"server.strategy": "multikrum", "server.num-malicious": 0},
            "invalid config server.strategy = 'multikrum': server.num-malicious = 0 with "
            "server.multikrum-select = 0 (n - f per round) averages every reply; expected "
            "server.num-malicious >= 1 or server.multikrum-select >= 1",
        ),
        (
            {"server.strategy": "bulyan"},
            "invalid config server.strategy = 'bulyan': Bulyan with server.num-malicious = 1 "
            "(n >= 4f + 3) needs at least 7 replies per round, but a round samples 5 "
            "(server.clients-per-round = 5, data.num-clients = 10); expected "
            "server.clients-per-round >= 7 (no setting of it works with 5)",
        ),
        (
            {
                "server.strategy": "bulyan",
                "server.clients-per-round": 10,
                "server.num-malicious": 3,
            },
            "invalid config server.strategy = 'bulyan': Bulyan with server.num-malicious = 3 "
            "(n >= 4f + 3) needs at least 15 replies per round, but a round samples 10 "
            "(server.clients-per-round = 10, data.num-clients = 10); expected "
            "server.clients-per-round >= 15 and data.num-clients >= 15, or "
            "server.num-malicious <= 1",
        ),
        (
            {"server.strategy": "bulyan", "server.num-malicious": 0},
            "invalid config server.strategy = 'bulyan': server.num-malicious = 0 makes Bulyan "
            "the plain mean of every reply; expected server.num-malicious >= 1",
        ),
        (
            {"server.num-malicious": -1},
            "invalid config server.num-malicious = -1: expected a number in [0, 10000]",
        ),
    ],
    ids=[
        "trim-too-few",
        "trim-zero",
        "trim-half",
        "median-fraction",
        "median-two-clients",
        "krum-f",
        "multikrum-m",
        "multikrum-auto-f0",
        "bulyan-default",
        "bulyan-f",
        "bulyan-f0",
        "negative-f",
    ],
)
def test_robust_setting_that_cannot_hold_is_refused(flat: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(flat)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("flat", "needed"),
    [
        ({"server.strategy": "fedtrimmedavg"}, 5),  # the default: exactly 5 of 5
        ({"server.strategy": "fedmedian", "server.clients-per-round": 3}, 3),
        ({"server.strategy": "krum"}, 5),
        ({"server.strategy": "krum", "server.num-malicious": 0}, 3),
        ({"server.strategy": "multikrum"}, 5),
        (
            {
                "server.strategy": "multikrum",
                "server.num-malicious": 0,
                "server.multikrum-select": 2,
            },
            3,
        ),
        ({"server.strategy": "bulyan", "server.clients-per-round": 0.7}, 7),
        ({"server.strategy": "fedavg", "server.clients-per-round": 1}, None),
    ],
)
def test_robust_setting_that_holds_with_every_client_is_accepted(flat: dict, needed) -> None:
    cfg = parse_config(flat)
    req = requirement(cfg.server)
    assert (req and req.needed) == needed


def test_start_warns_once_when_dropouts_can_break_the_rule(caplog) -> None:
    rng = np.random.default_rng(1)
    initial = _arrays(rng)
    with caplog.at_level(logging.INFO, logger="feddistill.server"):
        build_strategy(_cfg("fedtrimmedavg", 5), 5, SCHEMA, initial)
    ours = [r for r in caplog.records if r.name == "feddistill.server"]
    (warning,) = [r for r in ours if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "server.strategy = 'fedtrimmedavg': FedTrimmedAvg with server.trim-beta = 0.2 (trims "
        "int(beta * n) a side) needs 5 replies per round and a round samples 5, so it survives "
        "0 missing (dropouts, timeouts, rejected replies); a round with fewer is skipped and "
        "keeps the global model (raise server.clients-per-round to survive more)"
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="feddistill.server"):  # the user accepted it
        build_strategy(_cfg("fedtrimmedavg", 5, **{"server.min-replies": 5}), 5, SCHEMA, initial)
    ours = [r for r in caplog.records if r.name == "feddistill.server"]
    assert [r.levelno for r in ours] == [logging.INFO]
    assert "needs 5 replies per round" in ours[0].getMessage()


# -- a round with too few replies ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "per_round", "extra", "arrived", "reason"),
    [
        ("fedtrimmedavg", 5, {}, 4, "4 replies < 5 needed by FedTrimmedAvg with server.trim-beta"),
        ("fedmedian", 3, {}, 2, "2 replies < 3 needed by FedMedian"),
        ("krum", 6, {}, 4, "4 replies < 5 needed by Krum with server.num-malicious = 1"),
        ("multikrum", 5, {}, 4, "4 replies < 5 needed by MultiKrum with server.num-malicious = 1"),
        ("bulyan", 8, {}, 6, "6 replies < 7 needed by Bulyan with server.num-malicious = 1"),
    ],
)
def test_round_with_too_few_replies_is_skipped_and_recorded(
    name, per_round, extra, arrived, reason, caplog, tmp_path
) -> None:
    # Prepare
    rng = np.random.default_rng(2)
    initial, global_w = _arrays(rng), _arrays(rng)
    strategy = _built(_cfg(name, per_round, **extra), initial, global_w)
    replies = [_reply(i, _encoded(_arrays(rng, 0.1)), 10) for i in range(arrived)]
    record = RunRecord(out_dir=tmp_path, config={}, header={})

    # Execute
    with caplog.at_level(logging.WARNING, logger="feddistill.server"):
        got = strategy.aggregate_train(1, replies)
    entry = record.add_round(1, 1, 0.5, 1.0, strategy.traffic[1], 1.0, 100)

    # Assert
    assert got == (None, None)
    failure = strategy.traffic[1].round_failure
    assert failure.startswith(f"robust aggregation skipped: {reason}")
    assert failure.endswith("; global unchanged")
    assert entry["round_failure"] == failure and entry["replies"] == arrived
    assert any(f"round 1: {failure}" == r.getMessage() for r in caplog.records)


def test_multikrum_auto_averages_all_but_f_of_each_round() -> None:
    rng = np.random.default_rng(3)
    initial, global_w = _arrays(rng), _arrays(rng)
    strategy = _built(_cfg("multikrum", 7), initial, global_w)
    deltas = [_arrays(rng, 0.1) for _ in range(6)]  # one of 7 dropped out
    dense = [
        _reply(i, ArrayRecord({n: Array(global_w[n] + d[n]) for n in global_w}), 10)
        for i, d in enumerate(deltas)
    ]
    expected, _ = MultiKrum(num_malicious_nodes=1, num_nodes_to_select=5).aggregate_train(1, dense)
    got, _ = strategy.aggregate_train(1, [_reply(i, _encoded(d), 10) for i, d in enumerate(deltas)])
    assert got is not None and expected is not None
    for n, _ in SCHEMA:
        np.testing.assert_array_equal(got[n].numpy(), expected[n].numpy())


class _DroppingGrid:
    """A Grid whose nodes answer with a small update, except those dropped in a round."""

    def __init__(self, nodes: list[int], drop: dict[int, set[int]], rng) -> None:
        self.nodes, self.drop, self.rng, self.round = nodes, drop, rng, 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        if not messages:  # evaluation is off
            return []
        self.round += 1
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"r{self.round}-m{i}"  # as the Grid does
            if msg.metadata.dst_node_id not in self.drop.get(self.round, set()):
                delta = _arrays(self.rng, 0.1)
                out.append(_reply(msg.metadata.dst_node_id, _encoded(delta), 10, msg))
        return out


def test_dropout_round_keeps_the_global_and_the_run_goes_on() -> None:
    # Prepare: FedMedian over 3 nodes; in round 2 one node drops out
    rng = np.random.default_rng(4)
    initial = _arrays(rng)
    strategy: CompressedStrategy = build_strategy(_cfg("fedmedian", 3), 3, SCHEMA, initial)
    grid = _DroppingGrid([11, 12, 13], {2: {12}}, rng)
    seen: dict[int, dict[str, np.ndarray]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
        seen[server_round] = {n: arrays[n].numpy().copy() for n, _ in SCHEMA}

    # Execute
    strategy.start(
        grid=grid,  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({n: Array(a) for n, a in initial.items()}),
        num_rounds=3,
        evaluate_fn=evaluate_fn,
    )

    # Assert
    for n, _ in SCHEMA:
        assert not np.array_equal(seen[1][n], seen[0][n])
        np.testing.assert_array_equal(seen[2][n], seen[1][n])  # round 2 skipped
        assert not np.array_equal(seen[3][n], seen[2][n])
    assert strategy.traffic[2].round_failure.startswith(
        "robust aggregation skipped: 2 replies < 3 needed by FedMedian"
    )
    assert strategy.traffic[2].failures == [(12, "no reply within server.round-timeout")]
    assert strategy.traffic[1].round_failure == strategy.traffic[3].round_failure == ""


# -- docs/aggregation.md ------------------------------------------------------------------------
@pytest.mark.slow  # the CLI's parser imports torch and transformers (feddistill.export)
def test_doc_commands_print_what_the_doc_shows(capsys) -> None:
    """Every ```sh command of docs/aggregation.md, run as written, prints the ```text after it."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "aggregation.md").read_text()
    pairs = re.findall(r"```sh\n(.*?)\n```\n\n```text\n(.*?)\n```", doc, flags=re.S)
    assert len(pairs) == doc.count("```sh") >= 1
    for command, shown in pairs:
        argv = shlex.split(command)
        assert argv[0] == "feddistill"
        assert main(argv[1:]) == 2
        assert capsys.readouterr().err.strip() == shown


@pytest.mark.slow
def test_simulated_rounds_short_of_replies_keep_the_global(tmp_path: Path) -> None:
    """Through Flower's simulation engine: FedMedian over 3 clients, one sending garbage every
    round; each round has 2 valid replies, is skipped and says so, and the model never moves."""

    from tests.conftest import simulate_with, tiny_config
    from tests.test_garbage_client import garbage_app

    cfg = tiny_config(
        tmp_path,
        **{
            "server.strategy": "fedmedian",
            "compression.downlink": "q8",
            "server.local-only": "off",
        },
    )
    results = simulate_with(cfg, garbage_app)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert r["replies"] == 2 and r["failures"] == 1
        assert r["round_failure"] == (
            "robust aggregation skipped: 2 replies < 3 needed by FedMedian (over 2 replies the "
            "median is their mean); global unchanged"
        )
        assert r["accuracy"] == results["initial"]["accuracy"]


# -- robust rules need shared coordinates -------------------------------------------------------
def test_a_robust_rule_over_own_coordinates_warns_and_names_the_shared_uplink(caplog) -> None:
    initial = _arrays(np.random.default_rng(0))
    with caplog.at_level(logging.WARNING, logger="feddistill.server"):
        cfg = _cfg("fedmedian", 5, **{"compression.uplink": "topk:0.01+q4+ef"})
        build_strategy(cfg, 5, SCHEMA, initial)
    (warning,) = [r.getMessage() for r in caplog.records if "own coordinates" in r.getMessage()]
    assert "compression.uplink = 'pattern:0.1+block:16+q4+ef'" in warning
    caplog.clear()
    for strategy, uplink in [("fedmedian", "pattern:0.1+q4+ef"), ("fedavg", "topk:0.01+q4+ef")]:
        with caplog.at_level(logging.WARNING, logger="feddistill.server"):
            build_strategy(_cfg(strategy, 5, **{"compression.uplink": uplink}), 5, SCHEMA, initial)
    assert not [r for r in caplog.records if "own coordinates" in r.getMessage()]


@pytest.mark.parametrize(("uplink", "moved_at_least"), [("topk:0.05", 0.0), ("pattern:0.05", 0.04)])
def test_the_median_moves_the_model_only_on_shared_coordinates(uplink, moved_at_least) -> None:
    """Why the shared pattern: FedMedian over top-k updates (each client its own 5%) leaves
    almost every coordinate where it was; over the round's pattern it moves each of them."""
    from feddistill.codec import round_pattern_seed

    schema = [("w", (200, 50))]
    rng = np.random.default_rng(3)
    initial = {"w": np.zeros((200, 50), dtype=np.float32)}
    cfg = _cfg("fedmedian", 5, **{"compression.uplink": uplink})
    strategy = build_strategy(cfg, 5, schema, initial)
    strategy._receive_global(ArrayRecord({"w": Array(initial["w"])}))
    spec = cfg.compression.uplink_spec
    seed = round_pattern_seed(cfg.seed, 1) if spec.select == "pattern" else None

    def reply(node: int) -> Message:
        delta = {"w": rng.standard_normal((200, 50)).astype(np.float32) + 1.0}
        return _reply(node, payload_record(encode(delta, spec, pattern_seed=seed).payload), 10)

    replies = [reply(node) for node in range(1, 6)]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    moved = float(np.mean(arrays["w"].numpy() != 0))
    if moved_at_least:
        assert moved >= moved_at_least  # the pattern's 5%, every coordinate of it
    else:
        assert moved < 0.005  # a coordinate moves only where 3 of 5 clients chose it


def test_the_robust_step_scales_the_rules_move_and_leaves_the_plain_strategies_alone() -> None:
    rng = np.random.default_rng(6)
    initial, global_w = _arrays(rng), _arrays(rng)
    deltas = [_arrays(rng, 0.1) for _ in range(5)]

    def aggregated(strategy_name: str, step: float) -> np.ndarray:
        cfg = _cfg(strategy_name, 5, **{"server.robust-step": step})
        strategy = _built(cfg, initial, global_w)
        replies = [_reply(i + 1, _encoded(d), 10) for i, d in enumerate(deltas)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return np.concatenate([arrays[n].numpy().ravel() for n, _ in SCHEMA])

    g = np.concatenate([global_w[n].ravel() for n, _ in SCHEMA])
    median_move = aggregated("fedmedian", 1.0) - g
    np.testing.assert_allclose(aggregated("fedmedian", 2.0) - g, 2 * median_move, rtol=1e-5)
    # FedAvg has no robust step (FedAvgM's own server.lr is its step)
    np.testing.assert_array_equal(aggregated("fedavg", 2.0), aggregated("fedavg", 1.0))
