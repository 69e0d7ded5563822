"""`encode` / `decode`: a whole model update as one 1-D uint8 array, and its strict reader.

One blob per message because every array in a Flower message costs ~128 bytes of framing.
The receiver supplies the schema (names and shapes, from its own copy of the model), so the
payload carries no names; a hash of the schema in the header makes a payload for another
model fail loudly instead of decoding into the wrong tensors.

The tensors travel as two sections, not one record per tensor: a model has dozens of small
tensors (biases, norms) and a 24-byte record each cost more than the values themselves on a
small model at 1% density (format 1 spent 1 KB of records on a 41-tensor, 109k-parameter
student). The schema tells the decoder where each tensor starts, so positions are coded once
over the concatenation of the pruned tensors, and quantization scales run across tensor ends.

Wire layout (all integers little-endian)::

    header, 32 bytes
      0  4s   magic b"FDCQ"
      4  u8   FORMAT_VERSION (2)
      5  u8   flags, 0 (reserved)
      6  u16  block B >= 1: elements per position unit of the sparse section
      8  8s   schema hash: blake2b-64 of (name, shape) pairs in order (`schema_hash`)
     16  u32  number of tensors (must equal len(schema))
     20  u32  dense_below D: tensors with fewer elements form the dense section
     24  u64  total payload length in bytes (header included)
    dense section: the tensors with numel < D, in schema order, concatenated
      record (below), position code ALL, a float value code; then their values
    sparse section: every other tensor, in schema order, concatenated
      record; position section over its *units*; value section of the kept elements
    record, 24 bytes
      0  u8   value code: 0 float32, 1 float16, 2 int8, 3 int4, 4 ternary, 5 sign (quant.py)
      1  u8   position code: 0 ALL, 1 EMPTY, 2 BITMAP, 3 RICE (positions.py)
      2  u8   Rice parameter k (0 unless RICE)
      3  u8   reserved, 0
      4  u64  kept count c in units (<= the section's units from the schema)
     12  u32  chunk: values per scale for codes 2..5, 0 for float codes
     16  u64  position section length in bytes
    value section: float32 (4v bytes) | float16 (2v bytes) |
                   float32 scales (4·ceil(v/chunk) bytes) then packed codes (ceil(v·bits/8)),
                   v = number of kept elements

A unit is a run of B consecutive elements of one tensor: tensor t of n_t elements has
ceil(n_t / B) units (the last one shorter when B does not divide n_t), and the sparse section's
units are those of its tensors in order. With B = 1 a unit is an element.

There is no checksum: gRPC over TCP/TLS already protects integrity, and against a buggy or
hostile sender a checksum proves nothing. Instead every field is validated against the schema
and the bytes actually present before it is used, and nothing is allocated from a size the
payload merely claims (`decode` docstring).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import PayloadError
from .positions import POS_ALL, POS_RICE, POSITION_CODES, decode_positions, encode_positions
from .quant import (
    CODE_BITS,
    FLOAT16_MAX,
    VALUE_CODES,
    dequantize,
    pack_codes,
    packed_code_bytes,
    quantize,
    unpack_codes,
)
from .selection import (
    global_topk_indices,
    kept_count,
    split_indices,
    threshold_indices,
    topk_indices,
)
from .spec import CompressionSpec

FORMAT_VERSION = 2
MAGIC = b"FDCQ"
_HEADER = struct.Struct("<4sBBH8sIIQ")
_RECORD = struct.Struct("<BBBBQIQ")
HEADER_BYTES = _HEADER.size  # 32
RECORD_BYTES = _RECORD.size  # 24

Schema = Sequence[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class EncodeStats:
    """Sizes of one encoded update, for logging and the bytes-vs-accuracy plots.

    Attributes:
        kept: kept element count per tensor name.
        kept_total: sum of `kept`.
        numel_total: elements in the update.
        payload_bytes: length of the payload, header and records included.
        dense_bytes: what the update costs as dense float32 (numel_total · 4).
        position_bytes: bytes of all position sections.
        value_bytes: bytes of all value sections (scales included).
    """

    kept: dict[str, int]
    kept_total: int
    numel_total: int
    payload_bytes: int
    dense_bytes: int
    position_bytes: int
    value_bytes: int

    @property
    def ratio(self) -> float:
        """Dense float32 bytes per payload byte (the compression ratio)."""
        return self.dense_bytes / self.payload_bytes


@dataclass(frozen=True)
class Encoded:
    """Result of `encode`.

    Attributes:
        payload: 1-D uint8, the only thing that goes on the wire.
        decoded: float32 arrays, bit-identical to what `decode(payload, ...)` returns, so the
            sender computes its error-feedback residual without decoding again.
        stats: sizes and kept counts.
        positions: sorted int64 indices (into the flattened tensor) that were kept, per tensor;
            None where every element was kept.
    """

    payload: np.ndarray
    decoded: dict[str, np.ndarray]
    stats: EncodeStats
    positions: dict[str, np.ndarray | None]


def schema_of(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) pairs in iteration order: what a receiver passes to `decode`."""
    return [(name, tuple(int(d) for d in np.shape(a))) for name, a in arrays.items()]


