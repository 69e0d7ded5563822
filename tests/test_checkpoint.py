"""Checkpoint/resume pieces without a Flower runtime: server state, round offset, per-round
residuals, reproducible reply order, deployment labels."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, Strategy
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.codec import encode, parse_spec
from feddistill.config import STRATEGIES, ConfigError, parse_config
from feddistill.data import DataError
from feddistill.node_state import ClientState
from feddistill.records import payload_record
from feddistill.run_inputs import parse_labels
from feddistill.server.checkpoint import (
    RandomStates,
    ReproducibleGrid,
    ServerState,
    load_state,
    restore,
    save_state,
    snapshot,
    state_path,
)
from feddistill.server.grids import SAMPLER
from feddistill.server.results import RunRecord
from feddistill.strategies import CompressedStrategy
from feddistill.strategies.state import load_strategy_state_dict

SCHEMA = [("layer.weight", (3, 4)), ("layer.bias", (3,))]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SCHEMA}


def _reply(node: int, delta: dict[str, np.ndarray], n: int, request: Message | None = None):
    request = request or Message(
        RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    payload = payload_record(encode(delta, parse_spec("none")).payload)
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, "client-seconds": random.random()})
    return Message(RecordDict({keys.ARRAYS: payload, keys.METRICS: metrics}), reply_to=request)


def _parts(strategy: CompressedStrategy, record: RunRecord) -> dict:
    """The stateful parts a run names (feddistill.server.lifecycle.ServerRun), without a tail."""
    return {"strategy": strategy, "record": record, "random": RandomStates()}


def _resume(state: ServerState, cfg, strategy: CompressedStrategy, record: RunRecord) -> None:
    """What ServerRun.resume_or_start does with a loaded state: restore, then offset rounds."""
    restore(state, cfg, _parts(strategy, record))
    strategy.round_offset = state.round


def _wrapper(
    inner: Strategy, initial: dict[str, np.ndarray], downlink: str = "none"
) -> CompressedStrategy:
    """``downlink`` ``"chain:SPEC"`` is the chained protocol with deltas coded by SPEC."""
    spec = downlink.removeprefix("chain:")
    return CompressedStrategy(
        inner, schema=SCHEMA, initial=initial, uplink=parse_spec("none"),
        downlink=parse_spec(spec), max_payload_bytes=1 << 20, chained=spec != downlink,
    )  # fmt: skip


class _Grid:
    """Just what FedAvg.configure_train asks of a Grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _round(wrapper: CompressedStrategy, r: int, arrays: ArrayRecord, rng, nodes=(3, 1, 2)):
    """configure_train, then every node replies: the new global (or None)."""
    sent = list(wrapper.configure_train(r, arrays, ConfigRecord(), _Grid(list(nodes))))
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"r{r}-m{i}"  # what the Grid does on push
    replies = [_reply(m.metadata.dst_node_id, _arrays(rng, 0.1), 10, m) for m in sent]
    return sent, wrapper.aggregate_train(r, replies)[0]


@pytest.mark.parametrize(
    "make_inner",
    [lambda: FedAdam(eta=0.1), lambda: FedAvgM(server_learning_rate=0.5, server_momentum=0.9)],
    ids=["fedadam", "fedavgm"],
)
@pytest.mark.parametrize("downlink", ["none", "chain:topk:0.3+q8"], ids=["stateless", "chained"])
def test_restored_strategy_continues_like_the_original(
    make_inner, downlink: str, tmp_path: Path
) -> None:
    # Prepare: two rounds, then a checkpoint into a file
    rng = np.random.default_rng(0)
    initial = _arrays(rng)
    original = _wrapper(make_inner(), initial, downlink)
    arrays = ArrayRecord({n: Array(a) for n, a in initial.items()})
    for r in (1, 2):
        arrays = _round(original, r, arrays, rng)[1]
    record = RunRecord(out_dir=tmp_path, config=parse_config({}).to_flat(), header={})
    global_now = {n: arrays[n].numpy() for n in arrays}
    SAMPLER.seed(7)
    save_state(
        state_path(tmp_path), snapshot(2, global_now, _parts(original, record), record.config)
    )
    saved = original.state_dict()["inner"]
    assert all(v is not None for v in saved.values())  # FedAdam m_t, v_t, ... / FedAvgM ...
    expected_random = SAMPLER.random()

    # Execute: a fresh wrapper restored from the file, then round 3 on both
    state = load_state(state_path(tmp_path))
    assert state is not None and state.round == 2
    resumed = _wrapper(make_inner(), initial, downlink)
    _resume(state, parse_config({"resume": True}), resumed, record)
    assert SAMPLER.random() == expected_random
    assert resumed.round_offset == 2
    restored_arrays = ArrayRecord({n: Array(a) for n, a in state.global_arrays.items()})
    sent_before, want = _round(original, 3, arrays, np.random.default_rng(1))
    sent, got = _round(resumed, 1, restored_arrays, np.random.default_rng(1))
    for a, b in zip(sent_before, sent, strict=True):  # the same downlink (chain state restored)
        np.testing.assert_array_equal(
            a.content[keys.ARRAYS][keys.PAYLOAD].numpy(),
            b.content[keys.ARRAYS][keys.PAYLOAD].numpy(),
        )

    # Assert: the same new global, bit for bit, and round 3 everywhere in the resumed wrapper
    for name, _ in SCHEMA:
        np.testing.assert_array_equal(got[name].numpy(), want[name].numpy())
    assert {m.content[keys.CONFIG]["server-round"] for m in sent} == {3}
    assert set(resumed.traffic) == {3}


