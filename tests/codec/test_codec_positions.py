"""Position coding: measured bits per kept value against the documented cost formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feddistill.codec import bitmap_bits_per_value, rice_bits_per_value
from feddistill.codec.positions import (
    POS_ALL,
    POS_BITMAP,
    POS_EMPTY,
    POS_RICE,
    decode_positions,
    encode_positions,
)

N = 2_000_000


@pytest.mark.parametrize("p", [0.001, 0.01, 0.05, 0.1])
def test_rice_cost_matches_documented_formula(p: float) -> None:
    # Prepare: kept positions spread at random with density p.
    indices = np.flatnonzero(np.random.default_rng(0).random(N) < p)
    density = indices.shape[0] / N

    # Execute
    code, k, section = encode_positions(indices, N)
    measured = 8 * section.shape[0] / indices.shape[0]

    # Assert: the exact expectation within ~5 standard errors of the per-value cost (its
    # variance is about 2 bits^2, over >= 2000 values), and the headline approximation.
    assert code == POS_RICE
    assert abs(measured - rice_bits_per_value(density)) < 5 * math.sqrt(2 / indices.shape[0])
    assert abs(measured - (math.log2(1 / density) + 1.5)) < 0.3
    assert np.array_equal(decode_positions(code, k, section, indices.shape[0], N), indices)


def test_bitmap_wins_at_high_density_and_costs_one_over_p() -> None:
    indices = np.flatnonzero(np.random.default_rng(1).random(N) < 0.5)

    code, k, section = encode_positions(indices, N)

    assert (code, k) == (POS_BITMAP, 0)
    assert section.shape[0] == N // 8
    measured = 8 * section.shape[0] / indices.shape[0]
    assert measured == pytest.approx(bitmap_bits_per_value(indices.shape[0] / N))
    mask = decode_positions(code, k, section, indices.shape[0], N)
    assert np.array_equal(np.flatnonzero(mask), indices)


def test_documented_numbers() -> None:
    assert rice_bits_per_value(0.1) == pytest.approx(4.76, abs=0.01)
    assert rice_bits_per_value(0.01) == pytest.approx(8.11, abs=0.01)
    assert rice_bits_per_value(0.001) == pytest.approx(11.50, abs=0.01)
    for p in np.geomspace(1e-6, 0.1, 30):
        assert abs(rice_bits_per_value(p) - (math.log2(1 / p) + 1.5)) < 0.3


def test_all_and_empty_cost_nothing() -> None:
    assert encode_positions(None, 10)[0] == POS_ALL
    assert encode_positions(np.arange(10), 10)[0] == POS_ALL
    code, _, section = encode_positions(np.zeros(0, dtype=np.int64), 10)
    assert code == POS_EMPTY and section.shape[0] == 0


def test_clustered_positions_cost_less_than_random() -> None:
    indices = np.arange(1000, 21000, dtype=np.int64)  # one block at 1 % density

    _, _, section = encode_positions(indices, N)

    assert 8 * section.shape[0] / indices.shape[0] < rice_bits_per_value(0.01) / 3
