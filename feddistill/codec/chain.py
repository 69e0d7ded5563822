"""The chained downlink: a global model sent as a chain of compressed deltas (pure functions).

Why a chain: a pruned downlink of ``global - initial`` cannot carry a model that has drifted
everywhere, and a pruned ``global_t - global_{t-1}`` loses what it drops. So the server keeps the
*broadcast model* ``B_v`` that every up-to-date node holds, and version ``v`` is the codec payload
of ``global - B_{v-1}`` (what earlier versions dropped is still in that difference: server-side
error feedback). ``B_v = B_{v-1} + decode(payload_v)``, computed the same way on every node, so all
nodes hold bit-identical models. A node that skipped rounds gets the versions it missed; one that
is too far behind (or lost its cache) gets the broadcast model itself, in float32.

Every message also names the model it must produce: an 8-byte digest of ``B_target``. A node
checks what it rebuilt against it (:func:`apply_chain`), so a node whose cached version is not
the one the server continues (a server that crashed after sending a version and, resumed, made
that version again differently) fails loudly with check ``chain-digest`` instead of training
from a model the server never sent; the server then sends it the whole model.

Container layout (little-endian)::

     0  4  magic b"FDCH"
     4  u8 CHAIN_FORMAT (2)
     5  8  chain id (a run's chain; a resumed run keeps it)
    13  u32 target version
    17  8  digest of the model at the target version (:func:`model_digest`)
    25  u8 has_base (0/1)
    26  u32 base version (0 without a base)
    30  u32 number of delta segments n
    34  u32 x (has_base + n) segment lengths, then the segments: the base payload (absolute
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
CHAIN_FORMAT = 2  # 2: the target model's digest (format 1 had none)
_HEADER = struct.Struct("<4sB8sI8sBII")
DIGEST_BYTES = 8  # a consistency check, not a signature: 2**-64 to miss a divergence
DIGEST_CHECK = "chain-digest"  # PayloadError.check of a rebuilt model that is not the server's


@dataclass(frozen=True)
class ChainMessage:
    """What one node needs to reach version ``target`` of chain ``chain``.

    ``base`` (absolute weights at ``base_version``) is present when the node cannot be assumed
    to hold any earlier version; ``deltas`` are ``(version, payload)`` for consecutive versions
    ending at ``target``; ``digest`` is :func:`model_digest` of the model at ``target``.
    """

    chain: bytes
    target: int
    deltas: tuple[tuple[int, np.ndarray], ...]
    base: np.ndarray | None = None
    base_version: int = 0
    digest: bytes = b""

    @property
    def first_needed(self) -> int:
        """The version a node must already hold to apply the deltas (ignored with a base)."""
        return self.base_version if self.base is not None else self.target - len(self.deltas)


def pack_chain(msg: ChainMessage) -> np.ndarray:
    if len(msg.chain) != 8:
        raise ValueError(f"chain id must be 8 bytes, got {len(msg.chain)}")
    if len(msg.digest) != DIGEST_BYTES:
        raise ValueError(f"model digest must be {DIGEST_BYTES} bytes, got {len(msg.digest)}")
    segments = ([msg.base] if msg.base is not None else []) + [p for _, p in msg.deltas]
    header = _HEADER.pack(
        CHAIN_MAGIC,
        CHAIN_FORMAT,
        msg.chain,
        msg.target,
        msg.digest,
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
    magic, fmt, chain, target, digest, has_base, base_version, n = _HEADER.unpack_from(
        buf[: _HEADER.size].tobytes()
    )
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
    return ChainMessage(chain, target, deltas, base, base_version, digest)


def model_digest(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> bytes:
    """:data:`DIGEST_BYTES` bytes of BLAKE2b over ``names`` and their float32 values, in order.

    Sender and nodes build ``B_v`` with the same float32 additions, so equal models have equal
    digests bit for bit; hashing a model costs about one pass over its weights.
    """
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name in names:
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return h.digest()


class ChainSender:
    """The server's side of the chain: the broadcast model, recent versions, node versions.

    Args:
        initial: the initial exchanged weights (version 0, which every node rebuilds itself).
        spec: the downlink codec spec for the deltas (without ``ef``: the chain's error feedback
            is its own, the server's residual of each version).
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
        self.digest = model_digest(self.broadcast, self.names)  # of B_version, sent each time
        self._packed: dict[int, np.ndarray] = {}  # by version held (-1: base), this version

    def advance(self, global_arrays: Mapping[str, np.ndarray]) -> int:
        """Make a new version from ``global_arrays`` unless the last one was made from it.

        Returns the new version's payload size in bytes (0 if no new version was made).
        """
        digest = model_digest(global_arrays, self.names).hex()
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
        self.digest = model_digest(self.broadcast, self.names)
        self._packed = {}
        return int(encoded.payload.size)

    def message_for(self, node: int) -> tuple[np.ndarray, int]:
        """The packed container that brings ``node`` to the current version, and that version."""
        held = self.node_version.get(node, 0)
        if held > self.version:
            held = 0
        if held < 0 or not self._catch_up_cheaper(held):
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
            return ChainMessage(self.chain, self.version, (), base, self.version, self.digest)
        deltas = tuple((v, self.payloads[v]) for v in range(held + 1, self.version + 1))
        return ChainMessage(self.chain, self.version, deltas, digest=self.digest)

    def acknowledge(self, node: int, version: int) -> None:
        """``node`` answered a message that brought it to ``version``."""
        self.node_version[node] = max(version, self.node_version.get(node, 0))

    def forget(self, node: int) -> None:
        """``node`` failed: do not assume it holds anything (it can always rebuild version 0)."""
        self.node_version.pop(node, None)

    def rebuild(self, node: int) -> None:
        """``node`` rebuilt a model that is not ours (check ``chain-digest``): whatever it holds
        is suspect, so its next message carries the broadcast model itself."""
        self.node_version[node] = -1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (copies): id, version, node versions, broadcast, payloads."""
        return {
            "chain": self.chain.hex(),
            "version": self.version,
            "source_digest": self.source_digest,
            "node_version": {str(k): v for k, v in self.node_version.items()},
            "broadcast": {n: a.copy() for n, a in self.broadcast.items()},
            "payloads": {str(v): p.copy() for v, p in self.payloads.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the chain saved by :meth:`state_dict` (a resumed run)."""
        broadcast = {n: np.asarray(state["broadcast"][n], dtype=np.float32) for n in self.names}
        self.chain = bytes.fromhex(state["chain"])
        self.version = int(state["version"])
        self.source_digest = str(state["source_digest"])
        self.node_version = {int(k): int(v) for k, v in state["node_version"].items()}
        self.broadcast = broadcast
        self.payloads = {int(v): np.asarray(p) for v, p in state["payloads"].items()}
        self.digest = model_digest(self.broadcast, self.names)
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
    ``msg.target``, adding the decoded deltas in order exactly as the sender did.

    Raises:
        PayloadError: check ``chain-digest`` when the result is not the model the sender holds
            at ``msg.target`` (``start`` is not the sender's version ``start_version``), or a
            check of :func:`unpack_chain` / the codec for a malformed message.
    """
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
    got = model_digest(arrays, [n for n, _ in schema])
    if got != msg.digest:
        raise PayloadError(
            DIGEST_CHECK,
            f"version {msg.target} of model chain {msg.chain.hex()} rebuilt here from version "
            f"{start_version} has digest {got.hex()}, the server's has {msg.digest.hex()}: "
            "the version this node holds is not the one the server sent",
        )
    return arrays


def initial_downlink(
    initial: Mapping[str, np.ndarray], spec: CompressionSpec, *, chained: bool
) -> np.ndarray:
    """A downlink payload that gives any node the initial model, under either protocol
    (``chained``: ``compression.downlink-protocol = "chain"``).

    Benchmarks and tests that drive clients without a server start from it.
    """
    if chained:
        names = list(initial)
        return pack_chain(ChainMessage(bytes(8), 0, (), digest=model_digest(initial, names)))
    return encode({n: np.zeros_like(a, dtype=np.float32) for n, a in initial.items()}, spec).payload
