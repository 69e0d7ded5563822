"""Where the kept values sit: the cheaper of a bitmap and a Rice code of the gaps, per tensor.

For a tensor of n elements with c kept at density p = c/n, positions are coded one of four ways:

* ``ALL``   (c == n): nothing; 0 bits.
* ``EMPTY`` (c == 0): nothing; 0 bits.
* ``BITMAP``: n bits, one per element, i.e. **1/p bits per kept value**; cheaper than RICE
  from p ~ 0.4 up.
* ``RICE``: the gaps g_i = idx_i - idx_{i-1} - 1 (idx_{-1} = -1) are Golomb-Rice coded with
  parameter k (stored in the record): the quotient g >> k in unary (that many 0s, then a 1) in
  one bit stream, and the remainder's k low bits in a second, fixed-width stream. For kept
  positions spread at random (gaps ~ Geometric(p), q = 1 - p, M = 2^k) the expected cost is::

      bits per kept value = k + 1 + q^M / (1 - q^M)               (`rice_bits_per_value`)
                          ~ log2(1/p) + 1.5   (within 0.3 bits for p <= 0.1)

  e.g. 4.76 at p = 0.1, 8.11 at p = 0.01, 11.50 at p = 0.001, versus the entropy bound
  H(p)/p = 4.69 / 8.08 / 11.41: Rice sits within 0.1 bit of optimal at these densities. The
  encoder picks the k minimising the *measured* cost of the actual gaps (every k from 0 to just
  past log2(ln 2 · mean gap)), so clustered positions cost less than this formula.

The encoder computes both sizes exactly and writes the smaller (ties go to the bitmap). Gap
coding cannot express an unsorted or duplicated position, so the decoder's checks reduce to:
every count and length matches the bytes present, the last position is < n, padding is zero.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import PayloadError

POS_ALL = 0
POS_EMPTY = 1
POS_BITMAP = 2
POS_RICE = 3
POSITION_CODES: tuple[int, ...] = (POS_ALL, POS_EMPTY, POS_BITMAP, POS_RICE)
MAX_RICE_K = 62  # quotient << k must stay inside int64


def bitmap_bits_per_value(p: float) -> float:
    """Bitmap cost per kept value at density p: n bits for p·n values."""
    return 1.0 / p


def rice_bits_per_value(p: float) -> float:
    """Expected Rice cost per kept value at density p with the best k (module docstring)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"density p={p!r} is not allowed; use 0 < p <= 1")
    if p == 1.0:
        return 1.0
    q = 1.0 - p
    best = math.inf
    for k in range(MAX_RICE_K + 1):
        q_m = q ** (2**k)
        best = min(best, k + 1 + q_m / (1.0 - q_m))
        if q_m == 0.0:
            break
    return best


def _rice_cost_bits(gaps: np.ndarray, k: int) -> int:
    return int(gaps.shape[0]) * (k + 1) + int(np.sum(gaps >> k))


def _best_rice_k(gaps: np.ndarray, numel: int) -> int:
    count = gaps.shape[0]
    mean_gap = (numel - count) / count
    guess = max(0, round(math.log2(max(mean_gap * math.log(2), 1.0))))
    k_max = min(MAX_RICE_K, max(numel.bit_length(), 1))
    # Every k up to just past the geometric guess: clustered positions can want a much smaller
    # k than the mean gap suggests, and each candidate is one vectorised pass over the gaps.
    candidates = range(0, min(k_max, guess + 2) + 1)
    return min(candidates, key=lambda k: _rice_cost_bits(gaps, k))


def encode_positions(indices: np.ndarray | None, numel: int) -> tuple[int, int, np.ndarray]:
    """Code sorted unique int64 `indices` (None = every position) of an n-element tensor.

    Returns:
        (position code, Rice parameter k (0 unless RICE), section bytes as uint8).
    """
    empty = np.zeros(0, dtype=np.uint8)
    count = numel if indices is None else int(indices.shape[0])
    if count == numel:
        return POS_ALL, 0, empty
    if count == 0:
        return POS_EMPTY, 0, empty
    assert indices is not None
    gaps = np.diff(indices, prepend=np.int64(-1)) - 1
    k = _best_rice_k(gaps, numel)
    unary_bits = count + int(np.sum(gaps >> k))
    rice_bytes = (count * k + 7) // 8 + (unary_bits + 7) // 8
    bitmap_bytes = (numel + 7) // 8
    if bitmap_bytes <= rice_bytes:
        mask = np.zeros(numel, dtype=bool)
        mask[indices] = True
        return POS_BITMAP, 0, np.packbits(mask)
    return POS_RICE, k, np.concatenate([_pack_fixed(gaps, k), _pack_unary(gaps >> k)])


def _pack_fixed(gaps: np.ndarray, k: int) -> np.ndarray:
    """Low k bits of each gap, most significant first, concatenated and zero padded."""
    if k == 0:
        return np.zeros(0, dtype=np.uint8)
    bits = np.empty((gaps.shape[0], k), dtype=np.uint8)
    for j in range(k):  # loop over bit planes, not over elements
        bits[:, j] = (gaps >> (k - 1 - j)) & 1
    return np.packbits(bits.reshape(-1))


