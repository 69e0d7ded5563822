"""Flower-side packing of codec payloads and exact byte counting (shared by both apps)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from feddistill import keys
from feddistill.codec import PayloadError

# A run config is ~2 KB of JSON; anything near this is not one (a zip bomb, a wrong field).
MAX_RUN_CONFIG_BYTES = 1 << 20
RUN_ID_BYTES = 8  # random: two runs share an id with probability ~2**-64


def payload_record(payload: np.ndarray) -> ArrayRecord:
    """One uint8 Array per message: each Array costs ~128 bytes of framing."""
    return ArrayRecord({keys.PAYLOAD: Array(np.ascontiguousarray(payload, dtype=np.uint8))})


def metric_record(schema: keys.ReplySchema, metrics: dict[str, float]) -> MetricRecord:
    """The reply's MetricRecord, holding exactly what ``schema`` declares.

    The server drops unknown keys and refuses replies without a required one
    (:mod:`feddistill.strategies.admission`); checking here makes a key added on one side only
    fail in the client's own tests, not silently on the server.
    """
    unknown = sorted(set(metrics) - set(schema.metric_keys))
    missing = [k for k in schema.required if k not in metrics]
    if unknown or missing:
        raise ValueError(
            f"reply metrics do not match their schema: unknown {unknown}, missing {missing}; "
            "declare new keys in feddistill.keys"
        )
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's content: every object Flower ships, headers included.

    Flower stores and transfers a message as content-addressed objects (RecordDict, records,
    Arrays, array chunks); the sum of their deflated sizes is what crosses the wire, apart from
    transport framing (gRPC/HTTP), which is the same for any payload.
    """
    return sum(len(obj.deflate()) for obj in nested_objects(msg.content).values())


def nested_objects(obj: Any) -> dict[str, Any]:
    """``obj`` and every object nested in it, by object id (an object shipped once per id).

    Flower's ``get_all_nested_objects`` (in ``flwr.supercore``, outside the public API), walked
    through the ``children`` and ``object_id`` that ``flwr.app``'s records document;
    tests/test_flower_compat.py keeps the two equal.
    """
    found: dict[str, Any] = {}
    for child in (obj.children or {}).values():
        found.update(nested_objects(child))
    found[obj.object_id] = obj
    return found


def server_config(
    cfg_json: str, label_names: Sequence[str], init_digest: str, run_id: bytes
) -> dict[str, Any]:
    """The ConfigRecord entries every server message carries (the bench sizes the same ones).

    ``run_id`` (:data:`RUN_ID_BYTES` bytes) scopes what clients keep between rounds
    (error-feedback residuals, a mutually trained teacher) to this run: a new run in the same
    cache folder never continues an earlier run's state.
    """
    if len(run_id) != RUN_ID_BYTES:
        raise ValueError(f"run id must be {RUN_ID_BYTES} bytes, got {len(run_id)}")
    return {
        keys.RUN_CONFIG: pack_run_config(cfg_json),
        keys.LABELS: json.dumps(list(label_names)),
        keys.INIT_DIGEST: init_digest,
        keys.RUN_ID: bytes(run_id),
    }


def unpack_run_id(value: object) -> str:
    """The run id a client received, as hex; "" when the server sent none (an older server).

    Raises:
        PayloadError: ("config") a value that is not :data:`RUN_ID_BYTES` bytes.
    """
    if value is None:
        return ""
    if not isinstance(value, bytes) or len(value) != RUN_ID_BYTES:
        raise PayloadError(
            "config", f"{keys.RUN_ID} must be {RUN_ID_BYTES} bytes, got {value!r:.40}"
        )
    return value.hex()


def pack_run_config(cfg_json: str) -> bytes:
    """The run config for a ConfigRecord, zlib-compressed.

    Every training and evaluation message carries it (a ClientApp keeps no state between
    messages); as plain JSON it was ~1.7 KB of each message, a quarter of the embedded default's
    downlink, and compresses to ~0.7 KB.
    """
    return zlib.compress(cfg_json.encode("utf-8"), 9)


def unpack_run_config(value: object) -> str:
    """Inverse of :func:`pack_run_config`, refusing anything else with a named PayloadError.

    Decompression stops at `MAX_RUN_CONFIG_BYTES`, so a hostile value cannot make the client
    allocate more than that.
    """
    if not isinstance(value, bytes):
        raise PayloadError(
            "config", f"run config must be zlib-compressed bytes, got {type(value).__name__}"
        )
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(value, MAX_RUN_CONFIG_BYTES)
    except zlib.error as err:
        raise PayloadError("config", f"run config is not zlib data: {err}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise PayloadError(
            "config",
            f"run config is truncated or inflates past {MAX_RUN_CONFIG_BYTES} bytes",
        )
    if inflater.unused_data:
        raise PayloadError("config", "run config has bytes after the compressed stream")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("config", "run config is not UTF-8 text") from None
