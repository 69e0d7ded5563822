"""The chained downlink: a global model sent as a chain of compressed deltas (pure functions).

Why a chain: a pruned downlink of ``global - initial`` cannot carry a model that has drifted
everywhere, and a pruned ``global_t - global_{t-1}`` loses what it drops. So the server keeps the
*broadcast model* ``B_v`` that every up-to-date node holds, and version ``v`` is the codec payload
of ``global - B_{v-1}`` (what earlier versions dropped is still in that difference: server-side
error feedback). ``B_v = B_{v-1} + decode(payload_v)``, computed the same way on every node, so all
nodes hold bit-identical models. A node that skipped rounds gets the versions it missed; one that
is too far behind (or lost its cache) gets the broadcast model itself, in float32.

Container layout (little-endian)::

     0  4  magic b"FDCH"
     4  u8 CHAIN_FORMAT (1)
     5  8  chain id (a run's chain; a resumed run keeps it)
    13  u32 target version
    17  u8 has_base (0/1)
    18  u32 base version (0 without a base)
    22  u32 number of delta segments n
    26  u32 x (has_base + n) segment lengths, then the segments: the base payload (absolute
        float32 weights, codec spec "none"), then the deltas for versions target-n+1 .. target
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PayloadError
from .spec import CompressionSpec
from .wire import decode, encode, schema_of

CHAIN_MAGIC = b"FDCH"
CHAIN_FORMAT = 1
_HEADER = struct.Struct("<4sB8sIBII")


@dataclass(frozen=True)
class ChainMessage:
    """What one node needs to reach version ``target`` of chain ``chain``.

    ``base`` (absolute weights at ``base_version``) is present when the node cannot be assumed
    to hold any earlier version; ``deltas`` are ``(version, payload)`` for consecutive versions
    ending at ``target``.
    """

    chain: bytes
    target: int
    deltas: tuple[tuple[int, np.ndarray], ...]
    base: np.ndarray | None = None
    base_version: int = 0

    @property
    def first_needed(self) -> int:
        """The version a node must already hold to apply the deltas (ignored with a base)."""
        return self.base_version if self.base is not None else self.target - len(self.deltas)


def pack_chain(msg: ChainMessage) -> np.ndarray:
    if len(msg.chain) != 8:
        raise ValueError(f"chain id must be 8 bytes, got {len(msg.chain)}")
    segments = ([msg.base] if msg.base is not None else []) + [p for _, p in msg.deltas]
    header = _HEADER.pack(
        CHAIN_MAGIC,
        CHAIN_FORMAT,
        msg.chain,
        msg.target,
        int(msg.base is not None),
        msg.base_version,
        len(msg.deltas),
    )
    lengths = np.array([s.size for s in segments], dtype="<u4").tobytes()
    parts = [np.frombuffer(header + lengths, dtype=np.uint8)]
    parts += [np.ascontiguousarray(s, dtype=np.uint8).reshape(-1) for s in segments]
    return np.concatenate(parts)


def unpack_chain(blob: np.ndarray, *, max_payload_bytes: int) -> ChainMessage:
    """Parse and check the container; the segments themselves are checked by ``decode``.

    Raises:
        PayloadError: with check "chain-header", "chain-version", "chain-segments" or
            "size-limit" naming what is wrong.
    """
    buf = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1)
    if buf.size > max_payload_bytes:
        raise PayloadError("size-limit", f"downlink of {buf.size} bytes over the limit")
    if buf.size < _HEADER.size:
        raise PayloadError("chain-header", f"{buf.size} bytes is shorter than the header")
    magic, fmt, chain, target, has_base, base_version, n = _HEADER.unpack_from(buf.tobytes())
    if magic != CHAIN_MAGIC:
        raise PayloadError("chain-header", f"magic {magic!r} is not {CHAIN_MAGIC!r}")
    if fmt != CHAIN_FORMAT:
        raise PayloadError("chain-version", f"chain format {fmt}, this node reads {CHAIN_FORMAT}")
    if has_base not in (0, 1):
        raise PayloadError("chain-header", f"has_base must be 0 or 1, got {has_base}")
    if has_base and base_version + n != target:
        raise PayloadError(
            "chain-segments", f"base {base_version} + {n} deltas does not reach {target}"
        )
    if not has_base and (n > target or base_version != 0):
        raise PayloadError("chain-segments", f"{n} deltas cannot end at version {target}")
    count = has_base + n
    table_end = _HEADER.size + 4 * count
    if buf.size < table_end:
        raise PayloadError("chain-header", f"{count} segment lengths do not fit {buf.size} bytes")
    lengths = np.frombuffer(buf[_HEADER.size : table_end].tobytes(), dtype="<u4").astype(np.int64)
    if int(lengths.sum()) != buf.size - table_end:
        raise PayloadError(
            "chain-segments",
            f"segment lengths sum to {int(lengths.sum())}, {buf.size - table_end} bytes follow",
        )
    offsets = table_end + np.concatenate([[0], np.cumsum(lengths)])
    segments = [buf[offsets[i] : offsets[i + 1]] for i in range(count)]
    base = segments[0] if has_base else None
    first = target - n + 1
    deltas = tuple((first + i, seg) for i, seg in enumerate(segments[has_base:]))
    return ChainMessage(chain, target, deltas, base, base_version)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, a in arrays.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


class ChainSender:
    """The server's side of the chain: the broadcast model, recent versions, node versions.

    Args:
        initial: the initial exchanged weights (version 0, which every node rebuilds itself).
        spec: the downlink codec spec for the deltas (its ``ef`` token is what selects a chain).
        chain: 8-byte id; a fresh run draws one, a resumed run restores it.
        seed: base seed of stochastic rounding (version ``v`` uses ``seed * 7919 + v``).
        history: versions kept for catching up; a node further behind gets the base model.
    """

    def __init__(
        self,
        initial: Mapping[str, np.ndarray],
        spec: CompressionSpec,
        *,
        chain: bytes,
        seed: int = 0,
        history: int = 64,
    ) -> None:
        self.schema = schema_of(initial)
        self.names = [n for n, _ in self.schema]
        self.broadcast = {n: np.array(initial[n], dtype=np.float32) for n in self.names}
        self.spec = spec
        self.chain = chain
        self.seed = seed
        self.history = history
        self.version = 0
        self.payloads: dict[int, np.ndarray] = {}
        self.node_version: dict[int, int] = {}
        self.source_digest = ""  # the global the latest version was encoded from
        self._packed: dict[int, np.ndarray] = {}  # by version held (-1: base), this version

    def advance(self, global_arrays: Mapping[str, np.ndarray]) -> int:
        """Make a new version from ``global_arrays`` unless the last one was made from it.

        Returns the new version's payload size in bytes (0 if no new version was made).
        """
        digest = arrays_digest({n: global_arrays[n] for n in self.names})
        if self.version and digest == self.source_digest:
            return 0
        residual = {
            n: np.asarray(global_arrays[n], dtype=np.float32) - self.broadcast[n]
            for n in self.names
        }
        if not any(np.any(r) for r in residual.values()):
            return 0  # every node already holds this model (round 1: the initial one)
        self.version += 1
        encoded = encode(residual, self.spec, seed=self.seed * 7919 + self.version)
        for n in self.names:
            self.broadcast[n] = self.broadcast[n] + encoded.decoded[n]
        self.payloads[self.version] = encoded.payload
        self.payloads.pop(self.version - self.history, None)
        self.source_digest = digest
        self._packed = {}
        return int(encoded.payload.size)

    def message_for(self, node: int) -> tuple[np.ndarray, int]:
        """The packed container that brings ``node`` to the current version, and that version."""
        held = self.node_version.get(node, 0)
        if not 0 <= held <= self.version:
            held = 0
        if not self._catch_up_cheaper(held):
            held = -1  # send the broadcast model itself
        if held not in self._packed:
            self._packed[held] = pack_chain(self._message_from(held))
        return self._packed[held], self.version

    def _catch_up_cheaper(self, held: int) -> bool:
        """Versions held+1.. are all kept and cost less than a float32 base (~4 bytes/weight)."""
        wanted = range(held + 1, self.version + 1)
        if not all(v in self.payloads for v in wanted):
            return False
        size = sum(self.payloads[v].size for v in wanted)
        return size <= 4 * sum(a.size for a in self.broadcast.values())

    def _message_from(self, held: int) -> ChainMessage:
        if held < 0:
            base = encode(self.broadcast, CompressionSpec()).payload  # float32, exact
            return ChainMessage(self.chain, self.version, (), base, self.version)
        deltas = tuple((v, self.payloads[v]) for v in range(held + 1, self.version + 1))
        return ChainMessage(self.chain, self.version, deltas)

    def acknowledge(self, node: int, version: int) -> None:
        """``node`` answered a message that brought it to ``version``."""
        self.node_version[node] = max(version, self.node_version.get(node, 0))

    def forget(self, node: int) -> None:
        """``node`` failed: do not assume it holds anything (it can always rebuild version 0)."""
        self.node_version.pop(node, None)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(JSON-able metadata, broadcast arrays, payloads by version): what a checkpoint keeps."""
        meta = {
            "chain": self.chain.hex(),
            "version": self.version,
            "source_digest": self.source_digest,
            "node_version": {str(k): v for k, v in self.node_version.items()},
        }
        broadcast = {n: a.copy() for n, a in self.broadcast.items()}
        payloads = {str(v): p.copy() for v, p in self.payloads.items()}
        return meta, broadcast, payloads

    def load_state(
        self,
        meta: Mapping[str, Any],
        broadcast: Mapping[str, np.ndarray],
        payloads: Mapping[str, np.ndarray],
    ) -> None:
        """Continue the chain saved by :meth:`state` (a resumed run)."""
        self.chain = bytes.fromhex(meta["chain"])
        self.version = int(meta["version"])
        self.source_digest = str(meta["source_digest"])
        self.node_version = {int(k): int(v) for k, v in meta["node_version"].items()}
        self.broadcast = dict(broadcast)
        self.payloads = {int(v): p for v, p in payloads.items()}
        self._packed = {}


