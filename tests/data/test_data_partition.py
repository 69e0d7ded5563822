"""Tests for client partitioning (iid / dirichlet / shards), splits and histograms."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddistill.data import (
    DataError,
    label_histogram,
    partition_indices,
    train_val_split,
)
from feddistill.data import partition as partition_module


def _labels(num_examples: int, num_classes: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=num_examples)


def _assert_disjoint_and_covering(parts: list[np.ndarray], num_examples: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == num_examples
    assert np.array_equal(np.sort(joined), np.arange(num_examples))


def _assert_sorted_int64(parts: list[np.ndarray]) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


def test_iid_sizes_differ_by_at_most_one_and_cover_everything():
    labels = _labels(1003)

    parts = partition_indices(labels, num_partitions=10, scheme="iid", seed=1)

    assert len(parts) == 10
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    _assert_disjoint_and_covering(parts, 1003)
    _assert_sorted_int64(parts)


def test_iid_shuffles_label_sorted_data():
    # A label-sorted file: without the shuffle, IidPartitioner would give one class per client.
    labels = np.repeat(np.arange(4), 100)

    parts = partition_indices(labels, num_partitions=4, scheme="iid", seed=0)

    for part in parts:
        assert len(np.unique(labels[part])) == 4


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_same_seed_same_partitions_other_seed_differs(scheme):
    labels = _labels(600)

    first = partition_indices(labels, num_partitions=6, scheme=scheme, seed=3)
    second = partition_indices(labels, num_partitions=6, scheme=scheme, seed=3)
    other = partition_indices(labels, num_partitions=6, scheme=scheme, seed=4)

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_covers_everything_and_respects_min_partition_size():
    labels = _labels(2000)

    parts = partition_indices(
        labels, num_partitions=20, scheme="dirichlet", alpha=0.3, min_partition_size=10, seed=0
    )

    _assert_disjoint_and_covering(parts, 2000)
    _assert_sorted_int64(parts)
    assert min(p.size for p in parts) >= 10


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    labels = _labels(4000)

    def mean_dominant_share(alpha: float) -> float:
        parts = partition_indices(labels, num_partitions=10, scheme="dirichlet", alpha=alpha)
        return float(np.mean([max(label_histogram(labels, p, 4)) / p.size for p in parts]))

    skewed, balanced = mean_dominant_share(0.1), mean_dominant_share(100.0)

    assert skewed > 0.6
    assert balanced < 0.35
    assert skewed > balanced + 0.3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_gives_exactly_k_classes_per_client(k):
    labels = _labels(1200)

    parts = partition_indices(labels, num_partitions=8, scheme="shards", shards_per_client=k)

    assert [len(np.unique(labels[p])) for p in parts] == [k] * 8
    joined = np.concatenate(parts)
    assert joined.size == np.unique(joined).size  # disjoint
    _assert_sorted_int64(parts)


def test_shards_with_enough_clients_uses_every_class():
    labels = _labels(800)

    parts = partition_indices(labels, num_partitions=4, scheme="shards", shards_per_client=2)

    _assert_disjoint_and_covering(parts, 800)


def test_shards_warns_about_classes_on_no_client():
    labels = _labels(400)

    with pytest.warns(UserWarning, match=r"classes \[2, 3\] are on no client"):
        parts = partition_indices(labels, num_partitions=2, scheme="shards", shards_per_client=1)

    assert sorted(int(np.unique(labels[p])[0]) for p in parts) == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "pathological"}, r"data.partitioning='pathological'.*'iid', 'dirichlet'"),
        ({"num_partitions": 0}, r"data.num-clients must be at least 1, got 0"),
        ({"num_partitions": 101}, r"data.num-clients=101 is more than the 100 examples"),
        ({"num_partitions": 51}, r"data.num-clients=51 .*at most 50 clients"),
        ({"num_partitions": 20, "min_partition_size": 6}, r"data.num-clients=20 .*at most 16"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"data.alpha must be a finite number > 0, got 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, r"data.alpha .*got -1"),
        ({"scheme": "dirichlet", "alpha": float("inf")}, r"data.alpha .*got inf"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, r"data.alpha .*got nan"),
        ({"scheme": "shards", "shards_per_client": 0}, r"data.shards-per-client=0 .*\(4\)"),
        ({"scheme": "shards", "shards_per_client": 5}, r"data.shards-per-client=5 .*\(4\)"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"min_partition_size": -1}, "min_partition_size must be >= 0"),
    ],
)
def test_invalid_settings_raise_data_error_naming_the_option(kwargs, match):
    labels = np.arange(100) % 4

    with pytest.raises(DataError, match=match):
        partition_indices(labels, **{"num_partitions": 5, "scheme": "iid", **kwargs})


@pytest.mark.parametrize(
    ("labels", "match"),
    [([], "labels is empty"), ([0.5, 1.0], "integer class labels"), ([[0, 1]], "1-D")],
)
def test_invalid_labels_raise(labels, match):
    with pytest.raises(DataError, match=match):
        partition_indices(labels, num_partitions=1, scheme="iid")


def test_hopeless_dirichlet_setting_fails_fast_with_data_error():
    # 50 clients of at least 4 examples from 200: some client almost surely gets fewer.
    labels = _labels(200)

    start = time.perf_counter()
    with pytest.raises(DataError, match=r"data.alpha=0.05 with data.num-clients=50 .*draws"):
        partition_indices(
            labels, num_partitions=50, scheme="dirichlet", alpha=0.05, min_partition_size=4
        )

    assert time.perf_counter() - start < 10


def test_impossible_shards_setting_raises_data_error():
    # Class 3 has a single example but would have to be split across several clients.
    labels = np.array([0] * 30 + [1] * 30 + [2] * 30 + [3])

    with pytest.raises(DataError, match=r"data.num-clients=40 with data.shards-per-client=4"):
        partition_indices(
            labels, num_partitions=40, scheme="shards", shards_per_client=4, min_partition_size=1
        )


def test_shards_client_below_min_partition_size_raises():
    # Class 3 has two examples; the client that gets one of them and nothing else is too small.
    labels = np.array([0] * 40 + [1] * 40 + [2] * 40 + [3] * 2)

    with pytest.raises(DataError, match=r"leaves a client with 1 examples"):
        partition_indices(
            labels, num_partitions=8, scheme="shards", shards_per_client=1, min_partition_size=2
        )


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_fast_path_matches_reading_every_partition_through_load_partition(scheme, monkeypatch):
    labels = _labels(500)
    kwargs = {"num_partitions": 7, "scheme": scheme, "alpha": 0.5, "seed": 2}
    fast = partition_indices(labels, **kwargs)

    # Execute: disable the fast assignment so every client is read with load_partition.
    monkeypatch.setattr(partition_module, "_fast_assignment", lambda partitioner: None)
    slow = partition_indices(labels, **kwargs)

    assert all(np.array_equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_iid_scales_to_5000_clients():
    labels = _labels(50_000)

    start = time.perf_counter()
    parts = partition_indices(labels, num_partitions=5000, scheme="iid")
    elapsed = time.perf_counter() - start

    assert len(parts) == 5000
    assert {p.size for p in parts} == {10}
    _assert_disjoint_and_covering(parts, 50_000)
    assert elapsed < 15  # about 0.1 s on an idle machine; generous for loaded CI


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_examples=st.integers(min_value=1, max_value=300),
    num_partitions=st.integers(min_value=1, max_value=30),
    num_classes=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_iid_and_dirichlet_always_partition_exactly(
    num_examples, num_partitions, num_classes, seed
):
    labels = _labels(num_examples, num_classes, seed)
    num_partitions = min(num_partitions, num_examples)

    for scheme in ("iid", "dirichlet"):
        try:
            parts = partition_indices(
                labels,
                num_partitions=num_partitions,
                scheme=scheme,
                alpha=1.0,
                seed=seed,
                min_partition_size=0,
            )
        except DataError:
            continue  # a DataError is an allowed answer; anything else is a bug
        assert len(parts) == num_partitions
        _assert_disjoint_and_covering(parts, num_examples)


def test_train_val_split_is_disjoint_deterministic_and_order_independent():
    indices = np.arange(100, 200)

    train, val = train_val_split(indices, val_fraction=0.2, seed=1)
    again = train_val_split(indices[::-1], val_fraction=0.2, seed=1)

    assert (train.size, val.size) == (80, 20)
    assert np.array_equal(np.sort(np.concatenate([train, val])), indices)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, train_val_split(indices, val_fraction=0.2, seed=2)[1])


@pytest.mark.parametrize(
    ("size", "fraction", "expected"),
    [(1, 0.5, (1, 0)), (2, 0.5, (1, 1)), (3, 0.1, (3, 0)), (10, 0.3, (7, 3)), (5, 0.99, (1, 4))],
)
def test_train_val_split_keeps_a_training_example(size, fraction, expected):
    train, val = train_val_split(np.arange(size), val_fraction=fraction, seed=0)

    assert (train.size, val.size) == expected


@pytest.mark.parametrize(
    ("indices", "kwargs", "match"),
    [
        (np.arange(5), {"val_fraction": 1.0}, r"data.val-fraction must be in \[0, 1\)"),
        (np.arange(5), {"val_fraction": -0.1}, "data.val-fraction"),
        (np.array([], dtype=np.int64), {"val_fraction": 0.1}, "non-empty"),
        (np.arange(5), {"val_fraction": 0.1, "seed": -3}, "seed"),
    ],
)
def test_train_val_split_errors(indices, kwargs, match):
    with pytest.raises(DataError, match=match):
        train_val_split(indices, **{"seed": 0, **kwargs})


def test_label_histogram_counts_the_selected_examples():
    labels = [0, 1, 1, 2, 2, 2]

    assert label_histogram(labels, np.array([1, 3, 4, 5]), 4) == [0, 1, 3, 0]
    assert label_histogram(labels, np.array([], dtype=np.int64), 3) == [0, 0, 0]
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        label_histogram(labels, np.arange(6), 2)
