"""ClientApp edges: a tampered downlink becomes a clear error reply, never a crash."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.client.app import train
from feddistill.codec import PayloadError, encode, parse_spec
from feddistill.task import initial_models, source_splits
from feddistill.wire import (
    MAX_RUN_CONFIG_BYTES,
    pack_run_config,
    payload_record,
    unpack_run_config,
)
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _message(cfg, labels, digest: str, payload: np.ndarray) -> Message:
    config = ConfigRecord(
        {
            keys.RUN_CONFIG: pack_run_config(cfg.to_json()),
            keys.LABELS: json.dumps(list(labels.names)),
            keys.INIT_DIGEST: digest,
            keys.SERVER_ROUND: 1,
        }
    )
    content = RecordDict({keys.ARRAYS: payload_record(payload), keys.CONFIG: config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(tmp_path: Path) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def test_valid_downlink_trains_and_tampered_downlink_is_refused(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"compression.downlink": "q8"})  # the stateless protocol
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

    cfg = tiny_config(tmp_path, **{"compression.downlink": "topk:0.1+q8+ef"})
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
