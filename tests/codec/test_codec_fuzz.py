"""Malformed payloads: every one is refused with PayloadError, and decode stays within memory.

Valid payloads from several specs (covering every value code and position code, per-element and
per-block selection) are damaged
in four ways: truncation at random points, random byte flips, whole-field edits (magic,
version, counts, lengths, mode bytes, absurd sizes such as 2**40 elements) and section edits
crafted from the wire layout (positions past the end, bitmap counts that disagree, NaN/Inf or
negative scales, invalid integer codes, non-zero padding, trailing bytes).

A random byte flip may land on bits that still form a valid payload (a value byte, a scale's
low mantissa bits); that is allowed only if decode then returns arrays of the schema's shapes
with finite values. Every other case must raise PayloadError and nothing else.

Unsorted or duplicated positions cannot be written in this format (RICE codes gaps >= 0 and a
bitmap has one bit per element), so their crafted counterparts are a RICE stream whose gaps
run past the tensor and bitmaps whose popcount disagrees with the declared count.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from feddistill.codec import (
    CompressionSpec,
    Encoded,
    PayloadError,
    decode,
    encode,
    parse_spec,
    schema_hash,
    schema_of,
)
from feddistill.codec.positions import POS_BITMAP, POS_RICE, encode_positions

RECORD = struct.Struct("<BBBBQIQ")
HEADER_BYTES = 32
VALUE_BITS = {0: 32, 1: 16, 2: 8, 3: 4, 4: 2, 5: 1}
SPECS = [
    "topk:0.05+q4",
    "topk:0.5+q8+chunk:100",
    "none+q1",
    "thresh:1.5+fp16",
    "gtopk:0.01+q2+sr+dense:60",
    "fp32",
    "topk:0.2+q1+sr+chunk:7",
    "topk:0.02+q4+sr+chunk:3",
    "gtopk:0.01+block:16+q4",
    "topk:0.05+block:7+q8+chunk:50+dense:60",
]


def make_update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "big": (rng.standard_t(3, size=100_000) * 1e-2).astype(np.float32),
        "mat": rng.normal(size=(300, 7)).astype(np.float32),
        "bias": rng.normal(size=53).astype(np.float32),
        "one": np.array([0.25], dtype=np.float32),
        "scalar": np.array(3.0, dtype=np.float32),
    }


UPDATE = make_update()
SCHEMA = schema_of(UPDATE)
TENSOR_BYTES = [4 * int(np.prod(shape, dtype=np.int64)) for _, shape in SCHEMA]
# Outputs themselves, plus a few times the largest tensor of scratch, plus interpreter noise.
MEMORY_BOUND = sum(TENSOR_BYTES) + 4 * max(TENSOR_BYTES) + (1 << 20)


@dataclass(frozen=True)
class Layout:
    """Offsets of one section's parts inside a payload (from the wire layout in wire.py)."""

    record: int
    value_code: int
    pos_code: int
    rice_k: int
    count: int  # kept units
    chunk: int
    numel: int  # units in the section
    values: int  # kept elements
    pos: int
    pos_len: int
    val: int
    val_len: int
    scales_len: int