def test_restore_refuses_other_settings_and_fewer_rounds(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cfg = parse_config({"rounds": 4})
    record = RunRecord(out_dir=tmp_path, config=cfg.to_flat(), header={})
    wrapper = _wrapper(FedAvg(), _arrays(rng))
    state = snapshot(3, _arrays(rng), _parts(wrapper, record), record.config)
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.01"):
        _resume(state, cfg.with_overrides({"train.lr": 0.01, "resume": True}), wrapper, record)
    with pytest.raises(ConfigError, match=r"rounds = 2: the saved run already completed 3"):
        _resume(state, cfg.with_overrides({"rounds": 2, "resume": True}), wrapper, record)
    _resume(state, cfg.with_overrides({"rounds": 9, "resume": True}), wrapper, record)  # more: ok


def test_state_file_keeps_dtypes_and_is_replaced_atomically(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    arrays = {"a": np.arange(3, dtype=np.float32), "b": np.ones((2, 2), dtype=np.float64)}
    for r in (1, 2):
        save_state(path, ServerState(round=r, global_arrays=arrays))
    state = load_state(path)
    assert state is not None and state.round == 2
    assert {n: a.dtype for n, a in state.global_arrays.items()} == {"a": "float32", "b": "float64"}
    assert [p.name for p in path.parent.iterdir()] == ["server.npz"]  # no temp files left
    assert load_state(tmp_path / "none.npz") is None
    load_strategy_state_dict(FedAvg(), {})  # declared stateless: nothing to set


def test_reply_sent_but_never_answered_is_a_failure_of_that_node() -> None:
    rng = np.random.default_rng(2)
    wrapper = _wrapper(FedAvg(), _arrays(rng))
    arrays = ArrayRecord({n: Array(a) for n, a in _arrays(rng).items()})
    sent = list(wrapper.configure_train(1, arrays, ConfigRecord(), _Grid([5, 6, 7])))
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    replies = [_reply(m.metadata.dst_node_id, _arrays(rng, 0.1), 10, m) for m in sent[:2]]
    wrapper.aggregate_train(1, replies)
    stats = wrapper.traffic[1]
    assert stats.replies == 2
    assert stats.failures == [
        (sent[2].metadata.dst_node_id, "no reply within server.round-timeout")
    ]


def test_an_evaluation_never_answered_is_a_failure_of_that_node_too() -> None:
    """The train and evaluate steps screen replies alike: a timeout is named in both."""
    rng = np.random.default_rng(3)
    wrapper = _wrapper(FedAvg(), _arrays(rng))
    arrays = ArrayRecord({n: Array(a) for n, a in _arrays(rng).items()})
    sent = list(wrapper.configure_evaluate(1, arrays, ConfigRecord(), _Grid([5, 6, 7])))
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"e{i}"
    metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_ACCURACY: 0.5, keys.EVAL_LOSS: 1.0}
    replies = [
        Message(RecordDict({keys.METRICS: MetricRecord(dict(metrics))}), reply_to=m)
        for m in sent[1:]
    ]
    assert wrapper.aggregate_evaluate(1, replies) is not None
    assert wrapper.traffic[1].eval_failures == [
        (sent[0].metadata.dst_node_id, "no reply within server.round-timeout")
    ]


def test_error_made_up_by_the_superlink_names_the_node_that_was_asked() -> None:
    rng = np.random.default_rng(4)
    wrapper = _wrapper(FedAvg(), _arrays(rng))
    arrays = ArrayRecord({n: Array(a) for n, a in _arrays(rng).items()})
    sent = list(wrapper.configure_train(1, arrays, ConfigRecord(), _Grid([5, 6])))
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"m{i}"
    good = _reply(sent[0].metadata.dst_node_id, _arrays(rng, 0.1), 10, sent[0])
    dead = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent[1])
    dead.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own node id
    wrapper.aggregate_train(1, [good, dead])
    node = sent[1].metadata.dst_node_id
    assert wrapper.traffic[1].failures == [(node, "client error: Node Unavailable")]


