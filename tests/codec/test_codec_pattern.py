"""The shared pattern: every client of a round keeps the same coordinates, whatever its values."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from feddistill.codec import (
    decode,
    encode,
    parse_spec,
    pattern_units,
    round_pattern_seed,
    schema_of,
)


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(200, 64)).astype(np.float32),
        "b": rng.normal(size=64).astype(np.float32),
        "v": rng.normal(size=3000).astype(np.float32),
    }


@pytest.mark.parametrize("text", ["pattern:0.1+q4+ef", "pattern:0.05+block:16+q4+dense:100"])
def test_clients_of_a_round_keep_the_same_coordinates_and_decode_without_the_seed(
    text: str,
) -> None:
    spec = parse_spec(text)
    seed = round_pattern_seed(run_seed=0, server_round=4)

    a = encode(_update(1), spec, seed=1, pattern_seed=seed)
    b = encode({n: -100 * x for n, x in _update(2).items()}, spec, seed=2, pattern_seed=seed)

    for name in a.positions:
        if a.positions[name] is None:
            assert b.positions[name] is None
        else:
            np.testing.assert_array_equal(a.positions[name], b.positions[name])
    decoded = decode(a.payload, schema_of(_update(1)))  # positions travel: no seed needed
    for name, array in decoded.items():
        np.testing.assert_array_equal(array, a.decoded[name])
    kept = a.positions["w"]
    assert kept is not None
    assert abs(kept.shape[0] - spec.keep * 200 * 64) <= spec.block  # the fraction, per tensor


def test_the_pattern_changes_with_the_round_and_the_run() -> None:
    spec = parse_spec("pattern:0.1+q4")
    update = _update(0)

    def kept(run: int, rnd: int) -> np.ndarray:
        positions = encode(update, spec, pattern_seed=round_pattern_seed(run, rnd)).positions
        assert positions["v"] is not None
        return positions["v"]

    assert np.array_equal(kept(0, 1), kept(0, 1))
    assert not np.array_equal(kept(0, 1), kept(0, 2))
    assert not np.array_equal(kept(0, 1), kept(1, 1))
    # Over rounds every coordinate comes up: what error feedback relies on.
    seen = np.zeros(3000, dtype=bool)
    for rnd in range(1, 61):
        seen[kept(0, rnd)] = True
    assert seen.mean() > 0.99


def test_pattern_units_never_look_at_the_values_and_respect_tensor_bounds() -> None:
    units = pattern_units([10, 1000, 33], block=4, keep=0.25, pattern_seed=9)

    assert units is not None
    bounds = np.cumsum([0, 3, 250, 9])  # units per tensor at block 4
    per_tensor = [int(((units >= lo) & (units < hi)).sum()) for lo, hi in pairwise(bounds)]
    assert per_tensor == [1, 62, 2]  # round(0.25 * units), at least 1
    assert np.all(np.diff(units) > 0)
    assert pattern_units([8], block=1, keep=1.0, pattern_seed=9) is None  # every unit: ALL


def test_a_pattern_needs_its_seed_and_only_a_pattern_takes_one() -> None:
    with pytest.raises(ValueError, match="pattern_seed"):
        encode(_update(0), parse_spec("pattern:0.1"))
    with pytest.raises(ValueError, match="pattern_seed"):
        encode(_update(0), parse_spec("topk:0.1"), pattern_seed=3)
