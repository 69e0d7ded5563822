"""The server's side of secure aggregation: SecAgg+ steps over the Grid, around a round's
training messages (the protocol itself: :mod:`feddistill.secagg`).

``CompressedStrategy.configure_train`` hands the nodes its inner strategy sampled to
:meth:`SecureAggregation.setup`, which runs steps 0 (keys) and 1 (encrypted shares) through the
public ``Grid.send_and_receive`` and returns the training messages of the nodes that completed
both, each carrying the shares addressed to it and the round's pattern seed. Their training
replies are step 2 (masked vectors); :meth:`SecureAggregation.aggregate` runs step 3 (unmasking
shares) and returns the mean update, or fails the round with a reason. Every message of every
step is counted, by step, in the round's traffic.

Every reply is untrusted: wrong types, lengths or ids make that node a dropout of the step,
named in the round's failures; too many dropouts fail the round, never the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from feddistill import keys
from feddistill.config import SecureConfig
from feddistill.records import message_bytes
from feddistill.secagg.distributed import NoisyField, decode_sum, rotation_signs
from feddistill.secagg.protocol import (
    MASK_KEY,
    SELF_MASK,
    Advertised,
    Share,
    unmask_sum,
    unpack,
)
from feddistill.secagg.quantize import FieldSpec, SecAggError, mean_update, shared_pattern
from feddistill.strategies.private import DistributedPrivacy

log = logging.getLogger("feddistill")

PUBLIC_KEY_BYTES = 49  # a compressed P-384 point
COMMITMENT_BYTES = 32
MAX_CIPHERTEXT_BYTES = 4096  # two Shamir shares, Fernet-wrapped: ~400 bytes
MAX_SHARE_BYTES = 1024


@dataclass
class SecureRound:
    """What the server keeps between a round's steps."""

    spec: FieldSpec | NoisyField
    threshold: int
    pattern: np.ndarray
    roster: dict[int, Advertised]  # by protocol index (1..n, node ids in sorted order)
    u1: list[int]  # indices
    index: dict[int, int] = field(default_factory=dict)  # node id -> index
    signs: np.ndarray | None = None  # distributed DP: the round's public rotation

    @property
    def length(self) -> int:
        """Values in a masked vector: the pattern's, padded to the rotation's size with DP."""
        return self.spec.padded if isinstance(self.spec, NoisyField) else len(self.pattern)