def layouts(encoded: Encoded, spec: CompressionSpec) -> list[Layout]:
    """The dense section then the sparse section."""
    raw = encoded.payload.tobytes()
    numels = [int(np.prod(shape, dtype=np.int64)) for _, shape in SCHEMA]
    dense = [n for n in numels if n < spec.dense_below]
    sparse = [n for n in numels if n >= spec.dense_below]
    kept = sum(encoded.stats.kept.values())
    section_units = [sum(dense), sum(-(-n // spec.block) for n in sparse)]
    section_values = [sum(dense), kept - sum(dense)]
    off = HEADER_BYTES
    out = []
    for units, n_values in zip(section_units, section_values, strict=True):
        vcode, pcode, k, _, count, chunk, pos_len = RECORD.unpack_from(raw, off)
        bits = VALUE_BITS[vcode]
        scales_len = 4 * -(-n_values // chunk) if bits <= 8 else 0
        val_len = scales_len + (n_values * bits + 7) // 8
        pos = off + RECORD.size
        out.append(
            Layout(
                off,
                vcode,
                pcode,
                k,
                count,
                chunk,
                units,
                n_values,
                pos,
                pos_len,
                pos + pos_len,
                val_len,
                scales_len,
            )
        )
        off = pos + pos_len + val_len
    assert off == encoded.payload.shape[0]
    return out


def put(payload: np.ndarray, offset: int, fmt: str, *values: object) -> np.ndarray:
    out = payload.copy()
    raw = struct.pack(fmt, *values)
    out[offset : offset + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def with_total(payload: np.ndarray) -> np.ndarray:
    """Rewrite the header's total-length field to the actual length."""
    return put(payload, 24, "<Q", payload.shape[0])


Case = tuple[str, Callable[[], object], str | None]  # (label, decode call, expected check)


def call(payload: object, schema: object = SCHEMA, **kwargs: object) -> Callable[[], object]:
    return lambda: decode(payload, schema, **kwargs)  # type: ignore[arg-type]


def crafted_cases(encoded: Encoded, spec: CompressionSpec) -> Iterator[Case]:
    payload = encoded.payload
    n = payload.shape[0]
    yield "magic", call(put(payload, 0, "4s", b"XXXX")), "magic"
    for version in (0, 1, 3, 255):
        yield f"version {version}", call(put(payload, 4, "B", version)), "version"
    yield "flags", call(put(payload, 5, "B", 1)), "header"
    yield "block 0", call(put(payload, 6, "<H", 0)), "header"
    for block in (3, 65535):
        yield f"block {block}", call(put(payload, 6, "<H", block)), None
    for dense_below in (9, 2**32 - 1):
        yield f"dense_below {dense_below}", call(put(payload, 20, "<I", dense_below)), None
    yield "n_tensors", call(put(payload, 16, "<I", 2**31)), "schema"
    yield "hash", call(put(payload, 8, "B", payload[8] ^ 1)), "schema"
    renamed = [("BIG" if name == "big" else name, shape) for name, shape in SCHEMA]
    yield "schema rename", call(payload, renamed), "schema"
    reshaped = [(name, (7, 300) if name == "mat" else shape) for name, shape in SCHEMA]
    yield "schema reshape", call(payload, reshaped), "schema"
    yield "schema drop", call(payload, SCHEMA[:-1]), "schema"
    yield "schema extra", call(payload, [*SCHEMA, ("x", (2,))]), "schema"
    yield "total 2**40", call(put(payload, 24, "<Q", 2**40)), "truncated"
    yield "total short", call(put(payload, 24, "<Q", n - 1)), "trailing-bytes"
    for extra in (1, 7, 100):
        tail = np.arange(extra, dtype=np.uint8)
        longer = np.concatenate([payload, tail])
        yield f"trailing {extra}", call(longer), "trailing-bytes"
        yield f"trailing {extra} fixed total", call(with_total(longer)), "trailing-bytes"
    yield "float32 array", call(payload.astype(np.float32)), "dtype"
    yield "int8 view", call(payload.view(np.int8)), "dtype"
    yield "2-D", call(payload[: n - n % 2].reshape(2, -1)), "dtype"
    yield "bytes", call(payload.tobytes()), "dtype"
    yield "size limit", call(payload, max_payload_bytes=n - 1), "size-limit"
    yield "empty", call(payload[:0]), "truncated"
    for t, lay in enumerate(layouts(encoded, spec)):
        yield from record_cases(payload, t, lay)
        yield from section_cases(payload, t, lay)


def record_cases(payload: np.ndarray, t: int, lay: Layout) -> Iterator[Case]:
    r = lay.record
    for code in (6, 255):
        yield f"t{t} value code {code}", call(put(payload, r, "B", code)), "mode"
        yield f"t{t} position code {code}", call(put(payload, r + 1, "B", code)), "mode"
    yield f"t{t} reserved", call(put(payload, r + 3, "B", 1)), "header"
    if t == 0:  # the dense section keeps every element as floats
        yield "dense section as BITMAP", call(put(payload, r + 1, "B", POS_BITMAP)), "mode"
        yield "dense section as int8", call(put(payload, r, "B", 2)), "mode"
    yield f"t{t} count 2**40", call(put(payload, r + 4, "<Q", 2**40)), "count"
    yield f"t{t} count numel+1", call(put(payload, r + 4, "<Q", lay.numel + 1)), "count"
    for delta in (-1, 1):
        if 0 <= lay.count + delta <= lay.numel:
            yield f"t{t} count{delta:+d}", call(put(payload, r + 4, "<Q", lay.count + delta)), None
    yield f"t{t} pos_len 2**62", call(put(payload, r + 16, "<Q", 2**62)), "truncated"
    yield f"t{t} pos_len +1", call(put(payload, r + 16, "<Q", lay.pos_len + 1)), None
    is_quantized = VALUE_BITS[lay.value_code] <= 8
    yield f"t{t} chunk", call(put(payload, r + 12, "<I", 0 if is_quantized else 5)), "chunk"
    if lay.pos_code == POS_RICE:
        yield f"t{t} rice k 63", call(put(payload, r + 2, "B", 63)), "rice-param"
    elif lay.rice_k == 0:
        yield f"t{t} k on non-rice", call(put(payload, r + 2, "B", 3)), None


def splice_positions(payload: np.ndarray, lay: Layout, k: int, section: np.ndarray) -> np.ndarray:
    out = np.concatenate([payload[: lay.pos], section, payload[lay.pos + lay.pos_len :]])
    out = put(out, lay.record + 2, "B", k)
    out = put(out, lay.record + 16, "<Q", section.shape[0])
    return with_total(out)


def section_cases(payload: np.ndarray, t: int, lay: Layout) -> Iterator[Case]:
    if lay.pos_code == POS_RICE:
        fixed = (lay.count * lay.rice_k + 7) // 8
        zeros = payload.copy()
        zeros[lay.pos + fixed : lay.pos + lay.pos_len] = 0
        yield f"t{t} rice no terminators", call(zeros), "positions"
        # A well-formed Rice stream whose last position lies past the tensor.
        bad = np.arange(lay.count, dtype=np.int64) * (lay.numel // lay.count)
        bad[-1] = lay.numel + 2
        _, k, section = encode_positions(bad, lay.numel + 3)
        yield f"t{t} rice past end", call(splice_positions(payload, lay, k, section)), None
        padded = splice_positions(
            payload, lay, lay.rice_k, np.concatenate([payload[lay.pos : lay.val], [0]])
        )
        yield f"t{t} rice extra zero byte", call(padded), None
    if lay.pos_code == POS_BITMAP:
        bits = np.unpackbits(payload[lay.pos : lay.val])
        extra = payload.copy()
        free = int(np.flatnonzero(bits[: lay.numel] == 0)[0])
        extra[lay.pos + free // 8] |= np.uint8(0x80 >> (free % 8))
        yield f"t{t} bitmap extra bit", call(extra), "count"
        if lay.numel % 8:
            pad = payload.copy()
            pad[lay.val - 1] |= np.uint8(1)
            yield f"t{t} bitmap padding", call(pad), "padding"
    bits = VALUE_BITS[lay.value_code]
    if lay.values == 0:
        return
    v = lay.val
    if bits <= 8:
        for label, scale, check in [
            ("nan", np.nan, "scale-finite"),
            ("inf", np.inf, "scale-finite"),
            ("-inf", -np.inf, "scale-finite"),
            ("negative", -1.0, "scale-range"),
        ]:
            yield f"t{t} scale {label}", call(put(payload, v, "<f", scale)), check
        codes = v + lay.scales_len
        invalid = {8: 0x80, 4: 0x0F & payload[codes], 2: 0xC0 | (payload[codes] & 0x3F)}
        if bits in invalid:
            yield f"t{t} bad code", call(put(payload, codes, "B", invalid[bits])), "value-code"
        if bits == 8:
            yield f"t{t} huge scale", call(put(payload, v, "<f", 3.4e38)), "value-finite"
        if (lay.values * bits) % 8:
            pad = payload.copy()
            pad[v + lay.val_len - 1] |= np.uint8(1)
            yield f"t{t} code padding", call(pad), "padding"
    elif bits == 32:
        yield f"t{t} value nan", call(put(payload, v, "<f", np.nan)), "value-finite"
        yield f"t{t} value inf", call(put(payload, v, "<f", np.inf)), "value-finite"
    else:
        yield f"t{t} half inf", call(put(payload, v, "<H", 0x7C00)), "value-finite"
        yield f"t{t} half nan", call(put(payload, v, "<H", 0x7E00)), "value-finite"


def random_cases(payload: np.ndarray, rng: np.random.Generator) -> Iterator[Case]:
    n = payload.shape[0]
    for cut in rng.integers(0, n, size=60):
        yield f"truncate {cut}", call(payload[:cut]), None
    for region, (lo, hi) in {"header": (0, HEADER_BYTES + RECORD.size), "body": (0, n)}.items():
        for _ in range(40):
            flipped = payload.copy()
            where = rng.integers(lo, hi, size=rng.integers(1, 4))
            flipped[where] ^= rng.integers(1, 256, size=where.shape[0]).astype(np.uint8)
            yield f"flip {region} {where.tolist()}", call(flipped), "may-pass"


def run_case(label: str, fn: Callable[[], object], expected: str | None) -> bool:
    """Run one decode under tracemalloc; returns True if it raised PayloadError."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        result = fn()
    except PayloadError as err:
        raised = True
        if expected not in (None, "may-pass"):
            assert err.check == expected, (label, err.check, str(err))
    else:
        raised = False
        assert expected == "may-pass", f"{label}: malformed payload decoded without error"
        assert isinstance(result, dict) and list(result) == [name for name, _ in SCHEMA]
        for (name, shape), array in zip(SCHEMA, result.values(), strict=True):
            assert array.shape == shape and array.dtype == np.float32, (label, name)
            assert np.isfinite(array).all(), (label, name)
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak <= MEMORY_BOUND, f"{label}: decode peaked at {peak} bytes > {MEMORY_BOUND}"
    return raised


@pytest.fixture()
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.usefixtures("traced")
def test_malformed_payloads_raise_payload_error_within_memory_bound() -> None:
    rng = np.random.default_rng(2024)
    malformed = refused = accepted_flips = 0
    for text in SPECS:
        spec = parse_spec(text)
        encoded = encode(UPDATE, spec, seed=1)
        payload = encoded.payload
        assert not run_case(f"{text} valid", call(payload), "may-pass")
        cases = [*crafted_cases(encoded, spec), *random_cases(payload, rng)]
        for label, fn, expected in cases:
            raised = run_case(f"{text}: {label}", fn, expected)
            malformed += 1
            refused += raised
            accepted_flips += not raised

    assert malformed >= 1000
    # Flips that still decode must stay rare, or the fuzzer is not testing validation.
    assert accepted_flips < 0.25 * malformed
    assert refused == malformed - accepted_flips


def test_receiver_schema_errors_are_value_errors_not_payload_errors() -> None:
    payload = encode(UPDATE, parse_spec("topk:0.1+q8")).payload

    with pytest.raises(ValueError, match="must be non-negative integers") as info:
        decode(payload, [("big", (-1,))])
    assert not isinstance(info.value, PayloadError)
    with pytest.raises(ValueError, match="names must be unique"):
        decode(payload, [("a", (1,)), ("a", (1,))])


@pytest.mark.usefixtures("traced")
@pytest.mark.parametrize(
    ("value_code", "pos_code", "count", "pos_len", "body", "check"),
    [
        (0, 0, 10_000_000, 0, b"", "truncated"),  # dense float32 claimed, no bytes
        (2, 3, 9_999_999, 1_000_000, b"\x00" * 64, "truncated"),  # huge Rice section claimed
        (2, 3, 5_000_000, 40, b"\xff" * 40, "positions"),  # Rice section too short for count
        (5, 2, 1, 1_250_000, b"", "truncated"),  # bitmap of the right size claimed, absent
    ],
)
def test_hostile_claims_against_a_large_schema_allocate_nothing_big(
    value_code: int, pos_code: int, count: int, pos_len: int, body: bytes, check: str
) -> None:
    # A 10M-element schema would make any claim-sized allocation show up as >= 10 MB.
    schema = [("w", (10_000_000,))]
    empty_dense = RECORD.pack(1, 0, 0, 0, 0, 0, 0)
    record = RECORD.pack(value_code, pos_code, 0, 0, count, 256 if value_code else 0, pos_len)
    size = HEADER_BYTES + len(empty_dense) + len(record) + len(body)
    header = struct.pack("<4sBBH8sIIQ", b"FDCQ", 2, 0, 1, schema_hash(schema), 1, 0, size)
    payload = np.frombuffer(header + empty_dense + record + body, dtype=np.uint8)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]

    with pytest.raises(PayloadError) as info:
        decode(payload, schema)

    assert info.value.check == check
    assert tracemalloc.get_traced_memory()[1] - before < (1 << 20)
