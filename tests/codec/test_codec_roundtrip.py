"""decode(encode(x)): positions, error bounds, determinism and unbiased stochastic rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from feddistill.codec import (
    CompressionSpec,
    chunk_absmax,
    decode,
    dense_float32_bytes,
    encode,
    error_bound,
    schema_of,
)
from feddistill.codec.selection import kept_count

# Shapes include scalars, 1-element tensors and sizes that are not multiples of 8 or of chunk.
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=23)
values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
arrays = shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=values))


@st.composite
def specs(draw: st.DrawFn) -> CompressionSpec:
    select = draw(st.sampled_from(["none", "topk", "gtopk", "thresh"]))
    bits = draw(st.sampled_from([32, 16, 8, 4, 2, 1]))
    return CompressionSpec(
        select=select,
        keep=draw(st.floats(0.001, 1.0)) if select in ("topk", "gtopk") else 1.0,
        eps=draw(st.sampled_from([0.0, 1e-3, 0.5, 10.0, 1e4])) if select == "thresh" else 0.0,
        bits=bits,
        stochastic=bits <= 8 and draw(st.booleans()),
        chunk=draw(st.sampled_from([1, 3, 7, 64, 256])),
        dense_below=draw(st.sampled_from([0, 0, 5, 100])),
        block=draw(st.sampled_from([1, 1, 2, 5, 16])) if select in ("topk", "gtopk") else 1,
    )


def unit_scores(flat: np.ndarray, block: int) -> np.ndarray:
    """float64 sum of squares of each run of `block` elements (the codec ranks runs by it)."""
    padded = np.zeros(-(-flat.shape[0] // block) * block)
    padded[: flat.shape[0]] = flat
    return np.square(padded).reshape(-1, block).sum(axis=1)


def assert_ranked(kept_scores: np.ndarray, dropped_scores: np.ndarray) -> None:
    """Every kept unit scores at least as high as every dropped one (float32 ranking slack)."""
    if kept_scores.shape[0] and dropped_scores.shape[0]:
        assert kept_scores.min() >= dropped_scores.max() * (1 - 1e-5)


def check_round_trip(update: dict[str, np.ndarray], spec: CompressionSpec, seed: int) -> None:
    encoded = encode(update, spec, seed=seed)
    decoded = decode(encoded.payload, schema_of(update))

    assert encoded.payload.dtype == np.uint8 and encoded.payload.ndim == 1
    assert encoded.stats.payload_bytes == encoded.payload.shape[0]
    assert encoded.stats.dense_bytes == dense_float32_bytes(update)
    assert list(decoded) == list(update)
    prunable = [n for n, a in update.items() if a.size >= spec.dense_below]
    block = spec.block
    sent: dict[bool, list[tuple[np.ndarray, np.ndarray]]] = {True: [], False: []}
    kept_units = dropped_units = np.zeros(0)
    units_kept_total = units_total = 0
    for name, x in update.items():
        got = decoded[name]
        assert got.dtype == np.float32 and got.shape == x.shape
        # decode reproduces exactly what encode promised
        assert np.array_equal(got, encoded.decoded[name])
        flat, out = x.reshape(-1), got.reshape(-1)
        positions = encoded.positions[name]
        kept = np.ones(flat.shape[0], dtype=bool)
        if positions is not None:
            assert np.all(np.diff(positions) > 0)
            kept[:] = False
            kept[positions] = True
        # zero everywhere that was not selected
        assert not out[~kept].any()
        assert encoded.stats.kept[name] == int(kept.sum())
        if name in prunable:
            # whole runs of `block` elements are kept or dropped
            padded = np.zeros(-(-flat.shape[0] // block) * block, dtype=bool)
            padded[: flat.shape[0]] = kept
            runs = padded.reshape(-1, block)
            if flat.shape[0] % block:
                runs[-1, flat.shape[0] % block :] = runs[-1, 0]
            assert (runs.all(axis=1) | ~runs.any(axis=1)).all()
            unit_kept = runs[:, 0]
            scores = unit_scores(flat, block)
            units_kept_total += int(unit_kept.sum())
            units_total += unit_kept.shape[0]
            if spec.select == "topk":
                assert unit_kept.sum() == kept_count(unit_kept.shape[0], spec.keep)
                assert_ranked(scores[unit_kept], scores[~unit_kept])
            kept_units = np.concatenate([kept_units, scores[unit_kept]])
            dropped_units = np.concatenate([dropped_units, scores[~unit_kept]])
        if spec.select == "thresh" and name in prunable:
            assert np.array_equal(kept, np.abs(flat) >= np.float32(spec.eps))
        sent[name in prunable].append((flat[kept], out[kept]))
    if spec.select == "gtopk" and prunable:
        assert units_kept_total == kept_count(units_total, spec.keep)
        assert_ranked(kept_units, dropped_units)
    # Within the documented per-element bound of the value coding. Each section's kept values
    # are coded as one stream (quantization chunks run across tensor ends), so the bound is
    # computed over the stream.
    for is_prunable, pairs in sent.items():
        if not pairs:
            continue
        v = np.concatenate([p[0] for p in pairs])
        got_v = np.concatenate([p[1] for p in pairs])
        coding = spec if is_prunable else CompressionSpec(bits=32 if spec.bits == 32 else 16)
        bound = error_bound(coding, chunk_absmax(v, spec.chunk), v)
        err = np.abs(got_v.astype(np.float64) - v.astype(np.float64))
        assert np.all(err <= bound), (is_prunable, float((err - bound).max()))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.lists(arrays, min_size=1, max_size=3),
    spec=specs(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_properties(tensors: list[np.ndarray], spec: CompressionSpec, seed: int) -> None:
    update = {f"t{i}": t for i, t in enumerate(tensors)}

    check_round_trip(update, spec, seed)


WIDTHS = [(bits, False) for bits in (32, 16, 8, 4, 2, 1)] + [(b, True) for b in (8, 4, 2, 1)]


@pytest.mark.parametrize(("bits", "stochastic"), WIDTHS)
@pytest.mark.parametrize("select", ["none", "topk", "gtopk", "thresh"])
def test_round_trip_every_width_on_realistic_update(
    bits: int, stochastic: bool, select: str
) -> None:
    rng = np.random.default_rng(bits)
    update = {
        "conv.weight": (rng.standard_t(3, size=(64, 3, 3, 3)) * 1e-2).astype(np.float32),
        "conv.bias": rng.normal(size=64).astype(np.float32),
        "fc.weight": rng.normal(size=(1001, 33)).astype(np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    spec = CompressionSpec(
        select=select,
        keep=0.05 if select in ("topk", "gtopk") else 1.0,
        eps=1.0 if select == "thresh" else 0.0,
        bits=bits,
        stochastic=stochastic,
        chunk=100,
        dense_below=65,
    )

    check_round_trip(update, spec, seed=3)


def test_float16_overflow_falls_back_to_float32() -> None:
    update = {"w": np.array([1e5, -3.0, 0.5], dtype=np.float32)}

    encoded = encode(update, CompressionSpec(bits=16))

    assert np.array_equal(decode(encoded.payload, schema_of(update))["w"], update["w"])


def test_integer_tensors_and_scalars_are_sent_as_float32() -> None:
    update = {"steps": np.array(7, dtype=np.int64), "w": np.arange(5, dtype=np.float64)}

    decoded = decode(encode(update, CompressionSpec()).payload, schema_of(update))

    assert decoded["steps"].shape == () and decoded["steps"] == 7.0
    assert decoded["w"].dtype == np.float32 and np.array_equal(decoded["w"], np.arange(5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_input(bad: float) -> None:
    update = {"w": np.array([1.0, bad], dtype=np.float32)}

    with pytest.raises(ValueError, match=r"update\['w'\].*NaN or Inf"):
        encode(update, CompressionSpec("topk", keep=0.5, bits=8))


def test_encode_refuses_non_numeric_input() -> None:
    with pytest.raises(ValueError, match=r"update\['flag'\] has dtype bool"):
        encode({"flag": np.array([True])}, CompressionSpec())


def test_encoded_decoded_does_not_alias_the_input() -> None:
    x = np.ones(10, dtype=np.float32)

    encoded = encode({"w": x}, CompressionSpec())
    x[:] = 5.0

    assert np.all(encoded.decoded["w"] == 1.0)


def test_same_seed_same_payload_different_seed_different_rounding() -> None:
    rng = np.random.default_rng(0)
    update = {"w": rng.normal(size=5000).astype(np.float32)}
    spec = CompressionSpec("topk", keep=0.3, bits=4, stochastic=True)

    first = encode(update, spec, seed=11)
    again = encode(update, spec, seed=11)
    other = encode(update, spec, seed=12)

    assert np.array_equal(first.payload, again.payload)
    assert np.array_equal(first.positions["w"], other.positions["w"])  # top-k is exact
    assert not np.array_equal(first.payload, other.payload)  # only the rounding differs


def test_deterministic_rounding_ignores_the_seed() -> None:
    update = {"w": np.random.default_rng(1).normal(size=3000).astype(np.float32)}
    spec = CompressionSpec("topk", keep=0.1, bits=2)

    assert np.array_equal(
        encode(update, spec, seed=1).payload, encode(update, spec, seed=2).payload
    )


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # Prepare: values on and between grid points, chunk absmax known.
    rng = np.random.default_rng(bits)
    chunk, n, trials = 64, 512, 400
    x = rng.uniform(-1, 1, size=n).astype(np.float32)
    x[::chunk] = 1.0  # every chunk's absmax is 1, so the scale is known exactly
    spec = CompressionSpec(bits=bits, stochastic=True, chunk=chunk)

    # Execute
    total = np.zeros(n, dtype=np.float64)
    for seed in range(trials):
        total += encode({"x": x}, spec, seed=seed).decoded["x"]
    mean = total / trials

    # Assert: the variance of one draw is known in closed form, so the tolerance follows from
    # it (6 sigma per element, 5 sigma for the sum of all errors) rather than a magic number.
    xd = x.astype(np.float64)
    if bits == 1:
        var = 1.0 - xd**2  # values ±a with a = 1, mean x
    else:
        step = 1.0 / {8: 127, 4: 7, 2: 1}[bits]
        frac = xd / step - np.floor(xd / step)
        var = step**2 * frac * (1.0 - frac)
    sigma = np.sqrt(var / trials)
    assert np.all(np.abs(mean - xd) <= 6 * sigma + 1e-6)
    z = float(np.sum(mean - xd) / math.sqrt(np.sum(var) / trials))
    assert abs(z) < 5.0


def test_deterministic_one_bit_scale_is_chunk_mean_magnitude() -> None:
    x = np.array([0.5, -1.5, 2.0, -4.0], dtype=np.float32)

    got = encode({"x": x}, CompressionSpec(bits=1, chunk=2)).decoded["x"]

    assert np.allclose(got, [1.0, -1.0, 3.0, -3.0])