def test_reproducible_grid_sorts_node_ids_and_replies() -> None:
    class Inner(_Grid):
        def __init__(self, replies: list[Message]) -> None:
            super().__init__([9, 2, 5])
            self.replies = replies

        def send_and_receive(self, messages, *, timeout=None):
            return list(self.replies)

    rng = np.random.default_rng(3)
    replies = [_reply(node, _arrays(rng), 10) for node in (4, 8, 6)]
    forward = ReproducibleGrid(Inner(replies))  # type: ignore[arg-type]
    backward = ReproducibleGrid(Inner(replies[::-1]))  # type: ignore[arg-type]
    assert forward.get_node_ids() == [2, 5, 9]
    # client-seconds differ on every call: the order must come from the arrays
    order = [m.metadata.src_node_id for m in forward.send_and_receive([])]
    assert order == [m.metadata.src_node_id for m in backward.send_and_receive([])]
    assert sorted(order) == [4, 6, 8]


def test_residual_of_a_redone_round_is_the_one_before_it(tmp_path: Path) -> None:
    state = ClientState.open(tmp_path, "client")
    value = lambda x: {"layer.bias": np.full(3, x, np.float32)}  # noqa: E731
    assert state.load_residual([("layer.bias", (3,))], before_round=1, run="a1") == {}
    for r in (1, 2, 3):
        state.save_residual(value(r), r, run="a1")
    # Round 3 was trained, then the server died and redoes round 3: it gets round 2's residual.
    residual = state.load_residual([("layer.bias", (3,))], before_round=3, run="a1")
    assert residual["layer.bias"][0] == 2
    assert sorted(p.name for p in state.root.glob("residual-*")) == [
        "residual-a1-000002.npz",
        "residual-a1-000003.npz",
    ]
    assert state.load_residual([("layer.bias", (4,))], before_round=9, run="a1") == {}  # model
    state.save_residual(value(10), 1, run="a1")  # a redone round 1 drops the later rounds
    assert sorted(p.name for p in state.root.glob("residual-*")) == ["residual-a1-000001.npz"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("world", "names 1 class"), ("a,,b", "empty name"), ("a,b,a", r"\['a'\] more than once")],
)
def test_data_labels_are_validated(text: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"data.labels={text!r}.*{message}"):
        parse_labels(text)
    assert parse_labels(" World , Sci/Tech ").names == ("World", "Sci/Tech")


def _differs(a: object, b: object) -> bool:
    """Whether two attribute values differ (arrays, records and containers by content)."""
    if isinstance(a, ArrayRecord) or isinstance(b, ArrayRecord):
        a = None if a is None else {k: v.numpy() for k, v in a.items()}  # type: ignore[union-attr]
        b = None if b is None else {k: v.numpy() for k, v in b.items()}  # type: ignore[union-attr]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or not np.array_equal(
            a, b
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_differs(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=True))
    return a is not b and a != b


