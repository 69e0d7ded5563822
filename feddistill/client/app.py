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
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddistill import keys
from feddistill.client import hostile
from feddistill.client.work import (
    ClientError,
    RoundInput,
    SecureInput,
    evaluate_round,
    train_round,
)
from feddistill.codec import PayloadError
from feddistill.config import Config, ConfigError, config_from_json
from feddistill.data import DataError
from feddistill.models.build import Labels, ModelError
from feddistill.records import metric_record, payload_record, unpack_run_config, unpack_run_id
from feddistill.secagg.protocol import Advertised
from feddistill.secagg.protocol import Client as SecAggClient
from feddistill.secagg.quantize import SecAggError

_MOD_FAILED_PRECONDITION = 6  # flwr.common.constant.ErrorCode.MOD_FAILED_PRECONDITION
# OSError: a missing or unreadable file or cache folder on the device (FileNotFoundError,
# PermissionError, disk full); its message names the path.
_EXPECTED = (ClientError, DataError, PayloadError, ModelError, ConfigError, OSError, SecAggError)
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
        local_epochs=_local_epochs(config.get(keys.LOCAL_EPOCHS, 0)),
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


def _local_epochs(value: object) -> int:
    """The round's local epochs from the server (``train.rising-epochs``); 0: not sent."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1000:
        raise PayloadError(
            "config", f"{keys.LOCAL_EPOCHS} must be an integer in [0, 1000], got {value!r}"
        )
    return value


def _error_reply(msg: Message, err: Exception) -> Message:
    reason = f"{type(err).__name__}: {err}"
    log.warning("client refused the round: %s", reason)
    return Message(Error(code=_MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        inp = unpack(msg)
        if keys.SECAGG in msg.content.config_records:
            inp.secure = _secure_input(msg, context, inp.server_round)
        payload, metrics = train_round(inp, dict(context.node_config))
        if inp.secure is not None:  # what it received is needed again to unmask
            _save_secagg(context, inp.server_round, inp.secure.client)
    except _EXPECTED as err:
        return _error_reply(msg, err)
    if hostile.tampers_metrics(inp.cfg, dict(context.node_config)):  # simulated attacks only
        record = MetricRecord({k: float(v) for k, v in metrics.items()})
    else:
        record = metric_record(keys.TRAIN_REPLY, metrics)
    content = RecordDict({keys.ARRAYS: payload_record(payload), keys.METRICS: record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        metrics = evaluate_round(unpack(msg), dict(context.node_config))
    except _EXPECTED as err:
        return _error_reply(msg, err)
    content = RecordDict({keys.METRICS: metric_record(keys.EVALUATE_REPLY, metrics)})
    return Message(content=content, reply_to=msg)


# -- secure aggregation: the protocol's steps on this node (feddistill.strategies.secure) -------
# A ClientApp keeps nothing in memory between messages: the round's keys live in the node's
# context state from step 0 to step 3 (node-local, never sent).


def _secagg_record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(keys.SECAGG)
    if record is None:
        raise SecAggError(f"the message has no {keys.SECAGG!r} record")
    return record


def _load_secagg(context: Context, server_round: int) -> SecAggClient:
    record = context.state.config_records.get(keys.SECAGG)
    if record is None or record.get("round") != server_round:
        raise SecAggError(f"no secure-aggregation keys of round {server_round} on this node")
    return SecAggClient.load(record["client"])  # type: ignore[arg-type]


def _save_secagg(context: Context, server_round: int, client: SecAggClient) -> None:
    context.state[keys.SECAGG] = ConfigRecord({"round": server_round, "client": client.dump()})


def _round_of(msg: Message) -> int:
    value = msg.content.config_records[keys.CONFIG].get(keys.SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggError(f"{keys.SERVER_ROUND} must be an integer, got {value!r}")
    return value


def _field(record: ConfigRecord, key: str, kind: type) -> object:
    value = record.get(key)
    elements = value if isinstance(value, list) else [value]
    if value is None or not all(isinstance(v, kind) and not isinstance(v, bool) for v in elements):
        raise SecAggError(f"{keys.SECAGG} field {key!r} is missing or of the wrong type")
    return value


def _secure_input(msg: Message, context: Context, server_round: int) -> SecureInput:
    record = _secagg_record(msg)
    peers = _field(record, "from", int)
    cts = _field(record, "ciphertexts", bytes)
    assert isinstance(peers, list) and isinstance(cts, list)
    if len(peers) != len(cts):
        raise SecAggError("as many senders as shares expected")
    client = _load_secagg(context, server_round)
    if _field(record, "you", int) != client.cid:
        raise SecAggError("the server names this node differently than in the share step")
    noise: dict[str, Any] = {}
    if "noise-multiplier" in record:  # distributed DP
        noise = {
            "noise_multiplier": float(_field(record, "noise-multiplier", float)),  # type: ignore[arg-type]
            "threshold": int(_field(record, "threshold", int)),  # type: ignore[call-overload]
        }
    return SecureInput(
        client,
        dict(zip(peers, cts, strict=True)),
        int(_field(record, "pattern-seed", int)),  # type: ignore[call-overload]
        int(_field(record, "clients", int)),  # type: ignore[call-overload]
        **noise,
    )


def _reply(msg: Message, values: dict[str, object]) -> Message:
    content = RecordDict({keys.SECAGG: ConfigRecord(values)})  # type: ignore[arg-type]
    return Message(content=content, reply_to=msg)


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    """Step 0: fresh keys for this round; their public halves and the self-mask commitment."""
    try:
        server_round = _round_of(msg)
        client = SecAggClient(0)  # its index in the round comes with the next step
        _save_secagg(context, server_round, client)
        ad = client.advertise()
    except _EXPECTED as err:
        return _error_reply(msg, err)
    return _reply(
        msg,
        {
            "encryption-key": ad.encryption_key,
            "mask-key": ad.mask_key,
            "commitment": ad.self_mask_commitment,
        },
    )


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """Step 1: Shamir shares of this round's secrets, encrypted to each other client."""
    try:
        server_round = _round_of(msg)
        record = _secagg_record(msg)
        enc = _field(record, "encryption-keys", bytes)
        mask = _field(record, "mask-keys", bytes)
        commit = _field(record, "commitments", bytes)
        assert isinstance(enc, list) and isinstance(mask, list) and isinstance(commit, list)
        if not len(enc) == len(mask) == len(commit):
            raise SecAggError("a roster of keys of different lengths")
        roster = {
            i + 1: Advertised(e, m, c)
            for i, (e, m, c) in enumerate(zip(enc, mask, commit, strict=True))
        }
        client = _load_secagg(context, server_round)
        client.cid = int(_field(record, "you", int))  # type: ignore[call-overload]
        ciphertexts = client.share_keys(roster, int(_field(record, "threshold", int)))  # type: ignore[call-overload]
        _save_secagg(context, server_round, client)
    except _EXPECTED as err:
        return _error_reply(msg, err)
    to = sorted(ciphertexts)
    return _reply(msg, {"to": to, "ciphertexts": [ciphertexts[j] for j in to]})


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Step 3: for each client of the round, the share the survivors list allows."""
    try:
        server_round = _round_of(msg)
        survivors = _field(_secagg_record(msg), "survivors", int)
        assert isinstance(survivors, list)
        shares = _load_secagg(context, server_round).unmask(survivors)
        del context.state[keys.SECAGG]  # the round's secrets are spent
    except _EXPECTED as err:
        return _error_reply(msg, err)
    owners = sorted(shares)
    return _reply(
        msg,
        {
            "owners": owners,
            "kinds": [shares[o].kind for o in owners],
            "shares": [shares[o].data for o in owners],
        },
    )
