"""The compressed-strategy wrapper with hand-made replies (no Flower runtime).

Parity: with the "none" codec, wrapping FedAvg/FedAdam/FedMedian/Krum/... gives exactly what
Flower's own strategy gives on dense weights. Bad replies are dropped and counted; the round goes
on.
"""

from __future__ import annotations

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
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.codec import encode, parse_spec
from feddistill.records import payload_record
from feddistill.strategies import CompressedStrategy
from feddistill.strategies.compressed import FLAT

SCHEMA = [("layer.weight", (6, 5)), ("layer.bias", (6,))]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    # Messages need a run id; the Flower runtime sets it, here we do.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _arrays(
    rng: np.random.Generator, scale: float = 1.0, schema: list | None = None
) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in schema or SCHEMA}


def _request(node: int) -> Message:
    return Message(
        RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )


def _reply(node: int, record: ArrayRecord, n: int) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: record,
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0}),
        }
    )
    return Message(content, reply_to=_request(node))


def _wrapper(inner: Strategy, initial: dict[str, np.ndarray], uplink: str) -> CompressedStrategy:
    wrapper = CompressedStrategy(
        inner,
        schema=SCHEMA,
        initial=initial,
        uplink=parse_spec(uplink),
        downlink=parse_spec("none"),
        max_payload_bytes=1 << 20,
    )
    return wrapper


def _prime(wrapper: CompressedStrategy, global_arrays: dict[str, np.ndarray]) -> None:
    """What configure_train does before replies arrive: remember the broadcast global."""
    wrapper._receive_global(ArrayRecord({n: Array(a) for n, a in global_arrays.items()}))


@pytest.mark.parametrize(
    "make_inner",
    [
        FedAvg,
        FedMedian,
        lambda: FedTrimmedAvg(beta=0.2),
        lambda: FedAdam(eta=0.1),
        lambda: FedYogi(eta=0.1),
        lambda: Krum(num_malicious_nodes=1),
        lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=2),
        lambda: Bulyan(num_malicious_nodes=0),  # 4f + 3 <= 4 replies; f >= 1: tests/test_robust.py
    ],
    ids=[
        "fedavg",
        "fedmedian",
        "fedtrimmedavg",
        "fedadam",
        "fedyogi",
        "krum",
        "multikrum",
        "bulyan",
    ],
)
def test_none_codec_equals_flower_on_dense_weights(make_inner) -> None:
    rng = np.random.default_rng(0)
    initial, global_w = _arrays(rng), _arrays(rng)
    deltas = [_arrays(rng, 0.1) for _ in range(4)]
    sizes = [10, 30, 5, 55]
    dense_replies = [
        _reply(i, ArrayRecord({n: Array(global_w[n] + d[n]) for n in global_w}), s)
        for i, (d, s) in enumerate(zip(deltas, sizes, strict=True))
    ]
    comp_replies = [
        _reply(i, payload_record(encode(d, parse_spec("none")).payload), s)
        for i, (d, s) in enumerate(zip(deltas, sizes, strict=True))
    ]
    reference, wrapped_inner = make_inner(), make_inner()
    if hasattr(reference, "current_arrays"):  # FedOpt family remembers the broadcast weights
        reference.current_arrays = {n: a.copy() for n, a in global_w.items()}
        flat = np.concatenate([global_w[n].ravel() for n, _ in SCHEMA])  # what it is shown
        wrapped_inner.current_arrays = {FLAT: flat}
    expected, expected_metrics = reference.aggregate_train(1, dense_replies)

    wrapper = _wrapper(wrapped_inner, initial, "none")
    _prime(wrapper, global_w)
    got, metrics = wrapper.aggregate_train(1, comp_replies)

    assert got is not None and expected is not None
    for name, _ in SCHEMA:
        np.testing.assert_allclose(got[name].numpy(), expected[name].numpy(), rtol=1e-6, atol=1e-7)
    assert dict(metrics) == dict(expected_metrics)
    assert wrapper.traffic[1].replies == 4 and not wrapper.traffic[1].failures