NODES = (1, 2, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_offered_strategy_resumes_bit_for_bit(name: str, tmp_path: Path) -> None:
    # Prepare: two rounds of the strategy as the factory builds it, then a checkpoint file
    from feddistill.strategies import inner_strategy
    from feddistill.strategies.state import declared_fields

    cfg = parse_config({"server.strategy": name, "server.clients-per-round": len(NODES)})
    rng = np.random.default_rng(5)
    initial = _arrays(rng)
    original = _wrapper(inner_strategy(cfg, len(NODES)), initial, "chain:topk:0.3+q8")
    arrays = ArrayRecord({n: Array(a) for n, a in initial.items()})
    for r in (1, 2):
        arrays = _round(original, r, arrays, rng, NODES)[1]
    record = RunRecord(out_dir=tmp_path, config=cfg.to_flat(), header={})
    save_state(
        state_path(tmp_path),
        snapshot(
            2, {n: arrays[n].numpy() for n in arrays}, _parts(original, record), record.config
        ),
    )

    # Execute: a freshly built wrapper restored from the file; round 3 on both
    state = load_state(state_path(tmp_path))
    assert state is not None
    resumed = _wrapper(inner_strategy(cfg, len(NODES)), initial, "chain:topk:0.3+q8")
    _resume(state, cfg.with_overrides({"resume": True}), resumed, record)
    restored = ArrayRecord({n: Array(a) for n, a in state.global_arrays.items()})
    _, want = _round(original, 3, arrays, np.random.default_rng(1), NODES)
    _, got = _round(resumed, 1, restored, np.random.default_rng(1), NODES)

    # Assert: the same global, and every attribute the rounds changed is declared state
    for key, _ in SCHEMA:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
    fresh = vars(inner_strategy(cfg, len(NODES)))
    changed = {k for k, v in vars(original.inner).items() if _differs(fresh.get(k), v)}
    assert changed <= set(declared_fields(original.inner)), name


class _Counting(FedAvg):
    """A strategy with state its class does not declare (a round counter that scales steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds_seen = 0

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        self.rounds_seen += 1
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        return ArrayRecord(
            {k: Array(a.numpy() / self.rounds_seen) for k, a in arrays.items()}
        ), metrics


def test_a_strategy_with_undeclared_state_is_refused_not_saved_without_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    initial = _arrays(rng)
    wrapper = _wrapper(_Counting(), initial)
    _round(wrapper, 1, ArrayRecord({n: Array(a) for n, a in initial.items()}), rng)
    record = RunRecord(out_dir=tmp_path, config=parse_config({}).to_flat(), header={})

    with pytest.raises(TypeError, match=r"_Counting declares no resume state"):
        snapshot(1, initial, _parts(wrapper, record), record.config)


class _Damped(Strategy):
    """A wrapper of the kind a robust aggregator adds: an inner strategy plus scalar state it
    adapts every round. It declares both, nesting the inner strategy's state."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.step = 1.0

    def state_dict(self) -> dict:
        from feddistill.strategies.state import strategy_state_dict

        return {"step": self.step, "inner": strategy_state_dict(self.inner)}

    def load_state_dict(self, state) -> None:  # type: ignore[no-untyped-def]
        from feddistill.strategies.state import load_strategy_state_dict

        self.step = float(state["step"])
        load_strategy_state_dict(self.inner, state["inner"])

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        self.step *= 0.5
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        return ArrayRecord(
            {k: Array(a.numpy() * (1 + self.step)) for k, a in arrays.items()}
        ), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def test_a_wrapped_inner_strategy_and_scalar_state_survive_the_checkpoint(tmp_path: Path) -> None:
    # Prepare: FedAdam inside a wrapper with a scalar step, two rounds, a checkpoint file
    rng = np.random.default_rng(7)
    initial = _arrays(rng)
    make = lambda: _Damped(FedAdam(eta=0.1))  # noqa: E731
    original = _wrapper(make(), initial)
    arrays = ArrayRecord({n: Array(a) for n, a in initial.items()})
    for r in (1, 2):
        arrays = _round(original, r, arrays, rng)[1]
    record = RunRecord(out_dir=tmp_path, config=parse_config({}).to_flat(), header={})
    save_state(
        state_path(tmp_path),
        snapshot(
            2, {n: arrays[n].numpy() for n in arrays}, _parts(original, record), record.config
        ),
    )

    # Execute
    state = load_state(state_path(tmp_path))
    assert state is not None
    resumed = _wrapper(make(), initial)
    _resume(state, parse_config({"resume": True}), resumed, record)
    restored = ArrayRecord({n: Array(a) for n, a in state.global_arrays.items()})
    _, want = _round(original, 3, arrays, np.random.default_rng(1))
    _, got = _round(resumed, 1, restored, np.random.default_rng(1))

    # Assert: the nested FedAdam moments and the scalar came back: the same round 3
    assert resumed.inner.step == original.inner.step
    for key, _ in SCHEMA:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_restore_refuses_a_state_with_other_parts(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    cfg = parse_config({"server.average-last": 2})
    record = RunRecord(out_dir=tmp_path, config=cfg.to_flat(), header={})
    wrapper = _wrapper(FedAvg(), _arrays(rng))
    state = snapshot(1, _arrays(rng), _parts(wrapper, record), record.config)  # no tail

    with pytest.raises(ConfigError, match=r"kept the state of \['random', 'record', 'strategy'\]"):
        restore(
            state, cfg.with_overrides({"resume": True}), {**_parts(wrapper, record), "tail": None}
        )


def test_random_states_come_back_from_the_file(tmp_path: Path) -> None:
    import torch

    SAMPLER.seed(11)
    torch.manual_seed(12)
    path = state_path(tmp_path)
    save_state(
        path, ServerState(round=1, global_arrays={}, parts={"random": RandomStates().state_dict()})
    )
    want = (SAMPLER.random(), torch.rand(1).item())
    SAMPLER.seed(0)
    torch.manual_seed(0)

    saved = load_state(path)
    assert saved is not None
    RandomStates().load_state_dict(saved.parts["random"])

    assert (SAMPLER.random(), torch.rand(1).item()) == want
