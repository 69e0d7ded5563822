"""`encode` / `decode`: a whole model update as one 1-D uint8 array, and its strict reader.

One blob per message because every array in a Flower message costs ~128 bytes of framing.
The receiver supplies the schema (names and shapes, from its own copy of the model), so the
payload carries no names; a hash of the schema in the header makes a payload for another
model fail loudly instead of decoding into the wrong tensors.

Wire layout (all integers little-endian)::

    header, 32 bytes
      0  4s   magic b"FDCQ"
      4  u8   FORMAT_VERSION (1)
      5  u8   flags, 0 (reserved)
      6  u16  reserved, 0
      8  8s   schema hash: blake2b-64 of (name, shape) pairs in order (`schema_hash`)
     16  u32  number of tensors (must equal len(schema))
     20  u32  reserved, 0
     24  u64  total payload length in bytes (header included)
    then per tensor, in schema order:
      record, 24 bytes
      0  u8   value code: 0 float32, 1 float16, 2 int8, 3 int4, 4 ternary, 5 sign (quant.py)
      1  u8   position code: 0 ALL, 1 EMPTY, 2 BITMAP, 3 RICE (positions.py)
      2  u8   Rice parameter k (0 unless RICE)
      3  u8   reserved, 0
      4  u64  kept count c (<= numel from the schema)
     12  u32  chunk: values per scale for codes 2..5, 0 for float codes
     16  u64  position section length in bytes
      position section (positions.py)
      value section: float32 (4c bytes) | float16 (2c bytes) |
                     float32 scales (4·ceil(c/chunk) bytes) then packed codes (ceil(c·bits/8))

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
from .positions import POS_RICE, POSITION_CODES, decode_positions, encode_positions
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
from .selection import global_topk_indices, kept_count, threshold_indices, topk_indices
from .spec import CompressionSpec

FORMAT_VERSION = 1
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


def encode(update: Mapping[str, np.ndarray], spec: CompressionSpec, *, seed: int = 0) -> Encoded:
    """Prune and quantize `update` per `spec` into one uint8 payload (layout in module doc).

    Args:
        update: name -> float array (cast to float32); tensor order is iteration order.
        spec: what to keep and how to code it. `spec.error_feedback` is not applied here: call
            `with_residual` before and `residual_after` after.
        seed: seeds `np.random.default_rng` for stochastic rounding and threshold sampling;
            the same inputs and seed give the same payload.

    Raises:
        ValueError: for a non-float or non-finite tensor, or a spec that is not a
            `CompressionSpec`.
    """
    if not isinstance(spec, CompressionSpec):
        raise ValueError(f"spec must be a CompressionSpec, got {type(spec).__name__}")
    rng = np.random.default_rng(seed)
    names = list(update)
    shapes = {name: tuple(int(d) for d in np.shape(update[name])) for name in names}
    flats = {name: _flat_float32(name, update[name]) for name in names}
    dense = {name: flats[name].shape[0] < spec.dense_below for name in names}
    selected = _select(flats, dense, spec, rng)

    pieces: list[np.ndarray] = []
    decoded: dict[str, np.ndarray] = {}
    kept: dict[str, int] = {}
    position_bytes = value_bytes = 0
    for name in names:
        flat, indices = flats[name], selected[name]
        numel = flat.shape[0]
        values = flat if indices is None else flat[indices]
        bits = (32 if spec.bits == 32 else 16) if dense[name] else spec.bits
        if bits == 16 and values.shape[0] and float(np.max(np.abs(values))) > FLOAT16_MAX:
            bits = 32  # float16 would turn these into Inf; spend the bytes instead
        value_section, decoded_values = _code_values(values, bits, spec, rng)
        pos_code, rice_k, pos_section = encode_positions(indices, numel)
        count = values.shape[0]
        chunk = spec.chunk if bits <= 8 else 0
        record = _RECORD.pack(
            VALUE_CODES[bits], pos_code, rice_k, 0, count, chunk, pos_section.shape[0]
        )
        pieces += [np.frombuffer(record, dtype=np.uint8), pos_section, value_section]
        position_bytes += pos_section.shape[0]
        value_bytes += value_section.shape[0]
        if indices is None:
            out = decoded_values if decoded_values is not values else values.copy()
        else:
            out = np.zeros(numel, dtype=np.float32)
            out[indices] = decoded_values
        decoded[name] = out.reshape(shapes[name])
        kept[name] = count

    total = HEADER_BYTES + sum(p.shape[0] for p in pieces)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, 0, schema_hash(list(shapes.items())), len(names), 0, total
    )
    payload = np.concatenate([np.frombuffer(header, dtype=np.uint8), *pieces])
    numel_total = sum(f.shape[0] for f in flats.values())
    stats = EncodeStats(
        kept=kept,
        kept_total=sum(kept.values()),
        numel_total=numel_total,
        payload_bytes=int(payload.shape[0]),
        dense_bytes=4 * numel_total,
        position_bytes=position_bytes,
        value_bytes=value_bytes,
    )
    return Encoded(payload=payload, decoded=decoded, stats=stats, positions=selected)


def _select(
    flats: dict[str, np.ndarray],
    dense: dict[str, bool],
    spec: CompressionSpec,
    rng: np.random.Generator,
) -> dict[str, np.ndarray | None]:
    """Kept indices per tensor (None = all); dense-below tensors are always kept whole."""
    out: dict[str, np.ndarray | None] = dict.fromkeys(flats)
    prunable = [name for name in flats if not dense[name]]
    if spec.select == "gtopk" and prunable:
        arrays = [flats[name] for name in prunable]
        k = kept_count(sum(a.shape[0] for a in arrays), spec.keep)
        out.update(zip(prunable, global_topk_indices(arrays, k, rng), strict=True))
    elif spec.select == "topk":
        for name in prunable:
            out[name] = topk_indices(flats[name], kept_count(flats[name].shape[0], spec.keep), rng)
    elif spec.select == "thresh":
        for name in prunable:
            out[name] = threshold_indices(flats[name], spec.eps)
    return out


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
    magic, version, flags, reserved, digest, n_tensors, reserved2, total = _HEADER.unpack(
        buf[:HEADER_BYTES].tobytes()
    )
    if magic != MAGIC:
        raise PayloadError("magic", f"magic {magic!r} is not {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise PayloadError("version", f"format version {version}, this reader knows 1")
    if flags or reserved or reserved2:
        raise PayloadError("header", "reserved header fields are not zero")
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
    out: dict[str, np.ndarray] = {}
    for name, shape, numel in entries:
        out[name] = _decode_tensor(reader, name, numel).reshape(shape)
    if reader.pos != size:
        raise PayloadError("trailing-bytes", f"{size - reader.pos} unused bytes at the end")
    return out


def _decode_tensor(reader: _Reader, name: str, numel: int) -> np.ndarray:
    record = reader.take(RECORD_BYTES, f"record of {name!r}").tobytes()
    value_code, pos_code, rice_k, reserved, count, chunk, pos_bytes = _RECORD.unpack(record)
    where = f"tensor {name!r}"
    if reserved:
        raise PayloadError("header", f"{where}: reserved record byte is {reserved}")
    if value_code not in CODE_BITS:
        raise PayloadError("mode", f"{where}: unknown value code {value_code}")
    if pos_code not in POSITION_CODES:
        raise PayloadError("mode", f"{where}: unknown position code {pos_code}")
    if pos_code != POS_RICE and rice_k:
        raise PayloadError("rice-param", f"{where}: Rice parameter {rice_k} without RICE code")
    if count > numel:
        raise PayloadError("count", f"{where}: {count} kept values > {numel} elements")
    bits = CODE_BITS[value_code]
    if (bits <= 8) != (chunk >= 1):
        raise PayloadError("chunk", f"{where}: chunk {chunk} invalid for {bits}-bit values")
    section = reader.take(pos_bytes, f"{where} positions")
    selector = decode_positions(pos_code, rice_k, section, count, numel)
    values = _decode_values(reader, where, bits, count, chunk)
    if selector is None:
        return values
    dense = np.zeros(numel, dtype=np.float32)
    dense[selector] = values
    return dense


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