def test_compressed_fedavg_applies_mean_of_decoded_deltas() -> None:
    rng = np.random.default_rng(1)
    initial, global_w = _arrays(rng), _arrays(rng)
    spec = parse_spec("topk:0.5+q8")
    deltas = [_arrays(rng, 0.1) for _ in range(3)]
    encoded = [encode(d, spec, seed=i) for i, d in enumerate(deltas)]
    replies = [_reply(i, payload_record(e.payload), 10) for i, e in enumerate(encoded)]
    wrapper = _wrapper(FedAvg(), initial, "topk:0.5+q8")
    _prime(wrapper, global_w)
    got, _ = wrapper.aggregate_train(1, replies)
    for name, _ in SCHEMA:
        mean_delta = np.mean([e.decoded[name] for e in encoded], axis=0)
        np.testing.assert_allclose(got[name].numpy(), global_w[name] + mean_delta, atol=1e-6)


@pytest.mark.parametrize("uniform", [False, True])
def test_weighting_by_examples_or_uniform(uniform: bool) -> None:
    rng = np.random.default_rng(2)
    initial, global_w = _arrays(rng), _arrays(rng)
    deltas = [_arrays(rng, 0.1) for _ in range(2)]
    sizes = [1, 9]
    replies = [
        _reply(i, payload_record(encode(d, parse_spec("none")).payload), n)
        for i, (d, n) in enumerate(zip(deltas, sizes, strict=True))
    ]
    wrapper = CompressedStrategy(
        FedAvg(),
        schema=SCHEMA,
        initial=initial,
        uplink=parse_spec("none"),
        downlink=parse_spec("none"),
        max_payload_bytes=1 << 20,
        uniform=uniform,
    )
    _prime(wrapper, global_w)
    got, _ = wrapper.aggregate_train(1, replies)
    weights = [0.5, 0.5] if uniform else [0.1, 0.9]
    for name, _ in SCHEMA:
        mixed = weights[0] * deltas[0][name] + weights[1] * deltas[1][name]
        np.testing.assert_allclose(got[name].numpy(), global_w[name] + mixed, atol=1e-6)


def test_garbage_reply_is_dropped_and_counted() -> None:
    rng = np.random.default_rng(2)
    initial, global_w = _arrays(rng), _arrays(rng)
    good = [
        _reply(i, payload_record(encode(_arrays(rng, 0.1), parse_spec("none")).payload), 10)
        for i in range(2)
    ]
    garbage = _reply(99, payload_record(rng.integers(0, 256, 500).astype(np.uint8)), 10)
    wrong_dtype = _reply(98, ArrayRecord({keys.PAYLOAD: Array(np.zeros(8, np.float32))}), 10)
    no_examples = _reply(97, payload_record(encode(_arrays(rng), parse_spec("none")).payload), 0)
    wrapper = _wrapper(FedAvg(), initial, "none")
    _prime(wrapper, global_w)
    got, _ = wrapper.aggregate_train(1, [*good, garbage, wrong_dtype, no_examples])
    stats = wrapper.traffic[1]
    assert got is not None and stats.replies == 2
    failed = {node: reason for node, reason in stats.failures}
    assert set(failed) == {99, 98, 97}
    assert "invalid payload" in failed[99]
    assert "(dtype)" in failed[98]
    assert "(metrics)" in failed[97]
    assert set(stats.bytes_up) == {0, 1, 99, 98, 97}  # bytes counted even for dropped replies


def test_all_replies_bad_keeps_global() -> None:
    rng = np.random.default_rng(3)
    wrapper = _wrapper(FedAvg(), _arrays(rng), "none")
    _prime(wrapper, _arrays(rng))
    bad = _reply(5, payload_record(np.zeros(3, np.uint8)), 10)
    assert wrapper.aggregate_train(1, [bad]) == (None, None)
    assert len(wrapper.traffic[1].failures) == 1