def schema_hash(schema: Schema) -> bytes:
    """8-byte blake2b of the names and shapes, in order (length-prefixed, so unambiguous)."""
    h = hashlib.blake2b(digest_size=8)
    for name, shape in schema:
        raw = name.encode("utf-8")
        h.update(struct.pack("<I", len(raw)) + raw + struct.pack("<I", len(shape)))
        h.update(struct.pack(f"<{len(shape)}Q", *shape))
    return h.digest()


def dense_float32_bytes(update: Mapping[str, np.ndarray]) -> int:
    """Bytes of the update sent as dense float32 (sum of numel · 4), the baseline of ratios."""
    return sum(int(np.size(a)) * 4 for a in update.values())


def _checked_schema(schema: Schema) -> list[tuple[str, tuple[int, ...], int]]:
    """Validate the receiver's own schema (a caller bug is a ValueError, not a PayloadError)."""
    out = []
    seen: set[str] = set()
    for entry in schema:
        name, shape = entry
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"schema name {name!r} is not a new string; names must be unique")
        dims = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
            raise ValueError(f"schema shape {shape!r} of {name!r} must be non-negative integers")
        seen.add(name)
        dims = tuple(int(d) for d in dims)
        out.append((name, dims, int(np.prod(dims, dtype=np.int64))))
    return out


def _flat_float32(name: str, array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    # Integer buffers (e.g. BatchNorm's num_batches_tracked) are sent as float32 like the rest.
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"update[{name!r}] has dtype {arr.dtype}; use a float or integer array")
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    # The sum is finite iff every element is, unless finite values overflow it; only then pay
    # for the element-wise test.
    if not np.isfinite(np.sum(flat)) and not np.isfinite(flat).all():
        raise ValueError(f"update[{name!r}] has NaN or Inf values; refusing to encode them")
    return flat


