"""The ClientApp: unpack the message, call :mod:`feddistill.client.work`, pack the reply.

The same app serves simulation (node config carries ``partition-id``) and deployment (node config
carries ``data-path`` and ``cache-dir``). A failed precondition (bad local data, a tampered
downlink, a model mismatch) is answered with an error reply naming the problem, never a crash.
"""

from __future__ import annotations

import functools
import json
import logging
import math

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from feddistill import keys
from feddistill.client.work import ClientError, RoundInput, evaluate_round, train_round
from feddistill.codec import PayloadError
from feddistill.config import Config, ConfigError, config_from_json
from feddistill.data import DataError
from feddistill.models.build import Labels, ModelError
from feddistill.records import metric_record, payload_record, unpack_run_config, unpack_run_id

_MOD_FAILED_PRECONDITION = 6  # flwr.common.constant.ErrorCode.MOD_FAILED_PRECONDITION
# OSError: a missing or unreadable file or cache folder on the device (FileNotFoundError,
# PermissionError, disk full); its message names the path.
_EXPECTED = (ClientError, DataError, PayloadError, ModelError, ConfigError, OSError)
log = logging.getLogger("feddistill.client")

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _run_config(packed: bytes) -> Config:
    """The run config a server message carries, parsed once per process: every message of a
    run carries the same bytes, and a simulation worker serves many clients (~2 ms a parse)."""
    return config_from_json(unpack_run_config(packed))


def unpack(msg: Message) -> RoundInput:
    config = msg.content[keys.CONFIG]
    record = msg.content[keys.ARRAYS]
    if keys.PAYLOAD not in record:
        raise PayloadError("names", f"downlink has no {keys.PAYLOAD!r} array")
    array = record[keys.PAYLOAD]
    if array.dtype != "uint8" or array.stype == "raw":
        raise PayloadError("dtype", f"downlink payload must be uint8, got {array.dtype}")
    return RoundInput(
        cfg=_run_config(_packed_config(config[keys.RUN_CONFIG])),
        labels=Labels(tuple(json.loads(str(config[keys.LABELS])))),
        init_digest=str(config.get(keys.INIT_DIGEST, "")),
        payload=array.numpy(),
        server_round=int(config.get(keys.SERVER_ROUND, 0)),
        proximal_mu=float(config.get(keys.PROXIMAL_MU, 0.0)),
        run_id=unpack_run_id(config.get(keys.RUN_ID)),
        clip_norm=_clip_norm(config.get(keys.CLIP_NORM, 0.0)),
    )


def _packed_config(value: object) -> bytes:
    if not isinstance(value, bytes):  # what unpack_run_config says, before it reaches a cache
        unpack_run_config(value)
    return value  # type: ignore[return-value]


def _clip_norm(value: object) -> float:
    """The round's clip from the server (adaptive clipping); a finite positive float or 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError("config", f"{keys.CLIP_NORM} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise PayloadError("config", f"{keys.CLIP_NORM} must be finite and >= 0, got {value!r}")
    return float(value)


def _error_reply(msg: Message, err: Exception) -> Message:
    reason = f"{type(err).__name__}: {err}"
    log.warning("client refused the round: %s", reason)
    return Message(Error(code=_MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        payload, metrics = train_round(unpack(msg), dict(context.node_config))
    except _EXPECTED as err:
        return _error_reply(msg, err)
    content = RecordDict(
        {
            keys.ARRAYS: payload_record(payload),
            keys.METRICS: metric_record(keys.TRAIN_REPLY, metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        metrics = evaluate_round(unpack(msg), dict(context.node_config))
    except _EXPECTED as err:
        return _error_reply(msg, err)
    content = RecordDict({keys.METRICS: metric_record(keys.EVALUATE_REPLY, metrics)})
    return Message(content=content, reply_to=msg)