class SecureAggregation:
    def __init__(
        self,
        settings: SecureConfig,
        size: int,
        timeout: float,
        seed: int = 0,
        privacy: DistributedPrivacy | None = None,
    ) -> None:
        self.settings = settings
        self.privacy = privacy  # distributed DP: the clients add noise; sigma and epsilon here
        self.size = size  # exchanged weights
        self.timeout = timeout
        # The patterns are public (they depend on no update), so they follow the run's seed
        # like everything else that makes a run repeatable; kept in the state for resume.
        self.pattern_seed = (seed * 1_000_003 + 0x5EC) % (1 << 62)
        self.rounds: dict[int, SecureRound] = {}
        self.last_dropouts = 0  # of the last aggregated round: in U1, no masked vector

    @property
    def max_values(self) -> int:
        """The most coordinates a round's pattern holds."""
        return max(1, min(self.size, round(self.settings.keep * self.size)))

    @property
    def max_length(self) -> int:
        """The most values a masked vector holds (with DP, padded to a power of two)."""
        n = self.max_values
        return 1 << max(0, (n - 1).bit_length()) if self.privacy is not None else n

    def field(self, clients: int, threshold: int, values: int) -> FieldSpec | NoisyField:
        """The round's group: plain quantization, or the integer encoding with DP noise."""
        if self.privacy is None:
            return FieldSpec(self.settings.bits, self.settings.clip, clients)
        return NoisyField(
            self.settings.bits,
            self.privacy.settings.clip,
            values,
            clients,
            threshold,
            self.privacy.noise_multiplier,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"pattern_seed": self.pattern_seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pattern_seed = int(state["pattern_seed"])

    # -- steps 0 and 1 ------------------------------------------------------------------------
    def setup(
        self,
        server_round: int,
        messages: list[Message],
        grid: Grid,
        failures: list[tuple[int, str]],
    ) -> tuple[list[Message], dict[str, int]]:
        """Keys and shares for the sampled nodes; their training messages, and the bytes of
        each step. Fewer nodes than the threshold after either step: no training messages."""
        by_node = {m.metadata.dst_node_id: m for m in messages}
        nodes = sorted(by_node)
        sent: dict[str, int] = {}
        if len(nodes) < 3:
            failures.extend((n, "secure aggregation needs 3 clients in a round") for n in nodes)
            return [], sent
        threshold = self.settings.threshold(len(nodes))

        replies = self._exchange(server_round, "secagg_setup", {n: {} for n in nodes}, grid, sent)
        roster: dict[int, Advertised] = {}
        for node, record in replies.items():
            try:
                roster[node] = Advertised(
                    _bytes(record, "encryption-key", PUBLIC_KEY_BYTES),
                    _bytes(record, "mask-key", PUBLIC_KEY_BYTES),
                    _bytes(record, "commitment", COMMITMENT_BYTES),
                )
            except SecAggError as err:
                failures.append((node, f"secure setup: {err}"))
        self._missing("secagg_setup", nodes, replies, failures)
        if len(roster) < max(threshold, 3):  # with two, each learns the other's update
            return [], sent

        # Clients are named by their index in the roster (1..n), never by node id: node ids
        # are 64-bit and a ConfigRecord integer is signed.
        nodes_in = sorted(roster)
        index = {node: i + 1 for i, node in enumerate(nodes_in)}
        by_index = {index[n]: roster[n] for n in nodes_in}
        listing: dict[str, Any] = {
            "encryption-keys": [roster[n].encryption_key for n in nodes_in],
            "mask-keys": [roster[n].mask_key for n in nodes_in],
            "commitments": [roster[n].self_mask_commitment for n in nodes_in],
            "threshold": threshold,
        }
        replies = self._exchange(
            server_round,
            "secagg_share",
            {n: {**listing, "you": index[n]} for n in nodes_in},
            grid,
            sent,
        )
        outbox: dict[int, dict[int, bytes]] = {}  # sender index -> receiver index -> ciphertext
        everyone = set(by_index)
        for node, record in replies.items():
            me = index[node]
            try:
                to = _ints(record, "to")
                cts = _bytes_list(record, "ciphertexts", MAX_CIPHERTEXT_BYTES)
                if sorted(to) != sorted(everyone - {me}) or len(cts) != len(to):
                    raise SecAggError("shares not addressed to exactly every other client")
                outbox[me] = dict(zip(to, cts, strict=True))
            except SecAggError as err:
                failures.append((node, f"secure share: {err}"))
        self._missing("secagg_share", nodes_in, replies, failures)
        u1 = sorted(outbox)
        if len(u1) < max(threshold, 3):
            return [], sent
        log.info(
            "round %d: secure aggregation: %d clients hold each other's shares (threshold %d)",
            server_round,
            len(u1),
            threshold,
        )

        pattern = shared_pattern(self.pattern_seed, server_round, self.size, self.settings.keep)
        try:
            spec = self.field(len(u1), threshold, len(pattern))
        except SecAggError as err:
            failures.extend((n, f"secure setup: {err}") for n in nodes_in)
            return [], sent
        signs = (
            rotation_signs(self.pattern_seed, server_round, spec.padded)
            if isinstance(spec, NoisyField)
            else None
        )
        self.rounds[server_round] = SecureRound(
            spec, threshold, pattern, by_index, u1, index, signs
        )
        noise = {} if self.privacy is None else {
            "noise-multiplier": self.privacy.noise_multiplier, "threshold": threshold
        }  # fmt: skip
        out = []
        for node in nodes_in:
            me = index[node]
            if me not in outbox:
                continue
            msg = by_node[node]
            peers = [j for j in u1 if j != me]
            msg.content = RecordDict(dict(msg.content.items()))
            msg.content[keys.SECAGG] = ConfigRecord(
                {
                    "you": me,
                    "from": peers,
                    "ciphertexts": [outbox[j][me] for j in peers],
                    "pattern-seed": self.pattern_seed,
                    "clients": len(u1),
                    **noise,
                }
            )
            out.append(msg)
        return out, sent

    # -- steps 2 (the training replies) and 3 -------------------------------------------------
    def masked_vector(self, server_round: int, node: int, payload: np.ndarray) -> np.ndarray:
        """One training reply's masked vector, checked against the round's settings."""
        state = self.rounds.get(server_round)
        if state is None or state.index.get(node) not in state.u1:
            raise SecAggError(f"node {node} did not take part in round {server_round}'s setup")
        return unpack(payload.tobytes(), state.length, state.spec)

    def aggregate(
        self,
        server_round: int,
        masked_by_node: Mapping[int, np.ndarray],
        grid: Grid,
        failures: list[tuple[int, str]],
    ) -> tuple[np.ndarray, int, dict[str, int]]:
        """The mean update of the survivors (flat, dense), their count and step 3's bytes;
        SecAggError when the sum cannot be recovered."""
        state = self.rounds.pop(server_round, None)
        if state is None:
            raise SecAggError(
                "the setup left fewer clients than the threshold (or than 3): nothing to unmask"
            )
        sent: dict[str, int] = {}
        masked = {state.index[n]: v for n, v in masked_by_node.items()}
        self.last_dropouts = len(state.u1) - len(masked)
        if len(masked) < state.threshold:
            raise SecAggError(f"{len(masked)} masked vectors; the threshold is {state.threshold}")
        request = {"survivors": sorted(masked)}
        replies = self._exchange(
            server_round, "secagg_unmask", {n: request for n in masked_by_node}, grid, sent
        )
        node_of = {i: n for n, i in state.index.items()}
        responses: dict[int, dict[int, Share]] = {}
        for node, record in replies.items():
            try:
                owners = _ints(record, "owners")
                kinds = record.get("kinds")
                shares = _bytes_list(record, "shares", MAX_SHARE_BYTES)
                if not isinstance(kinds, list) or not len(owners) == len(kinds) == len(shares):
                    raise SecAggError("owners, kinds and shares of different lengths")
                if not set(owners) <= set(state.u1) or any(
                    k not in (SELF_MASK, MASK_KEY) for k in kinds
                ):
                    raise SecAggError("shares of unknown clients or of unknown kind")
                responses[state.index[node]] = {
                    o: Share(str(k), s) for o, k, s in zip(owners, kinds, shares, strict=True)
                }
            except SecAggError as err:
                failures.append((node, f"secure unmask: {err}"))
        self._missing("secagg_unmask", masked_by_node, replies, failures)
        result = unmask_sum(state.roster, state.u1, masked, responses, state.spec, state.threshold)
        for owner, liars in result.liars.items():
            for liar in liars:
                reason = f"secure unmask: a wrong share of node {node_of[owner]}'s secret"
                failures.append((node_of[liar], reason))
        count = len(result.survivors)
        if isinstance(state.spec, NoisyField):
            assert state.signs is not None and self.privacy is not None
            mean = np.zeros(self.size, dtype=np.float32)
            mean[state.pattern] = decode_sum(result.total, state.spec, state.signs) / count
            noise = state.spec.step * np.sqrt(state.spec.client_variance * count) / count
            self.privacy.record(server_round, float(noise))
        else:
            mean = mean_update(result.total, state.pattern, self.size, state.spec, count)
        return mean, count, sent

    # -- messages -----------------------------------------------------------------------------
    def _exchange(
        self,
        server_round: int,
        action: str,
        contents: Mapping[int, Mapping[str, Any]],
        grid: Grid,
        sent: dict[str, int],
    ) -> dict[int, ConfigRecord]:
        """Send one step's messages, wait for the replies; each node's reply record, by node
        (error replies, wrong record types and unknown senders are left out)."""
        messages = []
        for node, values in contents.items():
            content = RecordDict(
                {
                    keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: server_round}),
                    keys.SECAGG: ConfigRecord(dict(values)),
                }
            )
            messages.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=f"train.{action}",
                    group_id=str(server_round),
                )
            )
        step = action.removeprefix("secagg_")
        sent[step] = sent.get(step, 0) + sum(message_bytes(m) for m in messages)
        asked = {m.metadata.dst_node_id for m in messages}
        out: dict[int, ConfigRecord] = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in asked or reply.has_error():
                continue
            sent[step] += message_bytes(reply)
            record = reply.content.config_records.get(keys.SECAGG)
            if record is not None:
                out[node] = record
        return out

    @staticmethod
    def _missing(
        action: str,
        asked: Iterable[int],
        replies: Mapping[int, Any],
        failures: list[tuple[int, str]],
    ) -> None:
        for node in asked:
            if node not in replies:
                failures.append((node, f"no usable reply to {action}"))


def _bytes(record: ConfigRecord, key: str, size: int) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise SecAggError(f"{key!r} must be {size} bytes")
    return value


def _ints(record: ConfigRecord, key: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise SecAggError(f"{key!r} must be a list of integers")
    return list(value)


def _bytes_list(record: ConfigRecord, key: str, limit: int) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, bytes) and len(v) <= limit for v in value
    ):
        raise SecAggError(f"{key!r} must be a list of byte strings of at most {limit} bytes")
    return list(value)
