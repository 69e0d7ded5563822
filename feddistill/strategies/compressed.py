"""A strategy wrapper that speaks compressed updates on the wire and dense weights inside.

Built the way Flower wraps strategies for differential privacy
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): the inner strategy (FedAvg, FedAdam, ...)
never sees a compressed payload. Only the four hooks that touch the wire are overridden;
``Strategy.start`` and its round loop are inherited untouched.

Downlink, two protocols chosen by the downlink spec:

* without ``ef`` (e.g. ``q8``): every message carries ``encode(global - initial)``, a delta from
  the initial student that every node can rebuild, so a client that skipped any number of rounds
  still reconstructs the current model; the error stays bounded by one quantization step of the
  current delta. Stateless, but a pruned spec would lose whatever it drops.
* with ``ef`` (e.g. ``topk:0.01+q4+ef``): a chain of compressed deltas with server-side error
  feedback (:class:`feddistill.codec.chain.ChainSender`): each node gets the versions it missed
  since it last answered, or the broadcast model itself when that is cheaper. Messages to
  different nodes may then differ, and each is counted.

Uplink: a client's payload decodes to ``delta_i = student_i - received``; the wrapper hands the
inner strategy dense weights ``global + delta_i``, so FedAvg gives ``global + mean(delta)``,
FedAdam's pseudo-gradient is ``mean(delta)``, FedMedian takes the median delta, and with the
"none" codec everything equals Flower's own strategy on dense weights. Invalid replies are
dropped with a logged reason naming the node and the failed check, and counted as failures.

Resume (``feddistill.server.checkpoint``): ``Strategy.start`` always counts from round 1, so a run
resumed after round k sets ``round_offset = k`` and every hook sees ``k + round`` (the inner
strategy and the ``server-round`` it sends, traffic keys, codec seeds).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddistill import keys
from feddistill.codec import CompressionSpec, PayloadError, decode, encode
from feddistill.codec.chain import ChainSender
from feddistill.strategies.private import CentralPrivacy
from feddistill.wire import message_bytes, payload_record

log = logging.getLogger("feddistill.server")


@dataclass
class RoundTraffic:
    """What crossed the wire in one round, in serialized bytes, framing included."""

    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    eval_bytes_down: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    eval_failures: list[tuple[int, str]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    replies: int = 0
    round_failure: str = ""  # why aggregation left the global unchanged, if it did


class CompressedStrategy(Strategy):
    """Wrap ``inner`` so replies and broadcasts travel through the feddistill codec."""

    def __init__(
        self,
        inner: Strategy,
        *,
        schema: Sequence[tuple[str, tuple[int, ...]]],
        initial: dict[str, np.ndarray],
        uplink: CompressionSpec,
        downlink: CompressionSpec,
        max_payload_bytes: int,
        seed: int = 0,
        min_replies: int = 1,
        round_offset: int = 0,
        uniform: bool = False,
        privacy: CentralPrivacy | None = None,
    ) -> None:
        self.inner = inner
        self.privacy = privacy  # central DP: one step per hook (feddistill.strategies.private)
        self.uniform = uniform
        self.schema = [(n, tuple(s)) for n, s in schema]
        self.names = [n for n, _ in self.schema]
        self.initial = {n: np.asarray(initial[n], dtype=np.float32) for n in self.names}
        self.uplink = uplink
        self.downlink = downlink
        self.max_payload_bytes = max_payload_bytes
        self.seed = seed
        self.min_replies = min_replies
        self.round_offset = round_offset  # rounds completed before this start() (resume)
        self.traffic: dict[int, RoundTraffic] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._train_requests: dict[int, list[Message]] = {}  # to name nodes that never replied
        self.chain = (
            ChainSender(self.initial, downlink, chain=secrets.token_bytes(8), seed=seed)
            if downlink.error_feedback
            else None
        )
        self._inflight: dict[int, int] = {}  # node -> chain version its last message reaches

    # -- helpers ------------------------------------------------------------------------------
    def _round(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic())

    def _downlink_record(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        dense = {n: arrays[n].numpy() for n in self.names}
        self._global = dense
        delta = {n: dense[n] - self.initial[n] for n in self.names}
        encoded = encode(delta, self.downlink, seed=self.seed * 7919 + server_round)
        return payload_record(encoded.payload)

    def _compress_messages(
        self,
        server_round: int,
        messages: Iterable[Message],
        arrays: ArrayRecord,
        sink: dict[int, int],
    ) -> list[Message]:
        out = list(messages)
        if not out:
            return out
        if self.chain is not None:
            return self._chain_messages(out, arrays, sink)
        record = self._downlink_record(server_round, arrays)
        for msg in out:
            msg.content[self.inner_key] = record
            sink[msg.metadata.dst_node_id] = message_bytes(msg)
        return out

    def _chain_messages(
        self, out: list[Message], arrays: ArrayRecord, sink: dict[int, int]
    ) -> list[Message]:
        assert self.chain is not None
        self._global = {n: arrays[n].numpy() for n in self.names}
        self.chain.advance(self._global)
        self._inflight = {}
        for msg in out:
            node = msg.metadata.dst_node_id
            payload, version = self.chain.message_for(node)
            # Flower's strategies give every message of a round the same RecordDict; messages
            # differ here, so each gets its own (sharing the unchanged records).
            msg.content = RecordDict(dict(msg.content.items()))
            msg.content[self.inner_key] = payload_record(payload)
            self._inflight[node] = version
            sink[node] = message_bytes(msg)
        return out

    def _answered(self, node: int, ok: bool) -> None:
        """Track which chain version a node holds (only an answer proves it got there)."""
        if self.chain is None:
            return
        if ok and node in self._inflight:
            self.chain.acknowledge(node, self._inflight[node])
        elif not ok:
            self.chain.forget(node)

    @property
    def inner_key(self) -> str:
        return getattr(self.inner, "arrayrecord_key", keys.ARRAYS)

    def decode_reply(self, msg: Message) -> ArrayRecord:
        """Dense weights ``global + delta`` from one reply; PayloadError names the failed check."""
        content = msg.content
        if self.inner_key not in content.array_records:
            raise PayloadError("names", f"reply has no ArrayRecord {self.inner_key!r}")
        record = content.array_records[self.inner_key]
        if list(record.keys()) != [keys.PAYLOAD]:
            raise PayloadError("names", f"expected one array {keys.PAYLOAD!r}, got {list(record)}")
        array = record[keys.PAYLOAD]
        if array.stype == "raw" or array.dtype != "uint8" or len(array.shape) != 1:
            raise PayloadError(
                "dtype", f"payload must be 1-D uint8, got {array.dtype}{array.shape}"
            )
        if array.shape[0] > self.max_payload_bytes:
            raise PayloadError("size-limit", f"payload of {array.shape[0]} bytes over the limit")
        metrics = content.metric_records.get(keys.METRICS)
        n = None if metrics is None else metrics.get(keys.NUM_EXAMPLES)
        if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
            raise PayloadError("metrics", f"num-examples must be a positive number, got {n!r}")
        delta = decode(array.numpy(), self.schema, max_payload_bytes=self.max_payload_bytes)
        assert self._global is not None, "configure_train runs before aggregate_train"
        return ArrayRecord({n: Array(self._global[n] + delta[n]) for n in self.names})

    # -- the four wire hooks ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.privacy is not None:
            self.privacy.configure(config)
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        if self.privacy is not None:
            messages = self.privacy.select(list(messages))
        out = self._compress_messages(
            server_round, messages, arrays, self._round(server_round).bytes_down
        )
        self._train_requests[server_round] = out  # the Grid gives them ids when it sends them
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self._round(server_round)
        # Request id -> node. Errors the SuperLink makes up (a node that stopped sending
        # heartbeats) come from the SuperLink's own node id: name the node asked instead.
        asked = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self._train_requests.pop(server_round, [])
            if m.metadata.message_id  # empty if never sent through a Grid
        }
        valid: list[Message] = []
        for msg in replies:
            node = asked.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                reason = f"client error: {msg.error.reason}"
                self._answered(node, ok=False)
                stats.failures.append((node, reason))
                log.warning("round %d: node %s failed: %s", server_round, node, reason)
                continue
            stats.bytes_up[node] = message_bytes(msg)
            try:
                msg.content[self.inner_key] = self.decode_reply(msg)
            except PayloadError as err:
                reason = f"invalid payload ({err.check}): {err}"
                stats.failures.append((node, reason))
                log.warning("round %d: dropped reply of node %s: %s", server_round, node, reason)
                continue
            if self.uniform:  # every reply weighs the same in the inner strategy's average
                msg.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = 1.0
            self._answered(node, ok=True)
            valid.append(msg)
        for node in asked.values():  # sent, but nothing came back before the round timed out
            reason = "no reply within server.round-timeout"
            stats.failures.append((node, reason))
            log.warning("round %d: node %s failed: %s", server_round, node, reason)
        stats.replies = len(valid)
        if len(valid) < self.min_replies:
            # Too few clients answered (dropouts, timeouts, bad payloads): keep the global model
            # rather than let one or two clients move it.
            log.warning(
                "round %d: %d valid replies < server.min-replies = %d; global unchanged",
                server_round,
                len(valid),
                self.min_replies,
            )
            return None, None
        if self.privacy is not None:
            assert self._global is not None
            valid = self.privacy.privatize(
                server_round, valid, self._global, self.names, self.inner_key
            )
        result = self.inner.aggregate_train(server_round, valid)
        if result[1] is not None:
            stats.train_metrics = {k: float(v) for k, v in result[1].items()}  # type: ignore[arg-type]
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._compress_messages(
            server_round, messages, arrays, self._round(server_round).eval_bytes_down
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        stats = self._round(server_round)
        valid = []
        for msg in replies:
            if msg.has_error():
                node, reason = msg.metadata.src_node_id, str(msg.error.reason)
                self._answered(node, ok=False)
                stats.eval_failures.append((node, reason))
                log.warning("round %d: node %s failed to evaluate: %s", server_round, node, reason)
            else:
                self._answered(msg.metadata.src_node_id, ok=True)
                valid.append(msg)
        if not valid:
            return None
        metrics = self.inner.aggregate_evaluate(server_round, valid)
        if metrics is not None:
            stats.eval_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return metrics

    def summary(self) -> None:
        self.inner.summary()
        log.info("\t├── Uplink codec: %s", self.uplink.to_string())
        log.info("\t└── Downlink codec: %s", self.downlink.to_string())
