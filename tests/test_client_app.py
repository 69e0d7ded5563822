"""ClientApp edges: a tampered downlink becomes a clear error reply, never a crash."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.client.app import train
from feddistill.codec import PayloadError, encode, parse_spec
from feddistill.records import (
    MAX_RUN_CONFIG_BYTES,
    pack_run_config,
    payload_record,
    server_config,
    unpack_run_config,
)
from feddistill.run_inputs import initial_models, source_splits
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


RUN_A, RUN_B = b"run-A-id", b"run-B-id"  # 8 bytes, as the server draws them


def _message(
    cfg, labels, digest: str, payload: np.ndarray, *, run: bytes = RUN_A, server_round: int = 1
) -> Message:
    config = ConfigRecord(
        {
            **server_config(cfg.to_json(), labels.names, digest, run),
            keys.SERVER_ROUND: server_round,
        }
    )
    content = RecordDict({keys.ARRAYS: payload_record(payload), keys.CONFIG: config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(tmp_path: Path, cache: Path | None = None) -> Context:
    node_config: dict = {"partition-id": 0, "num-partitions": 3}
    if cache is not None:
        node_config["cache-dir"] = str(cache)
    return Context(
        run_id=1,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={},
    )


def test_valid_downlink_trains_and_tampered_downlink_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, **{"compression.downlink": "q8", "compression.downlink-protocol": "stateless"}
    )  # the stateless protocol
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    good = encode(zero, parse_spec(cfg.compression.downlink)).payload

    reply = train(_message(cfg, labels, models.digest, good), _context(tmp_path))
    assert not reply.has_error()
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] > 0

    tampered = good.copy()
    tampered[8] ^= 0xFF  # schema hash byte
    reply = train(_message(cfg, labels, models.digest, tampered), _context(tmp_path))
    assert reply.has_error() and "PayloadError" in reply.error.reason

    truncated = good[: len(good) // 2]
    reply = train(_message(cfg, labels, models.digest, truncated), _context(tmp_path))
    assert reply.has_error() and "truncated" in reply.error.reason

    reply = train(_message(cfg, labels, "0" * 16, good), _context(tmp_path))
    assert reply.has_error() and "initial student mismatch" in reply.error.reason


def test_tampered_or_unusable_chained_downlink_is_refused(tmp_path: Path) -> None:
    from feddistill.codec.chain import ChainSender

    cfg = tiny_config(tmp_path, **{"compression.downlink": "topk:0.1+q8"})
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    sender = ChainSender(models.init_arrays, parse_spec(cfg.compression.downlink), chain=b"c" * 8)
    sender.advance({n: a + 0.01 for n, a in models.init_arrays.items()})
    good, version = sender.message_for(1)
    reply = train(_message(cfg, labels, models.digest, good), _context(tmp_path))
    assert not reply.has_error()
    sender.acknowledge(1, version)
    sender.advance({n: a + 0.02 for n, a in models.init_arrays.items()})
    sender.acknowledge(2, 2)  # the server believes node 2 holds version 2; this node does not
    sender.advance({n: a + 0.03 for n, a in models.init_arrays.items()})
    stale, _ = sender.message_for(2)

    tampered = good.copy()
    tampered[0] ^= 0xFF  # magic
    reply = train(_message(cfg, labels, models.digest, tampered), _context(tmp_path))
    assert reply.has_error() and "chain-header" in reply.error.reason

    cut = good[:-3]
    reply = train(_message(cfg, labels, models.digest, cut), _context(tmp_path))
    assert reply.has_error() and "PayloadError" in reply.error.reason

    reply = train(_message(cfg, labels, models.digest, stale), _context(tmp_path))
    assert reply.has_error() and "not in this node's cache" in reply.error.reason


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ('{"rounds": 1}', "must be zlib-compressed bytes, got str"),
        (b"not zlib", "not zlib data"),
        (pack_run_config('{"rounds": 1}')[:-4], "truncated"),
        (pack_run_config('{"rounds": 1}') + b"x", "bytes after the compressed stream"),
        (zlib.compress(b" " * (MAX_RUN_CONFIG_BYTES + 1)), "inflates past"),
        (zlib.compress(b"\xff\xfe"), "not UTF-8"),
    ],
)
def test_malformed_run_config_is_a_named_payload_error(value: object, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        unpack_run_config(value)

    assert info.value.check == "config"


def test_run_config_round_trips_and_shrinks(tmp_path: Path) -> None:
    text = tiny_config(tmp_path).to_json()

    packed = pack_run_config(text)

    assert unpack_run_config(packed) == text
    assert len(packed) < len(text) / 2


def _payload(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason
    return reply.content[keys.ARRAYS][keys.PAYLOAD].numpy()


@pytest.mark.slow  # three client rounds of a tiny model
def test_a_new_run_in_the_same_cache_does_not_continue_the_last_runs_residual(
    tmp_path: Path,
) -> None:
    # Prepare: error feedback on the uplink; run A trains round 1 in the shared cache
    from feddistill.node_state import ClientState

    cfg = tiny_config(
        tmp_path, **{"compression.downlink": "q8", "compression.downlink-protocol": "stateless"}
    )
    assert parse_spec(cfg.compression.uplink).error_feedback
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    down = encode(zero, parse_spec(cfg.compression.downlink)).payload
    shared, fresh = tmp_path / "shared-cache", tmp_path / "fresh-cache"

    def round_2(run: bytes, cache: Path) -> np.ndarray:
        msg = _message(cfg, labels, models.digest, down, run=run, server_round=2)
        return _payload(train(msg, _context(tmp_path, cache)))

    first = _message(cfg, labels, models.digest, down, run=RUN_A)
    _payload(train(first, _context(tmp_path, shared)))
    left = ClientState.open(shared, "partition-0-of-3").load_residual(
        models.schema, before_round=2, run=RUN_A.hex()
    )
    assert any(np.any(a != 0) for a in left.values())  # run A left a residual to pick up

    # Execute: run B's first round in this node is round 2, in the shared cache and in a fresh one
    in_shared = round_2(RUN_B, shared)
    in_fresh = round_2(RUN_B, fresh)

    # Assert: the same update, as if no earlier run had been there
    np.testing.assert_array_equal(in_shared, in_fresh)


def test_teacher_cache_key_holds_precision_and_mutual_training(tmp_path: Path) -> None:
    from feddistill.run_inputs import partition_split, teacher_cache_key

    cfg = tiny_config(tmp_path)
    _, _, labels = source_splits(cfg)
    train_split, _ = partition_split(cfg, 0)
    fp32 = teacher_cache_key(cfg, labels, train_split)

    bf16 = teacher_cache_key(cfg.with_overrides({"train.precision": "bf16"}), labels, train_split)
    mutual = cfg.with_overrides({"distill.mutual": True})

    assert bf16 != fp32
    assert teacher_cache_key(mutual, labels, train_split, mutual_run="aa") not in (fp32, bf16)
    assert teacher_cache_key(mutual, labels, train_split, mutual_run="aa") != teacher_cache_key(
        mutual, labels, train_split, mutual_run="bb"
    )


@pytest.mark.slow  # four client rounds of a tiny model
def test_mutual_distillation_never_overwrites_the_fine_tuned_teacher(tmp_path: Path) -> None:
    # Prepare: a plain round fine-tunes and caches the teacher
    plain = tiny_config(
        tmp_path,
        **{
            "compression.uplink": "q8",
            "compression.downlink": "q8",
            "compression.downlink-protocol": "stateless",
        },
    )
    mutual = plain.with_overrides({"distill.mutual": True})
    _, _, labels = source_splits(plain)
    models = initial_models(plain, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    down = encode(zero, parse_spec(plain.compression.downlink)).payload
    cache = tmp_path / "cache"
    before = _payload(
        train(_message(plain, labels, models.digest, down), _context(tmp_path, cache))
    )

    # Execute: two rounds of a mutual run, then the plain round again
    for r in (1, 2):
        msg = _message(mutual, labels, models.digest, down, run=RUN_B, server_round=r)
        _payload(train(msg, _context(tmp_path, cache)))
    after = _payload(train(_message(plain, labels, models.digest, down), _context(tmp_path, cache)))

    # Assert: the plain round distilled from the same fine-tuned teacher as before
    np.testing.assert_array_equal(after, before)


def test_state_keeping_round_without_a_run_id_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)  # error feedback on the uplink
    _, _, labels = source_splits(cfg)
    msg = _message(cfg, labels, "", np.zeros(4, np.uint8))
    del msg.content[keys.CONFIG][keys.RUN_ID]  # what a server older than run ids sends

    reply = train(msg, _context(tmp_path))

    assert reply.has_error() and "the server sent no run id" in reply.error.reason
