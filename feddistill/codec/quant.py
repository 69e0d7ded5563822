"""Value coding of the kept values: float32/float16, or signed integers with per-chunk scales.

Kept values are taken in position order and cut into chunks of `chunk` values; each chunk of a
quantized tensor carries one float32 scale (32 bits per chunk, i.e. 32/chunk bits per value:
0.125 at the default chunk of 256). float32 rather than float16 so that tiny updates (|w| below
float16's normal range, 6e-5) and huge ones keep a scale with full relative precision, at a
cost of 0.06 bits per value.

Levels and scales (a = absmax of the chunk, v a value, q its integer code):

=====  ==============  ============  ==============================  =================
bits   codes           scale s       deterministic / stochastic      error bound
=====  ==============  ============  ==============================  =================
8      -127..127       a / 127       q = rint(v/s) / floor(v/s + u)   s/2  /  s
4      -7..7           a / 7         same                            s/2  /  s
2      -1, 0, +1       a             same                            a/2  /  a
1      -1, +1          mean|v| / a   q = sign(v), 0 -> +1 / P(+1) =  a    /  2a
                                     (1 + v/a) / 2
16     float16         -             round to nearest                max(|v|·2^-11, 2^-25)
32     float32         -             exact                           0
=====  ==============  ============  ==============================  =================

u ~ U[0, 1) makes `floor(v/s + u)` an unbiased estimate of v/s (E = v/s exactly), the
stochastic rounding of Gupta et al. 2015 (arXiv:1502.02551); the stochastic sign code is the
unbiased 1-bit scheme of signSGD-with-scale / TernGrad (Wen et al. 2017, arXiv:1705.07878).
Deterministic 1-bit uses s = mean|v| of the chunk because it is the least-squares scale for a
fixed sign pattern (argmin_s sum (v - s·sign v)^2) and keeps the chunk's L1 mass, which makes the
sign code as close to unbiased as a deterministic code can be; its error is still bounded by a
because 0 <= s <= a. Every quantized bound also gets a float32 slack of a·2^-20 + 2^-120; the
absolute part only matters for chunks whose absmax is below float32's normal range (~1e-38),
where the scale a/levels is subnormal or zero.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import PayloadError
from .spec import CompressionSpec

# Value-code bytes on the wire.
VALUE_F32 = 0
VALUE_F16 = 1
VALUE_Q8 = 2
VALUE_Q4 = 3
VALUE_Q2 = 4
VALUE_Q1 = 5
VALUE_CODES: dict[int, int] = {
    32: VALUE_F32,
    16: VALUE_F16,
    8: VALUE_Q8,
    4: VALUE_Q4,
    2: VALUE_Q2,
    1: VALUE_Q1,
}
CODE_BITS: dict[int, int] = {code: bits for bits, code in VALUE_CODES.items()}
LEVELS: dict[int, int] = {8: 127, 4: 7, 2: 1, 1: 1}
FLOAT16_MAX = 65504.0
# float32 slack on quantized bounds: relative for the division and product rounding, absolute
# for chunks so small that the scale a/levels is subnormal (or underflows to zero).
_SLACK = 2.0**-20
_ABS_SLACK = 2.0**-120


def chunk_reduce(values: np.ndarray, chunk: int, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """`reduce(block, axis=1)` over consecutive chunks (the last may be short) -> (n_chunks,)."""
    m = values.shape[0]
    n_full = m // chunk
    parts = []
    if n_full:
        parts.append(reduce(values[: n_full * chunk].reshape(n_full, chunk), axis=1))
    if m > n_full * chunk:
        parts.append(reduce(values[n_full * chunk :].reshape(1, -1), axis=1))
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def chunk_absmax(values: np.ndarray, chunk: int) -> np.ndarray:
    """Per-element absmax of the chunk each value falls in (what the error bounds depend on)."""
    per_chunk = chunk_reduce(np.abs(values), chunk, np.max)
    return np.repeat(per_chunk, chunk)[: values.shape[0]]


def scale_per_chunk(
    codes: np.ndarray, scales: np.ndarray, chunk: int, op: np.ufunc = np.multiply
) -> np.ndarray:
    """op(codes[i], scales[i // chunk]) as float32, without materialising repeated scales."""
    m = codes.shape[0]
    out = np.empty(m, dtype=np.float32)
    n_full = m // chunk
    if n_full:
        op(
            codes[: n_full * chunk].reshape(n_full, chunk),
            scales[:n_full, None],
            out=out[: n_full * chunk].reshape(n_full, chunk),
            dtype=np.float32,
        )
    if m > n_full * chunk:
        op(codes[n_full * chunk :], scales[n_full], out=out[n_full * chunk :], dtype=np.float32)
    return out


def quantize(
    values: np.ndarray, bits: int, *, stochastic: bool, chunk: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float32 `values` (m,) to (scales float32 (ceil(m/chunk),), codes int8 (m,))."""
    magnitudes = np.abs(values)
    if bits == 1 and not stochastic:
        scales = chunk_reduce(magnitudes, chunk, np.mean)
        codes = np.where(values >= 0, 1, -1).astype(np.int8)
        return scales, codes
    levels = LEVELS[bits]
    scales = (chunk_reduce(magnitudes, chunk, np.max) / np.float32(levels)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    # v / s in units of one level; a division, not a reciprocal product, so a subnormal scale
    # cannot overflow.
    x = scale_per_chunk(values, safe, chunk, np.divide)
    if bits == 1:  # stochastic sign: P(+1) = (1 + v/a) / 2, E[q·a] = v
        u = rng.random(values.shape[0], dtype=np.float32)
        codes = np.where(u < (1.0 + x) * 0.5, 1, -1).astype(np.int8)
        return scales, codes
    if stochastic:
        x += rng.random(values.shape[0], dtype=np.float32)
        np.floor(x, out=x)
    else:
        np.rint(x, out=x)
    np.clip(x, -levels, levels, out=x)
    return scales, x.astype(np.int8)


def dequantize(scales: np.ndarray, codes: np.ndarray, chunk: int) -> np.ndarray:
    """Inverse of `quantize` (the same function on both sides, so encoder and decoder agree)."""
    return scale_per_chunk(codes, scales, chunk)


def packed_code_bytes(bits: int, count: int) -> int:
    """Bytes taken by `count` packed integer codes of `bits` bits."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack int8 codes into bytes: 8 bits two's complement, 4 bits as q+8 (two per byte, first
    value in the high nibble), 2 bits as q+1 (four per byte), 1 bit as (q > 0) (eight per
    byte). Unused low bits of the last byte are zero."""
    if bits == 8:
        return codes.view(np.uint8)
    if bits == 1:
        return np.packbits(codes > 0)
    per_byte = 8 // bits
    offset = 8 if bits == 4 else 1
    m = codes.shape[0]
    padded = np.zeros(-(-m // per_byte) * per_byte, dtype=np.uint8)
    padded[:m] = (codes + offset).astype(np.uint8)
    grid = padded.reshape(-1, per_byte)
    out = np.zeros(grid.shape[0], dtype=np.uint8)
    for j in range(per_byte):  # loop over slots within a byte, not over elements
        out |= grid[:, j] << np.uint8(8 - bits * (j + 1))
    return out


def unpack_codes(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`, rejecting codes the encoder never writes and non-zero padding.

    Raises:
        PayloadError: "value-code" for -128 (8 bit), -8 (4 bit) or 3 (2 bit) codes,
            "padding" for non-zero unused bits.
    """
    if bits == 8:
        codes = buf.view(np.int8)
        if codes.size and codes.min() == -128:
            raise PayloadError("value-code", "8-bit code -128 is outside the symmetric range")
        return codes
    if bits == 1:
        flags = np.unpackbits(buf)
        if flags[count:].any():
            raise PayloadError("padding", "non-zero padding bits after the 1-bit codes")
        return (flags[:count].astype(np.int8) << 1) - 1
    per_byte = 8 // bits
    offset = 8 if bits == 4 else 1
    mask = np.uint8((1 << bits) - 1)
    grid = np.empty((buf.shape[0], per_byte), dtype=np.uint8)
    for j in range(per_byte):
        np.bitwise_and(buf >> np.uint8(8 - bits * (j + 1)), mask, out=grid[:, j])
    flat = grid.reshape(-1)
    if flat[count:].any():
        raise PayloadError("padding", f"non-zero padding after the {bits}-bit codes")
    raw = flat[:count]
    bad = raw == 0 if bits == 4 else raw == 3
    if bad.any():
        raise PayloadError("value-code", f"invalid {bits}-bit code at value {int(bad.argmax())}")
    return raw.astype(np.int8) - np.int8(offset)


def error_bound(
    spec: CompressionSpec, chunk_absmax: np.ndarray | float, values: np.ndarray | None = None
) -> np.ndarray:
    """Largest |decoded - value| the value coding of `spec` allows, element-wise.

    Args:
        spec: the spec whose `bits` / `stochastic` choose the bound (table in the module doc).
        chunk_absmax: absmax of the chunk each value falls in (`chunk_absmax(values, chunk)`).
        values: the original kept values; needed for bits=16, whose error is relative.

    Dense-below tensors are coded as float16 whatever `spec.bits` is (float32 when bits=32):
    use the bits=16 (or 32) spec for them.
    """
    a = np.asarray(chunk_absmax, dtype=np.float64)
    if spec.bits == 32:
        return np.zeros_like(a)
    if spec.bits == 16:
        if values is None:
            raise ValueError("error_bound(bits=16) needs `values`: the float16 error is relative")
        return np.maximum(np.abs(np.asarray(values, dtype=np.float64)) * 2.0**-11, 2.0**-25)
    if spec.bits in (8, 4):
        step = a / LEVELS[spec.bits]
        bound = step if spec.stochastic else step / 2
    elif spec.bits == 2:
        bound = a if spec.stochastic else a / 2
    else:
        bound = 2 * a if spec.stochastic else a
    return bound + a * _SLACK + _ABS_SLACK