def encode(
    update: Mapping[str, np.ndarray],
    spec: CompressionSpec,
    *,
    seed: int = 0,
    pattern_seed: int | None = None,
) -> Encoded:
    """Prune and quantize `update` per `spec` into one uint8 payload (layout in module doc).

    Args:
        update: name -> float array (cast to float32); tensor order is iteration order.
        spec: what to keep and how to code it. `spec.error_feedback` is not applied here: call
            `with_residual` before and `residual_after` after.
        seed: seeds `np.random.default_rng` for stochastic rounding and threshold sampling;
            the same inputs and seed give the same payload.
        pattern_seed: for select "pattern" (required there, refused elsewhere): the public
            seed of the round's coordinates (`round_pattern_seed`), the same on every client.
            The positions still travel in the payload, so the decoder needs no seed.

    Raises:
        ValueError: for a non-float or non-finite tensor, a spec that is not a
            `CompressionSpec`, or a `pattern_seed` missing for (or given to) another selection.
    """
    if not isinstance(spec, CompressionSpec):
        raise ValueError(f"spec must be a CompressionSpec, got {type(spec).__name__}")
    if (spec.select == "pattern") != (pattern_seed is not None):
        raise ValueError(
            f"encode: select {spec.select!r} with pattern_seed={pattern_seed!r}; a pattern_seed "
            "is needed by select 'pattern' and only by it"
        )
    rng = np.random.default_rng(seed)
    names = list(update)
    shapes = {name: tuple(int(d) for d in np.shape(update[name])) for name in names}
    flats = {name: _flat_float32(name, update[name]) for name in names}
    dense = [name for name in names if flats[name].shape[0] < spec.dense_below]
    sparse = [name for name in names if flats[name].shape[0] >= spec.dense_below]
    # The concatenations are copies, so nothing below aliases the caller's arrays.
    dense_part = _encode_dense(_concat([flats[name] for name in dense]), spec, rng)
    sparse_part = _encode_sparse([flats[name] for name in sparse], spec, rng, pattern_seed)

    body = [*dense_part.pieces, *sparse_part.pieces]
    total = HEADER_BYTES + sum(p.shape[0] for p in body)
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        spec.block,
        schema_hash(list(shapes.items())),
        len(names),
        spec.dense_below,
        total,
    )
    payload = np.concatenate([np.frombuffer(header, dtype=np.uint8), *body])
    decoded = unflatten(dense, dense_part.decoded, shapes) | unflatten(
        sparse, sparse_part.decoded, shapes
    )
    numels = [flats[name].shape[0] for name in sparse]
    positions = dict.fromkeys(dense) | _split_positions(sparse, numels, sparse_part.selector)
    kept = {
        name: flats[name].shape[0] if positions[name] is None else positions[name].shape[0]
        for name in names
    }
    numel_total = sum(f.shape[0] for f in flats.values())
    stats = EncodeStats(
        kept=kept,
        kept_total=sum(kept.values()),
        numel_total=numel_total,
        payload_bytes=int(payload.shape[0]),
        dense_bytes=4 * numel_total,
        position_bytes=sparse_part.position_bytes,
        value_bytes=dense_part.value_bytes + sparse_part.value_bytes,
    )
    return Encoded(
        payload=payload,
        decoded={name: decoded[name] for name in names},
        stats=stats,
        positions={name: positions[name] for name in names},
    )


@dataclass(frozen=True)
class _Section:
    """One encoded section: its bytes in wire order and what the decoder will rebuild."""

    pieces: list[np.ndarray]  # record, positions, values
    decoded: np.ndarray  # float32 concatenation of the section's tensors
    selector: np.ndarray | None  # kept element indices (block 1) or mask; None = all
    position_bytes: int
    value_bytes: int


def _record(bits: int, pos_code: int, rice_k: int, count: int, chunk: int, pos_len: int) -> bytes:
    return _RECORD.pack(VALUE_CODES[bits], pos_code, rice_k, 0, count, chunk, pos_len)


def _encode_dense(flat: np.ndarray, spec: CompressionSpec, rng: np.random.Generator) -> _Section:
    """Every element as float16 (float32 for a lossless spec or values beyond float16)."""
    bits = _float_bits_for(flat, 32 if spec.bits == 32 else 16)
    values, decoded = _code_values(flat, bits, spec, rng)
    record = _record(bits, POS_ALL, 0, flat.shape[0], 0, 0)
    return _Section(
        [np.frombuffer(record, dtype=np.uint8), values], decoded, None, 0, values.shape[0]
    )


