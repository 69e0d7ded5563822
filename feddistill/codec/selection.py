"""Which elements to keep: exact top-k without sorting the whole tensor, and thresholding.

Top-k follows the sampled top-k of Deep Gradient Compression (Lin et al. 2018, arXiv:1712.01887):
estimate the magnitude threshold from a random sample of |x|, take the elements above it as
candidates, and run the exact selection only on the candidates. To make the result *exact* (not
approximate), the sample threshold sits z = 4 binomial standard deviations below the estimated
k-th magnitude, so the candidates hold all k largest with probability ~1 - 3e-5; when they do not,
the threshold is lowered once (4x the sample rank) and then we fall back to the exact
selection over the whole tensor. The sample holds s = max(8192, 256/p) magnitudes (p = k/n), so
candidates are typically k·(1 + 4/sqrt(s·p)) ~ 1.25 k elements and the exact part is cheap.
Tensors below 65536 elements, or where s would exceed n/8, are selected exactly outright.

Tolerance: **exactly k = max(1, round(keep·n)) elements are kept, and they are a true top-k**
(every kept |x| >= every dropped |x|; ties at the k-th magnitude go to the lower index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

EXACT_BELOW = 1 << 16  # tensors this small are selected exactly: sampling would not pay
_Z = 4.0  # binomial standard deviations of margin below the sample quantile
_MIN_SAMPLE = 8192
_SAMPLE_ABOVE = 256  # sample elements expected above the threshold (sets the sample size)
_BLOCK = 1 << 18  # elements per block when scanning for candidates (1 MB of float32)


def kept_count(numel: int, keep: float) -> int:
    """k = max(1, round(keep · numel)) for non-empty tensors (0 for empty ones)."""
    if numel == 0:
        return 0
    return min(numel, max(1, round(keep * numel)))


def threshold_indices(flat: np.ndarray, eps: float) -> np.ndarray | None:
    """Sorted indices with |x| >= eps (compared in float32), or None when that is all of them."""
    if eps <= 0:
        return None
    indices = _indices_at_least(flat, np.float32(eps))
    return None if indices.shape[0] == flat.shape[0] else indices


def _indices_at_least(flat: np.ndarray, threshold: np.floating) -> np.ndarray:
    """np.flatnonzero(|flat| >= threshold), a cache-sized block at a time.

    Never materialises the n magnitudes or an n-element mask: on a 10M-element tensor that
    saves 50 MB of fresh pages, and first-touch page faults dominate the time otherwise.
    """
    n = flat.shape[0]
    if n <= _BLOCK:
        return np.flatnonzero(np.abs(flat) >= threshold)
    magnitudes = np.empty(_BLOCK, dtype=np.float32)
    mask = np.empty(_BLOCK, dtype=bool)
    parts = [np.zeros(0, dtype=np.int64)]
    for start in range(0, n, _BLOCK):  # loop over blocks, not over elements
        block = flat[start : start + _BLOCK]
        m = block.shape[0]
        np.abs(block, out=magnitudes[:m])
        np.greater_equal(magnitudes[:m], threshold, out=mask[:m])
        hits = np.flatnonzero(mask[:m])
        if hits.shape[0]:
            parts.append(hits + start)
    return np.concatenate(parts)


def topk_indices(flat: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of the k largest |x| of a 1-D float32 array (None when k >= n)."""
    (selected,) = global_topk_indices([flat], k, rng)
    return selected


def global_topk_indices(
    flats: Sequence[np.ndarray], k: int, rng: np.random.Generator
) -> list[np.ndarray | None]:
    """The k largest |x| across several 1-D float32 arrays, as sorted indices per array.

    None for an array whose every element is kept. Exact; see the module docstring for how the
    sampled threshold keeps it fast.
    """
    sizes = np.array([f.shape[0] for f in flats], dtype=np.int64)
    total = int(sizes.sum())
    if k >= total:
        return [None] * len(flats)
    if k <= 0:
        return [np.zeros(0, dtype=np.int64) for _ in flats]
    p = k / total
    sample_size = max(_MIN_SAMPLE, math.ceil(_SAMPLE_ABOVE / p))
    if total < EXACT_BELOW or sample_size * 8 > total:
        return split_indices([f.shape[0] for f in flats], _exact(flats, k))
    # Uniform sample over all elements: how many land in each array, then where (no sort).
    per_array = rng.multinomial(sample_size, sizes / total)
    sample = np.concatenate(
        [
            np.abs(flat[rng.integers(0, flat.shape[0], size=m)])
            for flat, m in zip(flats, per_array, strict=True)
            if m
        ]
    )
    rank = math.ceil(sample_size * p + _Z * math.sqrt(sample_size * p * (1 - p))) + 1
    ranks = [r for r in (rank, 4 * rank) if 0 < r < sample_size]
    sample = np.partition(sample, [sample_size - r for r in ranks[::-1]]) if ranks else sample
    for attempt_rank in ranks:
        threshold = sample[sample_size - attempt_rank]
        cand = [_indices_at_least(f, threshold) for f in flats]
        if sum(c.shape[0] for c in cand) < k:
            continue
        magnitudes = np.concatenate([np.abs(f[c]) for f, c in zip(flats, cand, strict=True)])
        keep = _top_k_mask(magnitudes, k)
        bounds = np.cumsum([0] + [c.shape[0] for c in cand])
        out: list[np.ndarray | None] = []
        for c, lo, hi, n in zip(cand, bounds[:-1], bounds[1:], sizes, strict=True):
            chosen = c[keep[lo:hi]]
            out.append(None if chosen.shape[0] == n else chosen)
        return out
    return split_indices([f.shape[0] for f in flats], _exact(flats, k))


def _top_k_mask(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k largest entries; ties at the k-th value go to the earliest entries.

    np.partition finds the k-th value in O(n) (a copy of the values, no index array); the mask
    keeps the input order, so sorted candidate indices stay sorted without an argsort.
    """
    n = magnitudes.shape[0]
    kth = np.partition(magnitudes, n - k)[n - k]
    mask = magnitudes > kth
    need = k - int(np.count_nonzero(mask))
    if need:
        ties = np.flatnonzero(magnitudes == kth)[:need]
        mask[ties] = True
    return mask


def _exact(flats: Sequence[np.ndarray], k: int) -> np.ndarray:
    magnitudes = np.abs(np.concatenate(flats)) if len(flats) > 1 else np.abs(flats[0])
    return np.flatnonzero(_top_k_mask(magnitudes, k))


def split_indices(numels: Sequence[int], indices: np.ndarray) -> list[np.ndarray | None]:
    """Sorted indices into the concatenation of arrays of ``numels`` elements, split back into
    per-array indices (None where an array keeps every element)."""
    out: list[np.ndarray | None] = []
    start = lo = 0
    for n in numels:
        hi = int(np.searchsorted(indices, start + n))
        part = indices[lo:hi] - start
        out.append(None if part.shape[0] == n else part)
        start, lo = start + n, hi
    return out