def test_min_replies_keeps_global_when_too_few_answer() -> None:
    rng = np.random.default_rng(4)
    wrapper = CompressedStrategy(
        FedAvg(),
        schema=SCHEMA,
        initial=_arrays(rng),
        uplink=parse_spec("none"),
        downlink=parse_spec("none"),
        max_payload_bytes=1 << 20,
        min_replies=2,
    )
    _prime(wrapper, _arrays(rng))
    one = _reply(1, payload_record(encode(_arrays(rng, 0.1), parse_spec("none")).payload), 10)
    assert wrapper.aggregate_train(1, [one]) == (None, None)
    assert wrapper.traffic[1].replies == 1


def test_chained_downlink_reaches_every_node_exactly_through_the_client_code(tmp_path) -> None:
    """Nodes answer in some rounds only; each rebuilds the server's broadcast bit for bit with
    the client's own ``received_arrays`` and node cache, and a node that failed (and so was
    forgotten) recovers from its initial model. The requests share one RecordDict, as Flower's
    strategies build them, yet each node gets the message for the version it holds."""
    from types import SimpleNamespace

    from feddistill.client.work import received_arrays
    from feddistill.codec.chain import unpack_chain
    from feddistill.config import parse_config

    rng = np.random.default_rng(5)
    BIG = [("w", (64, 32)), ("b", (32,))]  # large enough that deltas beat a base
    initial = _arrays(rng, schema=BIG)
    spec = "topk:0.2+q8"
    cfg = parse_config({"compression.downlink": spec})
    models = SimpleNamespace(schema=BIG, names=[n for n, _ in BIG], init_arrays=initial)
    wrapper = CompressedStrategy(
        FedAvg(),
        schema=BIG,
        initial=initial,
        uplink=parse_spec("none"),
        downlink=parse_spec(spec),
        max_payload_bytes=1 << 20,
        chained=True,
    )
    chain = wrapper.chain
    assert chain is not None
    global_w = {n: a.copy() for n, a in initial.items()}
    schedule = [[1, 2], [1], [1, 3], [2, 3], [1, 2, 3]]
    down: dict[int, dict[int, int]] = {}
    for server_round, nodes in enumerate(schedule, start=1):
        sink = down.setdefault(server_round, {})
        record = ArrayRecord({n: Array(a) for n, a in global_w.items()})
        shared = RecordDict({keys.CONFIG: ConfigRecord()})
        requests = [Message(shared, dst_node_id=i, message_type=MessageType.TRAIN) for i in nodes]
        wrapper._receive_global(record)
        messages = wrapper._compress_messages(server_round, requests, sink)
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            payload = msg.content[keys.ARRAYS][keys.PAYLOAD].numpy()
            held = chain.node_version.get(node, 0)
            assert unpack_chain(payload, max_payload_bytes=1 << 20).first_needed == held
            if node == 3 and server_round == 3:  # fails: the server must forget what it held
                replies.append(Message(Error(code=6, reason="disk full"), reply_to=msg))
                continue
            got = received_arrays(models, cfg, payload, tmp_path / f"node-{node}")
            for name, _ in BIG:
                np.testing.assert_array_equal(got[name], chain.broadcast[name])
            delta = _arrays(rng, 0.05, BIG)
            replies.append(
                _reply(node, payload_record(encode(delta, parse_spec("none")).payload), 10)
            )
        new, _ = wrapper.aggregate_train(server_round, replies)
        assert new is not None
        global_w = {n: new[n].numpy() for n, _ in BIG}
        assert set(sink) == set(nodes) and all(b > 0 for b in sink.values())
    # Round 1 sends the initial model (no version); versions 1-4 follow in rounds 2-5. In round 4
    # node 2 (last answer in round 1) and node 3 (never a good answer) both get versions 1-3,
    # while in round 2 node 1 needed version 1 only.
    assert chain.node_version == {1: 4, 2: 4, 3: 4}
    assert down[1][1] < down[2][1] < down[4][2] == down[4][3]


