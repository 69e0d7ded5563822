"""A strategy wrapper that speaks compressed updates on the wire and dense weights inside.

Built the way Flower wraps strategies for differential privacy
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): the inner strategy (FedAvg, FedAdam, ...)
never sees a compressed payload. Only the four hooks that touch the wire are overridden;
``Strategy.start`` and its round loop are inherited untouched.

Downlink, two protocols (``compression.downlink-protocol``, the ``chained`` argument):

* stateless: every message carries ``encode(global - initial)``, a delta from
  the initial student that every node can rebuild, so a client that skipped any number of rounds
  still reconstructs the current model; the error stays bounded by one quantization step of the
  current delta. Stateless, but a pruned spec would lose whatever it drops.
* chain (the default): a chain of compressed deltas with server-side error
  feedback (:class:`feddistill.codec.chain.ChainSender`): each node gets the versions it missed
  since it last answered, or the broadcast model itself when that is cheaper. Messages to
  different nodes may then differ, and each is counted.

Uplink: a client's payload decodes to ``delta_i = student_i - received``; the wrapper hands the
inner strategy dense weights ``global + delta_i``, so FedAvg gives ``global + mean(delta)``,
FedAdam's pseudo-gradient is ``mean(delta)``, FedMedian takes the median delta, and with the
"none" codec everything equals Flower's own strategy on dense weights.

The inner strategy sees the model as one flat array (:data:`FLAT`, every exchanged parameter
in schema order), and Flower's round loop sees it by parameter name. A Flower ``Array`` is
serialized with ``np.save`` when made and parsed again on every ``.numpy()``: one array instead
of one per parameter (37 for the default student) takes most of the server's share of a
round off (docs/scaling.md). Flower's strategies are elementwise (FedAvg, FedAvgM, FedOpt,
median, trimmed mean) or use whole-model distances (Krum, Bulyan), so the result is the same;
elementwise ones give it bit for bit.

Admission control (:mod:`feddistill.strategies.admission`, docs/robustness.md): every reply,
training and evaluation, is checked against its declared schema (`keys.TRAIN_REPLY`,
`keys.EVALUATE_REPLY`) before the inner strategy sees it, and each decoded update against the
round's norm bound and for a finite ``global + delta``. A reply that fails is dropped with a
logged reason naming the node and the rule, and counted as a failure; an exception raised by the
inner strategy while aggregating fails the round (global unchanged), never the server.

Resume (``feddistill.server.checkpoint``): ``Strategy.start`` always counts from round 1, so a run
resumed after round k sets ``round_offset = k`` and every hook sees ``k + round`` (the inner
strategy and the ``server-round`` it sends, traffic keys, codec seeds). What else must survive a
restart is declared by :meth:`CompressedStrategy.state_dict`: the downlink chain and the inner
strategy's state (:mod:`feddistill.strategies.state`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddistill import keys
from feddistill.codec import CompressionSpec, PayloadError, decode, encode, max_encoded_bytes
from feddistill.codec.chain import DIGEST_CHECK, ChainSender
from feddistill.codec.wire import unflatten
from feddistill.records import message_bytes, payload_record
from feddistill.secagg.quantize import SecAggError
from feddistill.strategies.admission import (
    AdmissionError,
    AdmissionPolicy,
    all_finite,
    arrival_evaluation,
    check_metrics,
    check_num_examples,
    check_records,
    clip_target,
    direction_cosines,
    examples_cap,
    norm_bound,
    update_norm,
)
from feddistill.strategies.private import CentralPrivacy, DistributedPrivacy
from feddistill.strategies.secure import SecureAggregation
from feddistill.strategies.state import (
    UndeclaredStateError,
    load_strategy_state_dict,
    strategy_state_dict,
)

log = logging.getLogger("feddistill.server")
_T = TypeVar("_T")

FLAT = "feddistill.flat"  # the inner strategy's one array: the exchanged parameters, flattened

# Headroom over the encoder's worst case (`max_encoded_bytes`), so that a codec change that
# grows payloads a little fails the codec's bound test rather than every reply of a federation.
PAYLOAD_MARGIN_FRACTION = 0.01
PAYLOAD_MARGIN_BYTES = 1024


def payload_limit(
    schema: Sequence[tuple[str, tuple[int, ...]]], spec: CompressionSpec, cap: int
) -> int:
    """The longest uplink payload accepted: the encoder's worst case for this model and spec,
    plus a margin, and never above ``cap`` (``compression.max-payload-mb``)."""
    worst = max_encoded_bytes(schema, spec)
    return min(cap, worst + int(worst * PAYLOAD_MARGIN_FRACTION) + PAYLOAD_MARGIN_BYTES)


@dataclass
class RoundTraffic:
    """What crossed the wire in one round, in serialized bytes, framing included."""

    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    eval_bytes_down: dict[int, int] = field(default_factory=dict)
    eval_bytes_up: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    eval_failures: list[tuple[int, str]] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    replies: int = 0
    round_failure: str = ""  # why aggregation left the global unchanged, if it did
    update_norms: dict[int, float] = field(default_factory=dict)  # L2 norm of each decoded update
    update_cosines: dict[int, float] = field(default_factory=dict)  # with the others' (rule 6)
    clipped: list[tuple[int, float, float]] = field(default_factory=list)  # node, norm, bound
    capped_examples: list[tuple[int, int, int]] = field(default_factory=list)  # node, claim, cap
    eval_capped_examples: list[tuple[int, int, int]] = field(default_factory=list)
    aggregation_errors: list[str] = field(default_factory=list)  # the inner strategy raised
    secure_bytes: dict[str, int] = field(default_factory=dict)  # secure aggregation, by step
    secure_dropouts: int = 0  # shared keys (step 1) but sent no masked vector
    secure_bits_per_weight: float = 0.0  # a client's bytes, all steps, x 8 / exchanged weights
    local_epochs: int | None = None  # what the round's training messages asked for
    # the previous round's global on this round's training clients' validation splits
    arrival_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Candidate:
    """A reply that passed the per-reply checks, waiting for the round-wide ones."""

    node: int
    msg: Message
    metrics: dict[str, float]
    examples: int
    known: int | None  # the node's example count where the server knows it (simulation)
    delta: dict[str, np.ndarray] = field(default_factory=dict)
    norm: float = 0.0
    masked: np.ndarray | None = None  # secure aggregation: the masked vector instead of delta


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
        chained: bool = False,
        seed: int = 0,
        min_replies: int = 1,
        round_offset: int = 0,
        uniform: bool = False,
        admission: AdmissionPolicy | None = None,
        known_examples: Callable[[int], tuple[int, int] | None] | None = None,
        privacy: CentralPrivacy | None = None,
        secure: SecureAggregation | None = None,
        step: float = 1.0,
    ) -> None:
        self.inner = inner
        # The server step along the inner strategy's move (1: exactly the inner strategy's
        # model); set for the robust rules from server.robust-step, which, unlike FedAvgM,
        # take no step of their own.
        self.step = step
        self.secure = secure  # secure aggregation: the server sees only the sum
        self.privacy = privacy  # central DP: one step per hook (feddistill.strategies.private)
        self.uniform = uniform
        self.schema = [(n, tuple(s)) for n, s in schema]
        self.names = [n for n, _ in self.schema]
        self.initial = {n: np.asarray(initial[n], dtype=np.float32) for n in self.names}
        self.uplink = uplink
        self.downlink = downlink
        self.max_payload_bytes = payload_limit(self.schema, uplink, max_payload_bytes)
        if secure is not None:  # a masked vector: at most 8 bytes for each shared coordinate
            self.max_payload_bytes = max(self.max_payload_bytes, 8 * secure.max_length)
        self._grid: Grid | None = None  # secure aggregation: the round's Grid, for step 3
        self.admission = admission or AdmissionPolicy()
        # node -> (training, validation) examples it holds, where the server knows (simulation)
        self.known_examples = known_examples
        self.seed = seed
        self.min_replies = min_replies
        self.round_offset = round_offset  # rounds completed before this start() (resume)
        self.traffic: dict[int, RoundTraffic] = {}
        # ConfigRecord entries the server run decides per round (the next round's local epochs)
        self.train_overrides: dict[str, int] = {}
        self._global: dict[str, np.ndarray] | None = None  # the round's global, by name
        self._global_flat: np.ndarray | None = None  # the same, flattened (FLAT)
        self._returned: tuple[ArrayRecord, dict[str, np.ndarray]] | None = None
        # (step, round) -> the messages sent, to name nodes that never replied
        self._requests: dict[tuple[str, int], list[Message]] = {}
        if downlink.error_feedback:
            raise ValueError(
                f"downlink spec {downlink.to_string()!r} asks for error feedback: on the downlink "
                "that is the chained protocol's own (pass chained=True), never a spec token"
            )
        self.chain = (
            ChainSender(self.initial, downlink, chain=secrets.token_bytes(8), seed=seed)
            if chained
            else None
        )
        self._inflight: dict[int, int] = {}  # node -> chain version its last message reaches

    # -- helpers ------------------------------------------------------------------------------
    def _round(self, server_round: int) -> RoundTraffic:
        return self.traffic.setdefault(server_round, RoundTraffic())

    def dense(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """``arrays`` by name; the record this wrapper returned last is not parsed again."""
        if self._returned is not None and self._returned[0] is arrays:
            return self._returned[1]
        return {n: arrays[n].numpy() for n in self.names}

    def _receive_global(self, arrays: ArrayRecord) -> ArrayRecord:
        """Remember the round's global (by name and flat); the inner strategy's view of it."""
        self._global = self.dense(arrays)
        self._global_flat = self._flatten(self._global)
        return self._flat_record(self._global_flat)

    def _flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.ravel(arrays[n]) for n in self.names])

    def _unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return unflatten(self.names, flat, dict(self.schema))

    def _flat_record(self, flat: np.ndarray) -> ArrayRecord:
        return ArrayRecord({FLAT: Array(flat)})

    def _downlink_record(self, server_round: int, dense: dict[str, np.ndarray]) -> ArrayRecord:
        delta = {n: dense[n] - self.initial[n] for n in self.names}
        encoded = encode(delta, self.downlink, seed=self.seed * 7919 + server_round)
        return payload_record(encoded.payload)

    def _compress_messages(
        self, server_round: int, messages: Iterable[Message], sink: dict[int, int]
    ) -> list[Message]:
        """Each message with the encoded global (``_receive_global`` ran) in place of the
        arrays the inner strategy put there; its serialized size into ``sink``."""
        out = list(messages)
        if not out:
            return out
        if self.chain is not None:
            return self._chain_messages(out, sink)
        record = self._downlink_record(server_round, self._global)
        for msg in out:
            msg.content[self.inner_key] = record
        # Flower's strategies give every message of a round one RecordDict: size it once.
        sizes: dict[int, int] = {}
        for msg in out:
            key = id(msg.content)
            if key not in sizes:
                sizes[key] = message_bytes(msg)
            sink[msg.metadata.dst_node_id] = sizes[key]
        return out

    def _chain_messages(self, out: list[Message], sink: dict[int, int]) -> list[Message]:
        assert self.chain is not None and self._global is not None
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

    def _answered(self, node: int, ok: bool, reason: str = "") -> None:
        """Track which chain version a node holds (only an answer proves it got there).

        A node that found its cached version is not ours (``reason`` names the failed
        ``chain-digest`` check) gets the whole model next; any other failure only forgets it.
        """
        if self.chain is None:
            return
        if ok and node in self._inflight:
            self.chain.acknowledge(node, self._inflight[node])
        elif not ok and f"[{DIGEST_CHECK}]" in reason:
            self.chain.rebuild(node)
        elif not ok:
            self.chain.forget(node)

    # -- resume -------------------------------------------------------------------------------
    @property
    def accountant(self) -> CentralPrivacy | DistributedPrivacy | None:
        """What reports epsilon: central DP's step, or distributed DP's (secure aggregation)."""
        if self.privacy is not None:
            return self.privacy
        return None if self.secure is None else self.secure.privacy

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs from this wrapper: the downlink chain (``None`` for the
        stateless downlink), the inner strategy's state and the privacy step's (its clip). The
        round offset is not in it: it is the checkpoint's round, set by
        :func:`feddistill.server.checkpoint.restore`; traffic counters are in the run record;
        the rest is rebuilt by each round's hooks."""
        return {
            "chain": None if self.chain is None else self.chain.state_dict(),
            "inner": strategy_state_dict(self.inner),
            "privacy": None if self.privacy is None else self.privacy.state_dict(),
            "secure": None if self.secure is None else self.secure.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a wrapper built with the same settings."""
        if (state["chain"] is None) != (self.chain is None):
            protocol = "chain" if self.chain is not None else "stateless"
            raise ValueError(
                "saved downlink state does not match compression.downlink-protocol = "
                f"{protocol!r}: was the downlink protocol changed?"
            )
        if (state["privacy"] is None) != (self.privacy is None):
            raise ValueError("saved privacy state does not match privacy.mode: was it changed?")
        if self.chain is not None:
            self.chain.load_state_dict(state["chain"])
        load_strategy_state_dict(self.inner, state["inner"])
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])
        if (state.get("secure") is None) != (self.secure is None):
            raise ValueError(
                "saved secure-aggregation state does not match secure.aggregation: was it changed?"
            )
        if self.secure is not None:
            self.secure.load_state_dict(state["secure"])

    @property
    def inner_key(self) -> str:
        return getattr(self.inner, "arrayrecord_key", keys.ARRAYS)

    def decode_delta(self, msg: Message) -> dict[str, np.ndarray]:
        """The update ``delta`` of one reply; PayloadError names the failed check."""
        payload = self._payload(msg)
        return decode(payload, self.schema, max_payload_bytes=self.max_payload_bytes)

    def _payload(self, msg: Message) -> np.ndarray:
        """The one uint8 payload array of a training reply, within the size limit."""
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
            raise PayloadError(
                "size-limit",
                f"payload of {array.shape[0]} bytes over the limit of {self.max_payload_bytes} "
                f"for this model and uplink {self.uplink.to_string()!r}",
            )
        return array.numpy()

    def _admit(
        self, server_round: int, node: int, msg: Message, schema: keys.ReplySchema
    ) -> _Candidate:
        """Records, metrics and num-examples of one reply (rules 1-3 of the admission module)."""
        content = msg.content
        extra = check_records(content, schema, self.inner_key if schema.payload else None)
        metrics, unknown = check_metrics(content.metric_records[keys.METRICS], schema)
        sizes = self.known_examples(node) if self.known_examples is not None else None
        known = None if sizes is None else sizes[0 if schema.payload else 1]
        examples = check_num_examples(metrics[keys.NUM_EXAMPLES], positive=schema.payload)
        dropped = extra + [f"metric {k!r}" for k in unknown]
        if dropped:
            shown = ", ".join(dropped[:5]) + (
                f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
            )
            log.info(
                "round %d: node %s: dropped what no schema declares: %s", server_round, node, shown
            )
        return _Candidate(node, msg, metrics, examples, known)

    def _refuse(
        self, sink: list[tuple[int, str]], server_round: int, node: int, err: Exception
    ) -> None:
        if isinstance(err, PayloadError):
            reason = f"invalid payload ({err.check}): {err}"
        else:
            reason = f"rejected ({getattr(err, 'rule', 'admission')}): {err}"
        sink.append((node, reason))
        log.warning("round %d: dropped reply of node %s: %s", server_round, node, reason)

    def _cap_examples(
        self, server_round: int, candidates: list[_Candidate], sink: list[tuple[int, int, int]]
    ) -> None:
        """No claim above what the node holds where the server knows it (simulation: its
        partition's split), nor, where it does not (deployment), above
        ``server.max-examples-factor`` times the round's median claim. Capped, not refused: the
        claim is the only lie, and the cap takes away its weight while the update still counts
        as its data's (the other rules judge the update)."""
        for c in candidates:  # first the known sizes, so that no false claim sets the median
            if c.known is not None and c.examples > c.known:
                self._capped(server_round, c, c.known, "its partition's size", sink)
        cap = examples_cap([c.examples for c in candidates], self.admission.max_examples_factor)
        for c in candidates:
            if cap is not None and c.known is None and c.examples > cap:
                self._capped(server_round, c, cap, "server.max-examples-factor", sink)

    @staticmethod
    def _capped(
        server_round: int, c: _Candidate, limit: int, why: str, sink: list[tuple[int, int, int]]
    ) -> None:
        sink.append((c.node, c.examples, limit))
        log.warning(
            "round %d: node %s claims %s = %d; capped at %d (%s)",
            server_round,
            c.node,
            keys.NUM_EXAMPLES,
            c.examples,
            limit,
            why,
        )
        c.examples = limit

    def _arrival(self, candidates: list[_Candidate]) -> dict[str, float]:
        """The global these clients received (the previous round's), on their validation
        splits before they trained: every admitted reply that carries the figures counts."""
        reports = [
            (
                c.metrics[keys.ARRIVAL_ACCURACY],
                c.metrics[keys.ARRIVAL_LOSS],
                max(int(c.metrics[keys.ARRIVAL_EXAMPLES]), 0),
            )
            for c in candidates
            if all(k in c.metrics for k in keys.ARRIVAL_KEYS)
        ]
        return arrival_evaluation(reports, self.admission.max_examples_factor) or {}

    def _shared_metrics(self, candidates: list[_Candidate]) -> set[str]:
        """Metric keys every candidate carries: Flower's aggregation refuses replies whose keys
        differ, so an optional key some replies lack is left out of this round's aggregate.
        The arrival evaluation is never handed on: the wrapper weighs it itself, by validation
        rows, in :meth:`_arrival`."""
        carried = [set(c.metrics) - set(keys.ARRIVAL_KEYS) for c in candidates]
        shared = set.intersection(*carried)
        lacking = set.union(*carried) - shared
        if lacking:
            log.info(
                "metrics %s are not in every reply; left out of this round's aggregate",
                sorted(lacking),
            )
        return shared

    def _bounded_updates(
        self, server_round: int, candidates: list[_Candidate], stats: RoundTraffic
    ) -> list[Message]:
        """The round-wide rules (examples cap, update norm, finite after apply), then each
        surviving reply rebuilt as what the inner strategy expects: dense ``global + delta``
        and the admitted metrics only."""
        if not candidates:
            return []
        self._cap_examples(server_round, candidates, stats.capped_examples)
        for c in candidates:
            c.norm = update_norm(c.delta)
            stats.update_norms[c.node] = c.norm
        norms = [c.norm for c in candidates]
        bound = norm_bound(norms, self.admission)
        shared = self._shared_metrics(candidates)
        assert self._global_flat is not None, "configure_train runs before aggregate_train"
        kept: list[tuple[_Candidate, np.ndarray]] = []
        for c in candidates:
            delta = self._flatten(c.delta)
            if bound is not None and c.norm > bound:
                if self.admission.norm_action == "reject":
                    err = AdmissionError(
                        "update-norm",
                        f"update L2 norm {c.norm:.4g} > bound {bound:.4g} (server.max-update-norm"
                        "-ratio x the round's median norm, or server.max-update-norm)",
                    )
                    self._refuse(stats.failures, server_round, c.node, err)
                    continue
                target = clip_target(norms, bound, self.admission)
                delta = delta * np.float32(target / c.norm)
                stats.clipped.append((c.node, c.norm, target))
                log.warning(
                    "round %d: update of node %s clipped from L2 norm %.4g to %.4g",
                    server_round,
                    c.node,
                    c.norm,
                    target,
                )
            kept.append((c, delta))
        kept = self._aligned(server_round, kept, stats)
        out = []
        while kept:  # popped, so that each flat update is freed once its model is built
            c, delta = kept.pop(0)
            with np.errstate(over="ignore"):  # an overflow to Inf is refused just below
                dense = self._global_flat + delta
            if not all_finite({FLAT: dense}):
                err = AdmissionError("non-finite", "global + update is not finite (overflow)")
                self._refuse(stats.failures, server_round, c.node, err)
                continue
            out.append(self._rebuilt(c, shared, self._flat_record(dense)))
        return out

    def _aligned(
        self, server_round: int, kept: list[tuple[_Candidate, np.ndarray]], stats: RoundTraffic
    ) -> list[tuple[_Candidate, np.ndarray]]:
        """The direction rule: updates pointing away from the round's other updates (a cosine
        with the sum of their directions below ``server.min-update-cosine``) are refused."""
        floor = self.admission.min_update_cosine
        cosines = direction_cosines([d for _, d in kept]) if floor > -1.0 else None
        if cosines is None:
            return kept
        out = []
        for (c, delta), cos in zip(kept, cosines, strict=True):
            stats.update_cosines[c.node] = cos
            if cos < floor:
                err = AdmissionError(
                    "update-direction",
                    f"update's cosine {cos:.3f} with the round's other updates < "
                    f"server.min-update-cosine = {floor:g}",
                )
                self._refuse(stats.failures, server_round, c.node, err)
                continue
            out.append((c, delta))
        return out

    def _secure_mean(
        self, server_round: int, candidates: list[_Candidate], stats: RoundTraffic
    ) -> tuple[list[Message], int]:
        """Step 3 and the unmasked mean, as one reply of ``global + mean`` for the inner
        strategy (with the mean of the replies' metrics), and the clients it averages; no
        reply when the sum cannot be recovered (the round fails, global unchanged)."""
        assert self.secure is not None and self._global_flat is not None
        masked = {c.node: c.masked for c in candidates if c.masked is not None}
        try:
            mean, count, sent = self.secure.aggregate(
                server_round, masked, self._grid, stats.failures
            )
        except SecAggError as err:
            stats.secure_bytes.setdefault("unmask", 0)
            stats.round_failure = f"secure aggregation: {err}; global unchanged"
            log.warning("round %d: %s", server_round, stats.round_failure)
            return [], 0
        finally:
            self.secure.rounds.pop(server_round, None)
        stats.secure_bytes.update(sent)
        stats.secure_dropouts = self.secure.last_dropouts
        per_client = (
            sum(stats.bytes_up[c.node] for c in candidates) + sum(stats.secure_bytes.values())
        ) / max(len(candidates), 1)
        stats.secure_bits_per_weight = 8.0 * per_client / self.secure.size
        shared = self._shared_metrics(candidates)
        first = candidates[0]
        first.metrics = {k: float(np.mean([c.metrics[k] for c in candidates])) for k in shared}
        dense = self._global_flat + mean
        return [self._rebuilt(first, shared, self._flat_record(dense))], count

    def _rebuilt(self, c: _Candidate, shared: set[str], arrays: ArrayRecord | None) -> Message:
        metrics = {k: v for k, v in c.metrics.items() if k in shared}
        metrics[keys.NUM_EXAMPLES] = (
            1.0 if self.uniform and arrays is not None else float(c.examples)
        )
        content = RecordDict({keys.METRICS: MetricRecord(metrics)})
        if arrays is not None:
            content[self.inner_key] = arrays
        c.msg.content = content
        return c.msg

    def _inner_state(self) -> dict[str, Any] | None:
        """The inner strategy's state before it aggregates, to put back if the round fails.

        A failed round keeps the global; it must keep the optimizer too, or FedAvgM's momentum
        or FedAdam's moments would carry the failed round's (possibly non-finite) step into
        every later round. ``None`` for a strategy that declares no state (nothing to restore).
        """
        try:
            return strategy_state_dict(self.inner)
        except UndeclaredStateError:
            return None

    def _restore_inner(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            load_strategy_state_dict(self.inner, state)

    def _guarded(
        self, server_round: int, stats: RoundTraffic, phase: str, call: Callable[[], _T]
    ) -> _T | None:
        """Run the inner strategy's aggregation; an exception fails the round, not the server."""
        try:
            return call()
        except Exception as err:  # any bug or refusal inside the inner strategy
            inner = type(self.inner).__name__
            reason = f"{phase} aggregation in {inner} raised {type(err).__name__}: {err}"
            stats.aggregation_errors.append(reason)
            log.error("round %d: %s; global unchanged", server_round, reason)
            return None

    # -- the four wire hooks ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.train_overrides:  # a copy: Flower hands the evaluate step the same record
            config = ConfigRecord({**dict(config), **self.train_overrides})
            self._round(server_round).local_epochs = self.train_overrides.get(keys.LOCAL_EPOCHS)
        if self.privacy is not None:
            self.privacy.configure(config)
        flat = self._receive_global(arrays)
        messages = self.inner.configure_train(server_round, flat, config, grid)
        if self.privacy is not None:
            messages = self.privacy.select(list(messages))
        if self.secure is not None:  # steps 0 and 1; only nodes that completed both train
            self._grid = grid
            stats = self._round(server_round)
            messages, sent = self.secure.setup(server_round, list(messages), grid, stats.failures)
            stats.secure_bytes.update(sent)
        out = self._compress_messages(server_round, messages, self._round(server_round).bytes_down)
        self._requests["train", server_round] = out  # the Grid gives them ids when it sends them
        return out

    def _screen(self, step: str, server_round: int, replies: Iterable[Message]) -> list[_Candidate]:
        """The replies of one round's ``train`` or ``evaluate`` step that pass admission.

        Both steps name their failures alike, in the round's ``failures`` / ``eval_failures``: a
        client's error reply, a refused reply (the admission rule or the decoder's check), and
        a node that was sent a message but did not answer before the round's timeout.
        """
        stats = self._round(server_round)
        train = step == "train"
        failures = stats.failures if train else stats.eval_failures
        schema = keys.TRAIN_REPLY if train else keys.EVALUATE_REPLY
        # Request id -> node. Errors the SuperLink makes up (a node that stopped sending
        # heartbeats) come from the SuperLink's own node id: name the node asked instead.
        asked = {
            m.metadata.message_id: m.metadata.dst_node_id
            for m in self._requests.pop((step, server_round), [])
            if m.metadata.message_id  # empty if never sent through a Grid
        }
        candidates: list[_Candidate] = []
        for msg in replies:
            node = asked.pop(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error():
                reason = f"client error: {msg.error.reason}"
                self._answered(node, ok=False, reason=reason)
                failures.append((node, reason))
                log.warning("round %d: node %s failed to %s: %s", server_round, node, step, reason)
                continue
            (stats.bytes_up if train else stats.eval_bytes_up)[node] = message_bytes(msg)
            try:
                candidate = self._admit(server_round, node, msg, schema)
                if train and self.secure is not None:
                    candidate.masked = self.secure.masked_vector(
                        server_round, node, self._payload(msg)
                    )
                elif train:
                    candidate.delta = self.decode_delta(msg)
            except (AdmissionError, PayloadError, SecAggError) as err:
                self._refuse(failures, server_round, node, err)
                continue
            self._answered(node, ok=True)
            candidates.append(candidate)
        for node in asked.values():  # sent, but nothing came back before the round timed out
            reason = "no reply within server.round-timeout"
            failures.append((node, reason))
            log.warning("round %d: node %s failed to %s: %s", server_round, node, step, reason)
        return candidates

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self._round(server_round)
        candidates = self._screen("train", server_round, replies)
        stats.arrival_metrics = self._arrival(candidates)
        if self.secure is not None:
            valid, stats.replies = self._secure_mean(server_round, candidates, stats)
        else:
            valid = self._bounded_updates(server_round, candidates, stats)
            stats.replies = len(valid)
        if stats.replies < self.min_replies:
            # Too few clients answered (dropouts, timeouts, bad payloads): keep the global model
            # rather than let one or two clients move it.
            if not stats.round_failure:  # secure aggregation may have named the reason
                stats.round_failure = (
                    f"{stats.replies} valid replies < server.min-replies = {self.min_replies}; "
                    "global unchanged"
                )
                log.warning("round %d: %s", server_round, stats.round_failure)
            return None, None
        if self.privacy is not None:
            assert self._global_flat is not None
            valid = self.privacy.privatize(
                server_round, valid, {FLAT: self._global_flat}, [FLAT], self.inner_key
            )
        before = self._inner_state()
        result = self._guarded(
            server_round, stats, "train", lambda: self.inner.aggregate_train(server_round, valid)
        )
        if result is None:
            self._restore_inner(before)
            return None, None
        arrays, metrics = result
        named = None
        if arrays is not None:
            flat = arrays[FLAT].numpy() if list(arrays.keys()) == [FLAT] else None
            if flat is not None and self.step != 1.0:
                assert self._global_flat is not None
                flat = self._global_flat + np.float32(self.step) * (flat - self._global_flat)
            if flat is None or not all_finite({FLAT: flat}):
                inner = type(self.inner).__name__
                stepped = f" (after the server step x{self.step:g})" if self.step != 1.0 else ""
                reason = (
                    f"train aggregation in {inner} gave a non-finite model{stepped}"
                    if flat is not None
                    else f"train aggregation in {inner} returned arrays {list(arrays.keys())}, "
                    f"not the one {FLAT!r} it was given"
                )
                stats.aggregation_errors.append(reason)
                log.error("round %d: %s; global unchanged", server_round, reason)
                self._restore_inner(before)
                return None, None
            dense = self._unflatten(flat)
            named = ArrayRecord({n: Array(dense[n]) for n in self.names})
            self._returned = (named, dense)
        if metrics is not None:
            stats.train_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return named, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        flat = self._receive_global(arrays)
        messages = self.inner.configure_evaluate(server_round, flat, config, grid)
        out = self._compress_messages(
            server_round, messages, self._round(server_round).eval_bytes_down
        )
        self._requests["evaluate", server_round] = out
        return out

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        stats = self._round(server_round)
        # a node without validation data has nothing to weigh in
        candidates = [c for c in self._screen("evaluate", server_round, replies) if c.examples]
        if not candidates:
            return None
        self._cap_examples(server_round, candidates, stats.eval_capped_examples)
        shared = self._shared_metrics(candidates)
        valid = [self._rebuilt(c, shared, None) for c in candidates]
        metrics = self._guarded(
            server_round,
            stats,
            "evaluate",
            lambda: self.inner.aggregate_evaluate(server_round, valid),
        )
        if metrics is not None:
            stats.eval_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return metrics

    def summary(self) -> None:
        self.inner.summary()
        log.info("\t├── Uplink codec: %s", self.uplink.to_string())
        protocol = "chain" if self.chain is not None else "stateless"
        log.info("\t└── Downlink codec: %s (%s)", self.downlink.to_string(), protocol)
