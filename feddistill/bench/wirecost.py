"""Exact bytes of a dense float32 FedAvg exchange, measured on real Flower messages.

Used for scenarios too slow to run (FedAvg of the whole teacher): the messages are built as
Flower's FedAvg would send them (an ArrayRecord of float32 arrays, plus the run config down and
the metrics up) and sized with :func:`feddistill.records.message_bytes`, the same count the
strategy wrapper records for runs that do happen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from feddistill import keys
from feddistill.flower_compat import lent_task_identity
from feddistill.records import message_bytes


@dataclass(frozen=True)
class DenseCost:
    """Bytes of one client's round: ``down`` (server -> client) and ``up`` (its reply)."""

    parameters: int
    arrays: int
    down: int
    up: int

    @property
    def per_client_round(self) -> int:
        return self.down + self.up


def dense_exchange_bytes(
    arrays: dict[str, np.ndarray], config: Mapping[str, Any] | None = None
) -> DenseCost:
    """Sizes of a dense float32 round trip carrying ``arrays`` (name -> array).

    Down: ``{arrays: ArrayRecord, config: ConfigRecord(config)}`` as ``configure_train`` sends;
    up: ``{arrays: ArrayRecord, metrics: MetricRecord}`` as a client replies. Each is the array
    bytes (``numel * 4``) plus Flower's framing (record and array headers, chunk objects).
    """
    record = ArrayRecord(
        {n: Array(np.ascontiguousarray(a, dtype=np.float32)) for n, a in arrays.items()}
    )
    with lent_task_identity():  # Message() needs one; it is not counted
        down, up = _round_trip(record, config, arrays)
    return DenseCost(
        parameters=int(sum(a.size for a in arrays.values())),
        arrays=len(arrays),
        down=message_bytes(down),
        up=message_bytes(up),
    )


def _round_trip(
    record: ArrayRecord, config: Mapping[str, Any] | None, arrays: dict[str, np.ndarray]
) -> tuple[Message, Message]:
    down = Message(
        RecordDict({keys.ARRAYS: record, keys.CONFIG: ConfigRecord(dict(config or {}))}),
        dst_node_id=1,
        message_type="train",
    )
    reply_record = ArrayRecord(
        {n: Array(np.ascontiguousarray(a, dtype=np.float32)) for n, a in arrays.items()}
    )
    metrics = MetricRecord({keys.NUM_EXAMPLES: 1.0, keys.TRAIN_LOSS: 0.0})
    up = Message(
        RecordDict({keys.ARRAYS: reply_record, keys.METRICS: metrics}),
        dst_node_id=1,
        message_type="train",
    )
    return down, up


def trainable_arrays(model: object) -> dict[str, np.ndarray]:
    """Every parameter with ``requires_grad`` as float32 (what FedAvg of the model ships)."""
    return {
        n: p.detach().cpu().float().numpy()
        for n, p in model.named_parameters()  # type: ignore[attr-defined]
        if p.requires_grad
    }