def apply_chain(
    msg: ChainMessage,
    start: Mapping[str, np.ndarray],
    start_version: int,
    schema: Sequence[tuple[str, tuple[int, ...]]],
    *,
    max_payload_bytes: int,
) -> dict[str, np.ndarray]:
    """``start`` (version ``start_version``, or ignored when ``msg`` has a base) brought to
    ``msg.target``, adding the decoded deltas in order exactly as the sender did."""
    if msg.base is not None:
        arrays = decode(msg.base, schema, max_payload_bytes=max_payload_bytes)
        start_version = msg.base_version
    else:
        if not msg.first_needed <= start_version <= msg.target:
            raise PayloadError(
                "chain-segments",
                f"deltas need version {msg.first_needed}..{msg.target}, have {start_version}",
            )
        arrays = {n: np.array(start[n], dtype=np.float32) for n, _ in schema}
    for version, payload in msg.deltas:
        if version <= start_version:
            continue
        delta = decode(payload, schema, max_payload_bytes=max_payload_bytes)
        for n, _ in schema:
            arrays[n] = arrays[n] + delta[n]
    return arrays


def initial_downlink(initial: Mapping[str, np.ndarray], spec: CompressionSpec) -> np.ndarray:
    """A downlink payload that gives any node the initial model, under either protocol.

    Benchmarks and tests that drive clients without a server start from it.
    """
    if spec.error_feedback:
        return pack_chain(ChainMessage(bytes(8), 0, ()))
    return encode({n: np.zeros_like(a, dtype=np.float32) for n, a in initial.items()}, spec).payload
