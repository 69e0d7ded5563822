"""Top-k selection: exactly k, a true top-k, on large arrays, with ties and in the fallback."""

from __future__ import annotations

import numpy as np
import pytest

from feddistill.codec import selection
from feddistill.codec.selection import (
    global_topk_indices,
    kept_count,
    threshold_indices,
    topk_indices,
)


def assert_true_topk(x: np.ndarray, indices: np.ndarray, k: int) -> None:
    assert indices.shape[0] == k
    assert np.all(np.diff(indices) > 0)
    dropped = np.ones(x.shape[0], dtype=bool)
    dropped[indices] = False
    assert np.abs(x[indices]).min() >= np.abs(x[dropped]).max()


@pytest.mark.parametrize("keep", [0.1, 0.01, 0.001])
def test_topk_on_two_million_elements_is_exact(keep: float) -> None:
    x = (np.random.default_rng(0).standard_t(3, size=2_000_000) * 1e-3).astype(np.float32)
    k = kept_count(x.shape[0], keep)

    got = topk_indices(x, k, np.random.default_rng(1))

    assert got is not None
    assert_true_topk(x, got, k)
    reference = np.sort(np.argpartition(np.abs(x), x.shape[0] - k)[x.shape[0] - k :])
    assert np.array_equal(got, reference)  # continuous values: the top-k set is unique


def test_topk_with_heavy_ties_keeps_exactly_k_lowest_index_first() -> None:
    x = np.random.default_rng(2).integers(-3, 4, size=1_000_000).astype(np.float32)
    k = 123_457

    got = topk_indices(x, k, np.random.default_rng(0))

    assert got is not None
    assert_true_topk(x, got, k)
    # ties at the k-th magnitude (3.0 here is the k-th) go to the lowest indices
    threes = np.flatnonzero(np.abs(x) == 3.0)
    assert np.array_equal(got, threes[:k])


@pytest.mark.parametrize("z", [-3.0, -15.0])
def test_fallback_when_sample_threshold_misses(monkeypatch: pytest.MonkeyPatch, z: float) -> None:
    # A margin on the wrong side makes the first sampled threshold too high (z = -3: the
    # retry at 4x the rank succeeds) or both too high (z = -15: the exact fallback runs); the
    # result must not change.
    monkeypatch.setattr(selection, "_Z", z)
    x = np.random.default_rng(3).normal(size=500_000).astype(np.float32)
    k = 5_000

    got = topk_indices(x, k, np.random.default_rng(0))

    assert got is not None
    assert_true_topk(x, got, k)


def test_global_topk_across_tensors_is_exact() -> None:
    rng = np.random.default_rng(4)
    flats = [
        rng.normal(scale=s, size=n).astype(np.float32)
        for s, n in [(1.0, 600_000), (3.0, 300_000), (0.1, 200_000), (1.0, 7)]
    ]
    whole = np.concatenate(flats)
    k = kept_count(whole.shape[0], 0.01)

    parts = global_topk_indices(flats, k, np.random.default_rng(0))

    offsets = np.cumsum([0] + [f.shape[0] for f in flats[:-1]])
    joined = np.concatenate([p + o for p, o in zip(parts, offsets, strict=True)])
    assert_true_topk(whole, joined, k)
    assert parts[1].shape[0] > parts[0].shape[0] >= parts[2].shape[0]  # wider layers keep more


def test_small_and_degenerate_cases() -> None:
    rng = np.random.default_rng(0)
    assert kept_count(0, 0.5) == 0
    assert kept_count(10, 0.001) == 1
    assert kept_count(10, 1.0) == 10
    assert topk_indices(np.ones(5, dtype=np.float32), 5, rng) is None
    assert np.array_equal(topk_indices(np.zeros(4, dtype=np.float32), 2, rng), [0, 1])
    assert threshold_indices(np.ones(3, dtype=np.float32), 0.0) is None
    assert np.array_equal(threshold_indices(np.array([0.1, -2, 1], np.float32), 1.0), [1, 2])