def test_node_left_on_a_version_the_resumed_server_rebuilt_differently_gets_the_whole_model(
    tmp_path,
) -> None:
    """A crash during federated evaluation: the node cached the version made for that
    evaluation, the server resumes from the round before and makes that version again from
    another global. The node must refuse with a named reason (never train from a model the
    server never sent), and the server must then send it the whole model."""
    import copy
    from types import SimpleNamespace

    from feddistill.client.app import _error_reply
    from feddistill.client.work import received_arrays
    from feddistill.codec import PayloadError
    from feddistill.config import parse_config

    # Prepare: one node; round 1 trained and evaluated, then the checkpoint
    rng = np.random.default_rng(9)
    big = [("w", (64, 32)), ("b", (32,))]
    initial = _arrays(rng, schema=big)
    spec = "topk:0.2+q8"
    cfg = parse_config({"compression.downlink": spec})
    models = SimpleNamespace(schema=big, names=[n for n, _ in big], init_arrays=initial)
    node_cache = tmp_path / "node"

    def wrapper_for() -> CompressedStrategy:
        return CompressedStrategy(
            FedAvg(), schema=big, initial=initial, uplink=parse_spec("none"),
            downlink=parse_spec(spec), max_payload_bytes=1 << 20, chained=True,
        )  # fmt: skip

    def send(wrapper, r, global_w, kind=MessageType.TRAIN) -> tuple[Message, np.ndarray]:
        record = ArrayRecord({n: Array(a) for n, a in global_w.items()})
        request = Message(
            RecordDict({keys.CONFIG: ConfigRecord()}), dst_node_id=1, message_type=kind
        )
        wrapper._receive_global(record)
        (msg,) = wrapper._compress_messages(r, [request], {})
        return msg, msg.content[keys.ARRAYS][keys.PAYLOAD].numpy()

    def train_reply(wrapper, r, msg) -> dict[str, np.ndarray]:
        delta = _arrays(rng, 0.05, big)
        reply = _reply(1, payload_record(encode(delta, parse_spec("none")).payload), 10)
        new, _ = wrapper.aggregate_train(r, [reply])
        return {n: new[n].numpy() for n, _ in big}

    def evaluated(wrapper, r, msg) -> None:
        metrics = MetricRecord({keys.NUM_EXAMPLES: 10, "eval-accuracy": 0.5})
        wrapper.aggregate_evaluate(r, [Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)])

    server = wrapper_for()
    msg, payload = send(server, 1, initial)
    received_arrays(models, cfg, payload, node_cache)
    global_1 = train_reply(server, 1, msg)
    msg, payload = send(server, 1, global_1, MessageType.EVALUATE)
    received_arrays(models, cfg, payload, node_cache)
    evaluated(server, 1, msg)
    checkpoint = copy.deepcopy(server.chain)

    # round 2 trains and its evaluation reaches the node; then the server is killed
    msg, payload = send(server, 2, global_1)
    received_arrays(models, cfg, payload, node_cache)
    global_2 = train_reply(server, 2, msg)
    _, payload = send(server, 2, global_2, MessageType.EVALUATE)
    received_arrays(models, cfg, payload, node_cache)

    # Execute: the resumed server redoes round 2; its global differs (another reply)
    resumed = wrapper_for()
    resumed.chain = checkpoint
    msg, payload = send(resumed, 2, global_1)
    received_arrays(models, cfg, payload, node_cache)
    global_2b = train_reply(resumed, 2, msg)
    msg, payload = send(resumed, 2, global_2b, MessageType.EVALUATE)
    with pytest.raises(PayloadError) as info:
        received_arrays(models, cfg, payload, node_cache)
    resumed.aggregate_evaluate(2, [_error_reply(msg, info.value)])

    # Assert: a named refusal; the next message carries the whole model and the node holds it
    assert info.value.check == "chain-digest"
    assert (
        resumed.traffic[2]
        .eval_failures[0][1]
        .startswith("client error: PayloadError: [chain-digest]")
    )
    _, payload = send(resumed, 3, global_2b)
    from feddistill.codec.chain import unpack_chain

    assert unpack_chain(payload, max_payload_bytes=1 << 20).base is not None
    got = received_arrays(models, cfg, payload, node_cache)
    for name, _ in big:
        np.testing.assert_array_equal(got[name], resumed.chain.broadcast[name])
