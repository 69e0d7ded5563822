"""The chained downlink: every node rebuilds the server's broadcast model bit for bit.

Nodes answer in random rounds, skip rounds, lose their cache, or fall further behind than the
server's history; each must end with exactly ``ChainSender.broadcast``. Malformed containers are
rejected with PayloadError.
"""

from __future__ import annotations

import numpy as np
import pytest

from feddistill.codec import PayloadError, parse_spec
from feddistill.codec.chain import (
    ChainMessage,
    ChainSender,
    apply_chain,
    initial_downlink,
    pack_chain,
    unpack_chain,
)

SCHEMA = [("w", (40, 30)), ("b", (30,))]
LIMIT = 1 << 22


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in SCHEMA}


class _Node:
    """A client's side: the newest version it holds (version 0 is the initial model)."""

    def __init__(self, initial: dict[str, np.ndarray]) -> None:
        self.initial = initial
        self.version, self.arrays = 0, initial

    def receive(self, payload: np.ndarray) -> dict[str, np.ndarray]:
        msg = unpack_chain(payload, max_payload_bytes=LIMIT)
        start = self.arrays if msg.first_needed > 0 else self.initial
        held = self.version if msg.first_needed > 0 else 0
        self.arrays = apply_chain(msg, start, held, SCHEMA, max_payload_bytes=LIMIT)
        self.version = msg.target
        return self.arrays


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[n], b[n]) for n, _ in SCHEMA)


def test_nodes_that_skip_rounds_rebuild_the_broadcast_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    initial = _arrays(rng)
    sender = ChainSender(initial, parse_spec("topk:0.05+q4"), chain=b"abcdefgh", history=5)
    nodes = {i: _Node(initial) for i in range(6)}
    current = {n: a.copy() for n, a in initial.items()}
    sent_base = 0
    for _ in range(30):
        current = {n: a + _arrays(rng, 0.01)[n] for n, a in current.items()}
        sender.advance(current)
        for i in rng.choice(6, size=2, replace=False):
            payload, version = sender.message_for(int(i))
            msg = unpack_chain(payload, max_payload_bytes=LIMIT)
            sent_base += msg.base is not None
            assert _same(nodes[int(i)].receive(payload), sender.broadcast)
            sender.acknowledge(int(i), version)
    assert sent_base > 0  # some node fell more than `history` versions behind


def test_an_unchanged_model_makes_no_version() -> None:
    initial = _arrays(np.random.default_rng(6))
    sender = ChainSender(initial, parse_spec("topk:0.1+q8"), chain=b"12345678")
    assert sender.advance(initial) == 0 and sender.version == 0
    payload, version = sender.message_for(3)
    assert version == 0 and payload.size == 34  # the header alone: "keep the initial model"
    assert _same(_Node(initial).receive(payload), initial)


def test_a_node_that_lost_its_state_is_forgotten_and_rebuilds_from_version_zero() -> None:
    rng = np.random.default_rng(1)
    initial = _arrays(rng)
    sender = ChainSender(initial, parse_spec("topk:0.1+q8"), chain=b"12345678")
    for _ in range(3):
        sender.advance({n: a + _arrays(rng, 0.1)[n] for n, a in initial.items()})
        _, version = sender.message_for(7)
        sender.acknowledge(7, version)
    sender.forget(7)  # e.g. it answered "not in this node's cache"
    fresh = _Node(initial)
    assert _same(fresh.receive(sender.message_for(7)[0]), sender.broadcast)


def test_server_error_feedback_brings_the_broadcast_to_a_fixed_global() -> None:
    """Top-10% of one delta leaves most of it behind; the residual is sent in later versions."""
    rng = np.random.default_rng(2)
    initial = _arrays(rng)
    target = {n: a + _arrays(rng)[n] for n, a in initial.items()}
    sender = ChainSender(initial, parse_spec("topk:0.1+q8"), chain=b"12345678")

    def gap() -> float:
        return float(sum(np.sum((target[n] - sender.broadcast[n]) ** 2) for n, _ in SCHEMA))

    start = gap()
    sender.advance(target)
    after_one = gap()
    assert sender.advance(target) == 0  # same global: no new version
    for i in range(40):  # a global that keeps moving by a negligible amount
        sender.advance({n: a + np.float32(1e-7 * (i + 1)) for n, a in target.items()})
    assert after_one > 0.5 * start
    assert gap() < 0.01 * start


