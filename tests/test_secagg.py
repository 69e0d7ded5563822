"""Secure aggregation core: exact modular sums, dropouts, masks that hide, lying shares named."""

from __future__ import annotations

import numpy as np
import pytest

from feddistill.secagg.protocol import (
    MASK_KEY,
    Client,
    Share,
    pack,
    unmask_sum,
    unpack,
)
from feddistill.secagg.quantize import (
    FieldSpec,
    SecAggError,
    dequantize_sum,
    quantize,
    shared_pattern,
)


def _seeded(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def _round(
    values: dict[int, np.ndarray],
    spec: FieldSpec,
    threshold: int,
    *,
    drop_after_shares: tuple[int, ...] = (),
    silent_at_unmask: tuple[int, ...] = (),
    seed: int = 0,
    tamper=None,
):
    """One protocol round driven like the server would, with the given dropouts."""
    clients = {i: Client(i, _seeded(seed * 1000 + i)) for i in values}
    roster = {i: c.advertise() for i, c in clients.items()}
    outbox = {i: c.share_keys(roster, threshold) for i, c in clients.items()}
    u1 = set(clients)
    inbox = {i: {j: outbox[j][i] for j in u1 if j != i} for i in u1}
    masked = {
        i: c.masked_input(values[i], inbox[i], spec)
        for i, c in clients.items()
        if i not in drop_after_shares
    }
    responses = {i: clients[i].unmask(masked) for i in masked if i not in silent_at_unmask}
    if tamper is not None:
        tamper(responses)
    return masked, unmask_sum(roster, u1, masked, responses, spec, threshold)


def _vectors(n: int, k: int, spec: FieldSpec, seed: int = 1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, spec.levels + 1, size=k).astype(np.uint64) for i in range(1, n + 1)}


def test_the_unmasked_result_is_the_plaintext_modular_sum_exactly() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=5)
    values = _vectors(5, 257, spec)
    masked, result = _round(values, spec, threshold=3)
    expected = sum(values.values()) & spec.mask
    np.testing.assert_array_equal(result.total, expected)
    assert result.dropped == [] and result.liars == {}
    for i, y in masked.items():  # and no masked vector is its plain vector
        assert not np.array_equal(y, values[i])


def test_dropouts_after_masking_are_survived_up_to_the_threshold_and_refused_beyond() -> None:
    spec = FieldSpec(bits=8, clip=1.0, clients=6)
    values = _vectors(6, 64, spec, seed=2)
    # two clients drop after the shares went out, one more stays silent when unmasking
    _, result = _round(values, spec, threshold=3, drop_after_shares=(2, 5), silent_at_unmask=(6,))
    alive = [1, 3, 4, 6]
    np.testing.assert_array_equal(result.total, sum(values[i] for i in alive) & spec.mask)
    assert result.survivors == alive and result.dropped == [2, 5]
    # one more dropout than the threshold allows: a named refusal, never a wrong sum
    with pytest.raises(SecAggError, match="threshold is 3: the sum cannot be recovered"):
        _round(values, spec, threshold=3, drop_after_shares=(1, 2, 5), silent_at_unmask=(6,))


def test_a_client_asked_to_unmask_below_the_threshold_refuses() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=3)
    clients = {i: Client(i, _seeded(i)) for i in (1, 2, 3)}
    roster = {i: c.advertise() for i, c in clients.items()}
    outbox = {i: c.share_keys(roster, 3) for i, c in clients.items()}
    inbox = {i: {j: outbox[j][i] for j in clients if j != i} for i in clients}
    clients[1].masked_input(np.zeros(4, np.uint64), inbox[1], spec)
    with pytest.raises(SecAggError, match="threshold is 3: not unmasking"):
        clients[1].unmask([1, 2])  # a server asking for client 3's mask key and its input


def test_a_single_masked_vector_does_not_depend_on_the_update() -> None:
    """Masked vectors of an all-zero and an all-maximum update, over 120 fixed-seed sessions,
    fall in the same bins as often as chance allows (chi-square two-sample, p > 0.001)."""
    from scipy.stats import chi2_contingency

    spec = FieldSpec(bits=4, clip=1.0, clients=3)  # m = 6: values 0..63
    k, bins = 32, 16
    counts = np.zeros((2, bins), dtype=np.int64)
    plain = np.zeros((2, bins), dtype=np.int64)
    for row, level in enumerate((0, spec.levels)):
        for session in range(120):
            values = {1: np.full(k, level, np.uint64), 2: np.zeros(k, np.uint64)}
            values[3] = np.zeros(k, np.uint64)
            masked, _ = _round(values, spec, threshold=2, seed=row * 10_000 + session)
            for table, v in ((counts, masked[1]), (plain, values[1])):
                table[row] += np.bincount(v.astype(np.int64) * bins >> spec.modulus_bits,
                                          minlength=bins)  # fmt: skip
    p = chi2_contingency(counts)[1]
    assert p > 1e-3, f"masked vectors tell the updates apart (p = {p:.2e})\n{counts}"
    # the control: the same test tells the unmasked vectors apart at once
    assert chi2_contingency(plain + 1)[1] < 1e-12


def test_a_client_that_lies_about_a_share_is_named_and_cannot_change_the_sum() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=5)
    values = _vectors(5, 32, spec, seed=3)

    def lie(responses: dict[int, dict[int, Share]]) -> None:
        honest = responses[4][1]  # client 4 reports a wrong share of client 1's self-mask seed
        forged = bytearray(honest.data)
        forged[-1] ^= 0xFF
        responses[4][1] = Share(honest.kind, bytes(forged))

    _, result = _round(values, spec, threshold=3, tamper=lie)
    np.testing.assert_array_equal(result.total, sum(values.values()) & spec.mask)
    assert result.liars == {1: [4]}