def _pack_unary(quotients: np.ndarray) -> np.ndarray:
    """Each quotient q as q zero bits then a one bit, concatenated and zero padded."""
    ends = np.cumsum(quotients + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, dtype=bool)
    bits[ends] = True
    return np.packbits(bits)


def rice_section_bounds(count: int, numel: int, k: int) -> tuple[int, int]:
    """(fixed-width bytes, most unary bytes) a valid RICE section of `count` positions can take.

    sum(g >> k) <= sum(g) >> k <= (numel - count) >> k bounds the unary stream by the schema,
    so a hostile length can be refused before anything is unpacked.
    """
    return (count * k + 7) // 8, (count + ((numel - count) >> k) + 7) // 8


def decode_positions(
    code: int, k: int, section: np.ndarray, count: int, numel: int
) -> np.ndarray | None:
    """Validate and decode a position section into a selector for `out[selector] = values`.

    Returns None for ALL, a bool mask of length numel for BITMAP, sorted int64 indices for RICE
    or EMPTY. The caller has already checked 0 <= count <= numel and that `section` is exactly
    the bytes the record declared (no more is read).

    Raises:
        PayloadError: on any inconsistency ("count", "positions", "padding", "index-range",
            "rice-param", "mode").
    """
    if code == POS_ALL:
        if count != numel or section.shape[0]:
            raise PayloadError("count", f"ALL positions need count == {numel} and no bytes")
        return None
    if code == POS_EMPTY:
        if count != 0 or section.shape[0]:
            raise PayloadError("count", "EMPTY positions need count == 0 and no bytes")
        return np.zeros(0, dtype=np.int64)
    if count == 0 or count == numel:
        raise PayloadError("count", f"count {count} of {numel} must use ALL/EMPTY positions")
    if code == POS_BITMAP:
        if section.shape[0] != (numel + 7) // 8:
            raise PayloadError("positions", f"bitmap of {section.shape[0]} bytes for {numel}")
        bits = np.unpackbits(section)
        if bits[numel:].any():
            raise PayloadError("padding", "non-zero padding bits after the bitmap")
        mask = bits[:numel].view(bool)
        if int(np.count_nonzero(mask)) != count:
            raise PayloadError("count", f"bitmap marks {np.count_nonzero(mask)} != {count}")
        return mask
    if code != POS_RICE:
        raise PayloadError("mode", f"unknown position code {code}")
    if k > min(MAX_RICE_K, max(numel.bit_length(), 1)):
        raise PayloadError("rice-param", f"Rice parameter {k} too large for {numel} elements")
    if section.shape[0] >= (numel + 7) // 8:
        # The encoder only writes RICE when it beats the bitmap; refusing bigger sections also
        # keeps the bit unpacking below numel bytes whatever count and k claim.
        raise PayloadError("positions", f"Rice section not smaller than the {numel}-bit bitmap")
    fixed_bytes, unary_max = rice_section_bounds(count, numel, k)
    unary_bytes = section.shape[0] - fixed_bytes
    if unary_bytes < (count + 7) // 8 or unary_bytes > unary_max:
        raise PayloadError(
            "positions",
            f"Rice section of {section.shape[0]} bytes impossible for {count} of {numel}",
        )
    remainders = _unpack_fixed(section[:fixed_bytes], count, k)
    unary = np.unpackbits(section[fixed_bytes:]).view(bool)
    ends = np.flatnonzero(unary)
    if ends.shape[0] != count:
        raise PayloadError("positions", f"Rice stream holds {ends.shape[0]} codes, not {count}")
    if unary.shape[0] - int(ends[-1]) - 1 >= 8:
        raise PayloadError("padding", "whole padding bytes after the Rice stream")
    quotients = np.diff(ends, prepend=np.int64(-1)) - 1
    if int(quotients.max()) > (numel >> k):
        raise PayloadError("index-range", "a Rice gap reaches past the tensor")
    gaps = (quotients << k) | remainders
    # Each gap is < 2·numel and there are < numel of them; check the float sum before an int64
    # cumsum could wrap for huge tensors.
    if float(np.sum(gaps, dtype=np.float64)) + count > numel:
        raise PayloadError("index-range", f"positions run past the end of {numel} elements")
    indices = np.cumsum(gaps + 1) - 1
    if int(indices[-1]) >= numel:
        raise PayloadError("index-range", f"last position {indices[-1]} >= {numel}")
    return indices


def _unpack_fixed(buf: np.ndarray, count: int, k: int) -> np.ndarray:
    if k == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(buf)
    if bits[count * k :].any():
        raise PayloadError("padding", "non-zero padding after the Rice remainders")
    planes = bits[: count * k].reshape(count, k)
    out = np.zeros(count, dtype=np.int64)
    for j in range(k):  # loop over bit planes, not over elements
        out <<= 1
        out |= planes[:, j]
    return out