def test_container_round_trip_and_malformed_containers() -> None:
    deltas = ((3, np.arange(5, dtype=np.uint8)), (4, np.arange(7, dtype=np.uint8)))
    msg = ChainMessage(b"chainid!", 4, deltas, digest=b"modeldig")
    blob = pack_chain(msg)
    back = unpack_chain(blob, max_payload_bytes=LIMIT)
    assert back.chain == b"chainid!" and back.target == 4 and back.first_needed == 2
    assert back.digest == b"modeldig"
    assert [(v, p.tolist()) for v, p in back.deltas] == [(v, p.tolist()) for v, p in deltas]

    based = unpack_chain(
        pack_chain(ChainMessage(b"chainid!", 4, deltas, np.ones(3, np.uint8), 2, b"modeldig")),
        max_payload_bytes=LIMIT,
    )
    assert based.base is not None and based.base.tolist() == [1, 1, 1]

    bad = {
        "magic": np.concatenate([np.frombuffer(b"XXXX", np.uint8), blob[4:]]),
        "truncated": blob[:-1],
        "header": blob[:10],
        "extra": np.concatenate([blob, np.zeros(1, np.uint8)]),
    }
    version = blob.copy()
    version[4] = 9
    bad["version"] = version
    too_many = blob.copy()
    too_many[30] = 200  # 200 deltas cannot end at version 4
    bad["count"] = too_many
    for name, payload in bad.items():
        with pytest.raises(PayloadError):
            unpack_chain(payload, max_payload_bytes=LIMIT)
        assert name
    with pytest.raises(PayloadError, match="over the limit"):
        unpack_chain(blob, max_payload_bytes=10)


def test_deltas_that_do_not_continue_the_held_version_are_refused() -> None:
    rng = np.random.default_rng(3)
    initial = _arrays(rng)
    sender = ChainSender(initial, parse_spec("topk:0.1+q8"), chain=b"12345678")
    sender.advance({n: a + 1 for n, a in initial.items()})
    sender.acknowledge(1, 1)
    sender.advance({n: a + 2 for n, a in initial.items()})
    msg = unpack_chain(sender.message_for(1)[0], max_payload_bytes=LIMIT)
    with pytest.raises(PayloadError, match="need version 1"):
        apply_chain(msg, initial, 0, SCHEMA, max_payload_bytes=LIMIT)


def test_initial_downlink_gives_the_initial_model_under_both_protocols() -> None:
    initial = _arrays(np.random.default_rng(4))
    for spec, chained in (("q8", False), ("topk:0.01+q4", True)):
        payload = initial_downlink(initial, parse_spec(spec), chained=chained)
        assert payload.dtype == np.uint8 and payload.size > 0
    chained = initial_downlink(initial, parse_spec("q4"), chained=True)
    msg = unpack_chain(chained, max_payload_bytes=LIMIT)
    assert _same(apply_chain(msg, initial, 0, SCHEMA, max_payload_bytes=LIMIT), initial)


def test_a_node_holding_another_version_fails_the_digest_check_instead_of_diverging() -> None:
    # Prepare: a node holds version 1; the server "crashes" and, resumed from its version-1
    # state, makes version 2 from another global than the one the node last received
    import copy

    rng = np.random.default_rng(7)
    initial = _arrays(rng)
    sender = ChainSender(initial, parse_spec("topk:0.2+q8"), chain=b"12345678")
    node = _Node(initial)
    sender.advance({n: a + _arrays(rng, 0.1)[n] for n, a in initial.items()})
    node.receive(sender.message_for(1)[0])
    sender.acknowledge(1, 1)
    checkpoint = copy.deepcopy(sender)
    sender.advance({n: a + _arrays(rng, 0.1)[n] for n, a in initial.items()})
    node.receive(sender.message_for(1)[0])  # version 2, never acknowledged: then the crash
    resumed = checkpoint
    resumed.advance({n: a + _arrays(rng, 0.1)[n] for n, a in initial.items()})

    # Execute: the resumed server sends "version 1 -> 2"; the node holds its own version 2
    msg = unpack_chain(resumed.message_for(1)[0], max_payload_bytes=LIMIT)
    with pytest.raises(PayloadError, match="is not the one the server sent") as info:
        apply_chain(msg, node.arrays, node.version, SCHEMA, max_payload_bytes=LIMIT)

    # Assert: named; the version it continued from was not the server's; a rebuild recovers
    assert info.value.check == "chain-digest"
    resumed.rebuild(1)
    rebuilt = unpack_chain(resumed.message_for(1)[0], max_payload_bytes=LIMIT)
    assert rebuilt.base is not None
    got = apply_chain(rebuilt, node.arrays, node.version, SCHEMA, max_payload_bytes=LIMIT)
    assert _same(got, resumed.broadcast)


def test_every_message_names_the_digest_of_its_target_model() -> None:
    from feddistill.codec.chain import DIGEST_BYTES, model_digest

    rng = np.random.default_rng(8)
    initial = _arrays(rng)
    sender = ChainSender(initial, parse_spec("topk:0.1+q8"), chain=b"12345678")
    names = [n for n, _ in SCHEMA]
    first = unpack_chain(sender.message_for(1)[0], max_payload_bytes=LIMIT)
    sender.advance({n: a + 1 for n, a in initial.items()})
    second = unpack_chain(sender.message_for(1)[0], max_payload_bytes=LIMIT)

    assert first.digest == model_digest(initial, names) and len(first.digest) == DIGEST_BYTES
    assert second.digest == model_digest(sender.broadcast, names) != first.digest
    initial_msg = unpack_chain(
        initial_downlink(initial, parse_spec("q4"), chained=True), max_payload_bytes=LIMIT
    )
    assert initial_msg.digest == first.digest
    with pytest.raises(ValueError, match="digest must be 8 bytes"):
        pack_chain(ChainMessage(b"12345678", 0, ()))