def test_too_many_lying_shares_fail_the_round_by_name() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=4)
    values = _vectors(4, 8, spec, seed=4)

    noise = np.random.default_rng(8)

    def lie(responses: dict[int, dict[int, Share]]) -> None:
        for r in (2, 3):  # two of four wrong at threshold 3: no 3 shares fit
            share = responses[r][1]
            forged = bytes(
                a ^ b for a, b in zip(share.data, noise.bytes(len(share.data)), strict=True)
            )
            responses[r][1] = Share(share.kind, share.data[:4] + forged[4:])

    with pytest.raises(SecAggError, match="too many wrong shares"):
        _round(values, spec, threshold=3, tamper=lie)


def test_a_dropped_clients_mask_key_is_checked_against_its_public_key() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=4)
    values = _vectors(4, 8, spec, seed=5)

    def lie(responses: dict[int, dict[int, Share]]) -> None:
        share = responses[1][4]
        assert share.kind == MASK_KEY  # client 4 dropped: its mask key is what is revealed
        responses[1][4] = Share(MASK_KEY, share.data[:-1] + bytes([share.data[-1] ^ 1]))

    _, result = _round(values, spec, threshold=2, drop_after_shares=(4,), tamper=lie)
    np.testing.assert_array_equal(result.total, sum(values[i] for i in (1, 2, 3)) & spec.mask)
    assert result.liars == {4: [1]}


def test_quantized_sums_dequantize_to_the_float_sum_without_bias() -> None:
    spec = FieldSpec(bits=8, clip=0.5, clients=10)
    rng = np.random.default_rng(6)
    x = rng.uniform(-0.4, 0.4, size=(10, 2000))
    q = sum(quantize(row, spec, rng) for row in x) & spec.mask
    assert int(q.max()) < 1 << spec.modulus_bits  # m = 8 + 4 holds 10 sums of 255
    got = dequantize_sum(q, spec, 10)
    step = 2 * spec.clip / spec.levels
    assert np.abs(got - x.sum(axis=0)).max() < 10 * step  # each value within one step
    assert abs(float(np.mean(got - x.sum(axis=0)))) < 0.05 * step  # unbiased on average
    clipped = quantize(np.array([5.0, -5.0]), spec, rng)
    assert clipped.tolist() == [spec.levels, 0]


def test_the_shared_pattern_is_public_and_the_same_everywhere() -> None:
    a = shared_pattern(seed=7, server_round=3, size=10_000, keep=0.01)
    assert len(a) == 100 and np.all(np.diff(a) > 0) and a.max() < 10_000
    np.testing.assert_array_equal(a, shared_pattern(7, 3, 10_000, 0.01))
    assert not np.array_equal(a, shared_pattern(7, 4, 10_000, 0.01))  # a new one each round
    with pytest.raises(SecAggError, match=r"secure\.keep"):
        shared_pattern(7, 3, 100, 0.0)


def test_field_settings_that_would_wrap_or_overflow_are_refused() -> None:
    assert FieldSpec(bits=4, clip=1.0, clients=5).modulus_bits == 7
    assert FieldSpec(bits=4, clip=1.0, clients=1).modulus_bits == 4
    with pytest.raises(SecAggError, match="at most 2"):
        FieldSpec(bits=32, clip=1.0, clients=1 << 31)
    with pytest.raises(SecAggError, match=r"secure\.bits"):
        FieldSpec(bits=0, clip=1.0, clients=3)


def test_masked_vectors_pack_to_ceil_m_over_8_bytes_a_value() -> None:
    spec = FieldSpec(bits=4, clip=1.0, clients=5)  # m = 7: one byte a value
    y = np.array([0, 1, 127, 64], dtype=np.uint64)
    data = pack(y, spec)
    assert len(data) == 4
    np.testing.assert_array_equal(unpack(data, 4, spec), y)
    with pytest.raises(SecAggError, match="expected 4"):
        unpack(data[:3], 4, spec)


def test_what_a_round_does_not_carry_stays_in_the_residual() -> None:
    from feddistill.secagg.quantize import dequantize_one, encode_update, mean_update

    spec = FieldSpec(bits=4, clip=0.1, clients=3)
    rng = np.random.default_rng(9)
    updates = [rng.normal(0, 0.05, size=500).astype(np.float32) for _ in range(3)]
    updates[0][7] = 3.0  # far beyond the clip
    pattern = shared_pattern(seed=1, server_round=1, size=500, keep=0.1)
    total = np.zeros(len(pattern), dtype=np.uint64)
    for u in updates:
        q, residual = encode_update(u, pattern, spec, rng)
        sent = np.zeros(500, np.float32)
        sent[pattern] = dequantize_one(q, spec)
        np.testing.assert_allclose(sent + residual, u, atol=1e-6)  # nothing lost
        total = (total + q) & spec.mask
    mean = mean_update(total, pattern, 500, spec, 3)
    assert np.count_nonzero(mean[np.setdiff1d(np.arange(500), pattern)]) == 0
    clipped = np.mean([np.clip(u[pattern], -0.1, 0.1) for u in updates], axis=0)
    step = 2 * spec.clip / spec.levels
    assert np.abs(mean[pattern] - clipped).max() <= step + 1e-6


def test_flowers_secaggplus_reply_is_sized_with_flowers_own_code() -> None:
    from feddistill.bench.secagg import flower_masked_reply_bytes

    shapes = [(64, 32), (32,)]
    size = flower_masked_reply_bytes(shapes)
    assert 8 * (64 * 32 + 32) < size < 8 * (64 * 32 + 32) + 2048  # int64 a weight, framing
