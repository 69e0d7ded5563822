"""Flower-side packing of codec payloads and exact byte counting (shared by both apps)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from feddistill import keys


def payload_record(payload: np.ndarray) -> ArrayRecord:
    """One uint8 Array per message: each Array costs ~128 bytes of framing."""
    return ArrayRecord({keys.PAYLOAD: Array(np.ascontiguousarray(payload, dtype=np.uint8))})


def message_bytes(msg: Message) -> int:
    """Serialized size of a message's content: every object Flower ships, headers included.

    Flower stores and transfers a message as content-addressed objects (RecordDict, records,
    Arrays, array chunks); the sum of their deflated sizes is what crosses the wire, apart from
    transport framing (gRPC/HTTP), which is the same for any payload.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg.content).values())
