"""Format 2's size promises: two records whatever the tensor count, run positions for block:N."""

from __future__ import annotations

import numpy as np

from feddistill.codec import decode, encode, parse_spec, rice_bits_per_value, schema_of


def many_small_tensors() -> dict[str, np.ndarray]:
    """41 tensors like the embedded student's: mostly 64-element biases and 64x64 matrices."""
    rng = np.random.default_rng(5)
    update = {f"bias{i}": rng.normal(size=64).astype(np.float32) for i in range(25)}
    update |= {f"w{i}": rng.normal(size=(64, 64)).astype(np.float32) for i in range(16)}
    return update


def test_lossless_payload_is_header_two_records_and_the_values() -> None:
    update = many_small_tensors()
    numel = sum(a.size for a in update.values())

    encoded = encode(update, parse_spec("none"))

    assert encoded.stats.payload_bytes == 32 + 2 * 24 + 4 * numel
    decoded = decode(encoded.payload, schema_of(update))
    assert all(np.array_equal(decoded[n], a) for n, a in update.items())


def test_dense_section_holds_small_tensors_in_float16() -> None:
    update = many_small_tensors()
    small = 25 * 64

    encoded = encode(update, parse_spec("topk:0.01+q8+dense:65"))

    assert all(encoded.positions[f"bias{i}"] is None for i in range(25))
    assert encoded.stats.kept_total == small + 16 * 41  # round(0.01 * 4096) = 41 per matrix
    decoded = decode(encoded.payload, schema_of(update))
    error = np.abs(decoded["bias3"] - update["bias3"])
    assert np.all(error <= np.maximum(np.abs(update["bias3"]) * 2**-11, 2**-25))  # float16


def test_block_positions_cost_about_a_run_position_per_run() -> None:
    rng = np.random.default_rng(6)
    update = {"w": rng.standard_t(3, size=1_600_000).astype(np.float32)}
    keep, block = 0.01, 16

    per_element = encode(update, parse_spec(f"gtopk:{keep}+q4"))
    per_run = encode(update, parse_spec(f"gtopk:{keep}+q4+block:{block}"))

    kept = per_run.stats.kept_total
    assert kept == round(keep * 1_600_000 / block) * block
    # Kept runs sit at density `keep` among the runs, so Rice costs about what it costs per
    # element at that density, once per run: 1/block of the per-element cost per kept value.
    bits_per_value = 8 * per_run.stats.position_bytes / kept
    assert bits_per_value <= 1.02 * rice_bits_per_value(keep) / block + 0.01
    assert per_element.stats.position_bytes > 14 * per_run.stats.position_bytes
    positions = per_run.positions["w"]
    assert positions is not None
    runs = positions.reshape(-1, block)
    assert np.all(runs[:, 0] % block == 0) and np.all(np.diff(runs, axis=1) == 1)