def _encode_sparse(
    flats: Sequence[np.ndarray],
    spec: CompressionSpec,
    rng: np.random.Generator,
    pattern_seed: int | None = None,
) -> _Section:
    """Select units over the concatenation of `flats`, code their positions and values."""
    flat = _concat(flats)
    numels = [f.shape[0] for f in flats]
    units = _select_units(flats, flat, spec, rng, pattern_seed)
    n_units = unit_count(numels, spec.block)
    selector = _element_selector(units, n_units, numels, spec.block)
    kept = flat if selector is None else flat[selector]
    bits = _float_bits_for(kept, spec.bits)
    values, kept_decoded = _code_values(kept, bits, spec, rng)
    pos_code, rice_k, positions = encode_positions(units, n_units)
    count = n_units if units is None else units.shape[0]
    record = _record(bits, pos_code, rice_k, count, spec.chunk if bits <= 8 else 0, len(positions))
    if selector is None:
        decoded = kept_decoded
    else:
        decoded = np.zeros(flat.shape[0], dtype=np.float32)
        decoded[selector] = kept_decoded
    pieces = [np.frombuffer(record, dtype=np.uint8), positions, values]
    return _Section(pieces, decoded, selector, positions.shape[0], values.shape[0])


def _concat(flats: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(flats) if flats else np.zeros(0, dtype=np.float32)


def _float_bits_for(values: np.ndarray, bits: int) -> int:
    """float16 would turn values beyond its range into Inf: spend float32's bytes instead."""
    if bits == 16 and values.shape[0] and float(np.max(np.abs(values))) > FLOAT16_MAX:
        return 32
    return bits


def _unit_scores(flat: np.ndarray, block: int) -> np.ndarray:
    """Sum of squares of each run of `block` elements (the last run may be shorter).

    Summed in float64: float32 squares underflow to 0 below |x| ~ 1e-19 and would tie.
    """
    full = flat.shape[0] // block
    head = flat[: full * block].reshape(full, block)
    scores = np.einsum("ij,ij->i", head, head, dtype=np.float64)
    if flat.shape[0] % block:
        tail = flat[full * block :].astype(np.float64)
        scores = np.append(scores, np.dot(tail, tail))
    return scores


def unit_count(numels: Sequence[int], block: int) -> int:
    """Units of tensors of `numels` elements cut into runs of `block` (module docstring)."""
    return sum(-(-n // block) for n in numels)


def unit_lengths(numels: Sequence[int], block: int) -> np.ndarray:
    """Elements in each unit of tensors of `numels` elements cut into runs of `block`."""
    parts = []
    for n in numels:
        lengths = np.full(-(-n // block), block, dtype=np.int32)
        if n % block:
            lengths[-1] = n % block
        parts.append(lengths)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _select_units(
    flats: Sequence[np.ndarray],
    concatenated: np.ndarray,
    spec: CompressionSpec,
    rng: np.random.Generator,
    pattern_seed: int | None = None,
) -> np.ndarray | None:
    """Sorted indices of the kept units over the concatenation (None = every unit)."""
    if spec.select == "none":
        return None
    if spec.select == "pattern":
        assert pattern_seed is not None  # encode checks
        return pattern_units([f.shape[0] for f in flats], spec.block, spec.keep, pattern_seed)
    if spec.select == "thresh":
        return threshold_indices(concatenated, spec.eps)
    scores = list(flats) if spec.block == 1 else [_unit_scores(f, spec.block) for f in flats]
    if spec.select == "gtopk":
        k = kept_count(sum(s.shape[0] for s in scores), spec.keep)
        parts = global_topk_indices(scores, k, rng) if scores else []
    else:
        parts = [topk_indices(s, kept_count(s.shape[0], spec.keep), rng) for s in scores]
    if all(part is None for part in parts):
        return None
    offsets = np.cumsum([0] + [s.shape[0] for s in scores])
    return np.concatenate(
        [
            (np.arange(s.shape[0], dtype=np.int64) if part is None else part) + offset
            for s, part, offset in zip(scores, parts, offsets, strict=False)
        ]
    )


def round_pattern_seed(run_seed: int, server_round: int) -> int:
    """The public seed of round ``server_round``'s pattern: every client of a run derives the
    same one from the run's ``seed`` (a new pattern each round, so every coordinate is sent
    about once in ``1 / keep`` rounds and error feedback carries it until then)."""
    digest = hashlib.sha256(f"feddistill-pattern/{run_seed}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def pattern_units(
    numels: Sequence[int], block: int, keep: float, pattern_seed: int
) -> np.ndarray | None:
    """Sorted unit indices over the concatenation of tensors of ``numels`` elements: a random
    ``kept_count(units, keep)`` of each tensor's units, drawn from ``pattern_seed`` and the
    tensor's place alone (never from the values), so every client draws the same ones."""
    parts, offset = [], 0
    for t, n in enumerate(numels):
        units = -(-n // block)
        k = kept_count(units, keep)
        if k >= units:
            parts.append(np.arange(units, dtype=np.int64) + offset)
        elif k:
            rng = np.random.default_rng([pattern_seed, t])
            parts.append(
                np.sort(rng.choice(units, size=k, replace=False)).astype(np.int64) + offset
            )
        offset += units
    if not parts or sum(p.shape[0] for p in parts) == offset:
        return None
    return np.concatenate(parts)


def _element_selector(
    units: np.ndarray | None, n_units: int, numels: Sequence[int], block: int
) -> np.ndarray | None:
    """Element indices (block 1) or an element mask (block > 1) for kept `units`."""
    if units is None or block == 1:
        return units
    mask = np.zeros(n_units, dtype=bool)
    mask[units] = True
    return np.repeat(mask, unit_lengths(numels, block))


def unflatten(
    names: Sequence[str], flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Views of the concatenation `flat`, one per tensor, in the tensors' shapes."""
    out: dict[str, np.ndarray] = {}
    start = 0
    for name in names:
        n = int(np.prod(shapes[name], dtype=np.int64))
        out[name] = flat[start : start + n].reshape(shapes[name])
        start += n
    return out


def _split_positions(
    names: Sequence[str], numels: Sequence[int], selector: np.ndarray | None
) -> dict[str, np.ndarray | None]:
    """Sorted kept indices per tensor (None where every element was kept)."""
    if selector is None:
        return dict.fromkeys(names)
    indices = np.flatnonzero(selector) if selector.dtype == bool else selector
    return dict(zip(names, split_indices(numels, indices), strict=True))


def _code_values(
    values: np.ndarray, bits: int, spec: CompressionSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(value section bytes, the float32 values the decoder will reconstruct)."""
    if bits == 32:
        return values.astype("<f4", copy=False).view(np.uint8), values
    if bits == 16:
        half = values.astype("<f2")
        return half.view(np.uint8), half.astype(np.float32)
    scales, codes = quantize(values, bits, stochastic=spec.stochastic, chunk=spec.chunk, rng=rng)
    section = np.concatenate([scales.astype("<f4").view(np.uint8), pack_codes(codes, bits)])
    return section, dequantize(scales, codes, spec.chunk)


class _Reader:
    """Cursor over the payload that refuses to read past the bytes actually present."""

    def __init__(self, buf: np.ndarray, end: int) -> None:
        self.buf = buf
        self.pos = 0
        self.end = end

    def take(self, n: int, what: str) -> np.ndarray:
        if n > self.end - self.pos:
            raise PayloadError(
                "truncated", f"{what} needs {n} bytes, {self.end - self.pos} left at {self.pos}"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view


def decode(
    payload: np.ndarray, schema: Schema, *, max_payload_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Validate `payload` against the receiver's `schema` and rebuild the float32 update.

    Args:
        payload: 1-D uint8 array from `encode`.
        schema: (name, shape) pairs from the receiver's own model, in the sender's order.
        max_payload_bytes: refuse longer payloads before reading anything.

    Every declared length is checked against the bytes remaining and every count against numel
    from the schema before anything is allocated, so memory stays below the output arrays plus a
    few times the largest tensor, whatever the payload claims.

    Raises:
        PayloadError: with `.check` naming the failed check, for any malformed payload.
        ValueError: for a malformed `schema` (the caller's own bug).
    """
    entries = _checked_schema(schema)
    if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
        described = (
            f"{payload.dtype} array of shape {payload.shape}"
            if isinstance(payload, np.ndarray)
            else type(payload).__name__
        )
        raise PayloadError("dtype", f"payload must be a 1-D uint8 array, got {described}")
    size = int(payload.shape[0])
    if max_payload_bytes is not None and size > max_payload_bytes:
        raise PayloadError("size-limit", f"payload of {size} bytes > limit {max_payload_bytes}")
    buf = np.ascontiguousarray(payload)
    if size < HEADER_BYTES:
        raise PayloadError("truncated", f"payload of {size} bytes is shorter than the header")
    magic, version, flags, block, digest, n_tensors, dense_below, total = _HEADER.unpack(
        buf[:HEADER_BYTES].tobytes()
    )
    if magic != MAGIC:
        raise PayloadError("magic", f"magic {magic!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise PayloadError(
            "version", f"format version {version}, this reader knows {FORMAT_VERSION}"
        )
    if flags:
        raise PayloadError("header", "reserved header flags are not zero")
    if block < 1:
        raise PayloadError("header", "block size 0; units hold at least one element")
    if n_tensors != len(entries) or digest != schema_hash([(n, s) for n, s, _ in entries]):
        raise PayloadError(
            "schema", f"payload was encoded for another model ({n_tensors} tensors, other hash)"
        )
    if total > size:
        raise PayloadError("truncated", f"header declares {total} bytes, {size} present")
    if total < size:
        raise PayloadError("trailing-bytes", f"{size - total} bytes after the declared end")

    reader = _Reader(buf, size)
    reader.take(HEADER_BYTES, "header")
    dense = [(name, shape) for name, shape, numel in entries if numel < dense_below]
    sparse = [(name, shape) for name, shape, numel in entries if numel >= dense_below]
    dense_flat = _decode_section(reader, "dense section", [_numel(s) for _, s in dense], 1, True)
    sparse_flat = _decode_section(
        reader, "sparse section", [_numel(s) for _, s in sparse], block, False
    )
    if reader.pos != size:
        raise PayloadError("trailing-bytes", f"{size - reader.pos} unused bytes at the end")
    shapes = {name: shape for name, shape, _ in entries}
    out = {
        **unflatten([name for name, _ in dense], dense_flat, shapes),
        **unflatten([name for name, _ in sparse], sparse_flat, shapes),
    }
    return {name: out[name] for name, _, _ in entries}


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _decode_section(
    reader: _Reader, where: str, numels: Sequence[int], block: int, whole: bool
) -> np.ndarray:
    """One section's record, positions and values, as the float32 concatenation of its tensors.

    `whole` is the dense section, which must keep every element in a float code. Memory stays
    within the output plus an int32 per unit and a bool per element, whatever the record claims.
    """
    record = reader.take(RECORD_BYTES, f"{where} record").tobytes()
    value_code, pos_code, rice_k, reserved, count, chunk, pos_bytes = _RECORD.unpack(record)
    if reserved:
        raise PayloadError("header", f"{where}: reserved record byte is {reserved}")
    if value_code not in CODE_BITS:
        raise PayloadError("mode", f"{where}: unknown value code {value_code}")
    if pos_code not in POSITION_CODES:
        raise PayloadError("mode", f"{where}: unknown position code {pos_code}")
    if pos_code != POS_RICE and rice_k:
        raise PayloadError("rice-param", f"{where}: Rice parameter {rice_k} without RICE code")
    bits = CODE_BITS[value_code]
    if whole and (pos_code != POS_ALL or bits <= 8):
        raise PayloadError("mode", f"{where}: must keep every element as float32 or float16")
    n = sum(numels)
    n_units = unit_count(numels, block)
    if count > n_units:
        raise PayloadError("count", f"{where}: {count} kept units > {n_units} units")
    if (bits <= 8) != (chunk >= 1):
        raise PayloadError("chunk", f"{where}: chunk {chunk} invalid for {bits}-bit values")
    section = reader.take(pos_bytes, f"{where} positions")
    selector = decode_positions(pos_code, rice_k, section, count, n_units)
    if selector is None:
        return _decode_values(reader, where, bits, n, chunk)
    if block > 1:
        if selector.dtype != bool:
            mask = np.zeros(n_units, dtype=bool)
            mask[selector] = True
            selector = mask
        lengths = unit_lengths(numels, block)
        n_values = int(np.sum(lengths, where=selector, dtype=np.int64))
        values = _decode_values(reader, where, bits, n_values, chunk)
        selector = np.repeat(selector, lengths)
    else:
        values = _decode_values(reader, where, bits, count, chunk)
    out = np.zeros(n, dtype=np.float32)
    out[selector] = values
    return out


def _decode_values(reader: _Reader, where: str, bits: int, count: int, chunk: int) -> np.ndarray:
    if bits == 32:
        values = reader.take(4 * count, f"{where} values").view("<f4").astype(np.float32)
    elif bits == 16:
        values = reader.take(2 * count, f"{where} values").view("<f2").astype(np.float32)
    else:
        n_scales = -(-count // chunk)
        scales = reader.take(4 * n_scales, f"{where} scales").view("<f4").astype(np.float32)
        if not np.isfinite(scales).all():
            raise PayloadError("scale-finite", f"{where}: non-finite quantization scale")
        if (scales < 0).any():
            raise PayloadError("scale-range", f"{where}: negative quantization scale")
        packed = reader.take(packed_code_bytes(bits, count), f"{where} codes")
        codes = unpack_codes(packed, bits, count)
        with np.errstate(over="ignore"):  # a hostile scale may overflow; refused just below
            values = dequantize(scales, codes, chunk)
    if not np.isfinite(values).all():
        raise PayloadError("value-finite", f"{where}: non-finite decoded value")
    return values


def max_encoded_bytes(schema: Schema, spec: CompressionSpec) -> int:
    """The longest payload `encode` writes for an update of `schema` under `spec`, any values.

    The receiver's size limit (a reply longer than this was not written by our encoder): read
    off the layout in the module docstring, taking the worst case wherever the encoder chooses
    by the values. Per section:

    * kept units: every unit for ``none`` and ``thresh``; ``max(1, round(keep · units))`` per
      tensor for ``topk`` and over the section for ``gtopk`` (`kept_count`), each unit at most
      ``block`` elements and never more than the tensor holds; ``pattern`` as ``topk``;
    * positions: at most the bitmap, ``ceil(units / 8)`` bytes (the encoder writes the smaller
      of bitmap and Rice; ALL and EMPTY cost nothing);
    * values: 4 bytes each for float codes (float16 turns into float32 for values beyond its
      range); for 2..8 bits, a float32 scale per ``chunk`` kept values plus the packed codes.
    """
    entries = _checked_schema(schema)
    dense = [numel for _, _, numel in entries if numel < spec.dense_below]
    sparse = [numel for _, _, numel in entries if numel >= spec.dense_below]
    n_units = unit_count(sparse, spec.block)
    if spec.select in ("topk", "pattern"):
        kept = sum(min(n, kept_count(-(-n // spec.block), spec.keep) * spec.block) for n in sparse)
    elif spec.select == "gtopk":
        kept = min(sum(sparse), kept_count(n_units, spec.keep) * spec.block)
    else:
        kept = sum(sparse)
    if spec.bits >= 16:
        values = 4 * kept
    else:
        values = 4 * -(-kept // spec.chunk) + packed_code_bytes(spec.bits, kept)
    positions = 0 if spec.select == "none" else -(-n_units // 8)
    return HEADER_BYTES + 2 * RECORD_BYTES + 4 * sum(dense) + positions + values
