"""Distributed DP under secure aggregation: the integer encoding, the noise, the accountant,
and a round through the real apps in which the server's step is the clients' clipped mean plus
noise of the announced size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from feddistill.config import ConfigError
from feddistill.privacy.accounting import (
    SKELLAM_ORDERS,
    SkellamAccountant,
    epsilon_after,
    skellam_noise_for_epsilon,
    skellam_rdp,
)
from feddistill.secagg.distributed import (
    NoisyField,
    conditional_round,
    decode_sum,
    encode_noisy,
    hadamard,
    rotate,
    rotation_signs,
    signed,
    skellam,
    to_integers,
    unrotate,
)
from feddistill.secagg.quantize import SecAggError, add
from tests.conftest import tiny_config
from tests.test_secure_round import (  # noqa: F401 (_task_identity: an autouse fixture)
    SECURE,
    LoopbackGrid,
    _setup,
    _task_identity,
    _train_round,
)

DP = {**SECURE, "privacy.mode": "distributed", "privacy.noise-multiplier": 0.5, "privacy.clip": 0.1}


def _field(**kw) -> NoisyField:
    args = {
        "bits": 8,
        "clip": 1.0,
        "dim": 300,
        "clients": 5,
        "threshold": 4,
        "noise_multiplier": 1.0,
    }
    return NoisyField(**{**args, **kw})


def test_the_rotation_keeps_the_norm_and_is_undone_exactly() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    signs = rotation_signs(7, 3, 512)
    y = rotate(x, signs)
    assert y.size == 512
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    np.testing.assert_allclose(unrotate(y, signs, 300), x, atol=1e-12)
    np.testing.assert_allclose(hadamard(hadamard(y)), y, atol=1e-12)
    # all the norm on one coordinate comes out spread: no coordinate keeps more than 1/sqrt(D)
    spike = np.zeros(300)
    spike[5] = 1.0
    assert np.max(np.abs(rotate(spike, signs))) == pytest.approx(1 / math.sqrt(512))
    with pytest.raises(SecAggError, match="power of two"):
        hadamard(np.ones(6))


def test_conditional_rounding_is_unbiased_and_never_exceeds_its_bound() -> None:
    rng = np.random.default_rng(1)
    s = rng.uniform(-3, 3, size=64)
    draws = np.array([conditional_round(s, 1e9, rng) for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(axis=0), s, atol=0.05)  # unbiased when unconditioned
    tight = float(np.linalg.norm(s)) + 0.5
    for _ in range(200):
        assert np.linalg.norm(conditional_round(s, tight, rng)) <= tight
    # a bound no draw can meet: round toward zero, never above the input's norm
    z = conditional_round(s, 0.0, rng, tries=3)
    np.testing.assert_array_equal(z, np.trunc(s))


def test_skellam_noise_has_the_asked_variance_and_zero_mean() -> None:
    noise = skellam(40.0, 200_000, np.random.default_rng(2))
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 0.05
    assert noise.var() == pytest.approx(40.0, rel=0.02)


def test_the_modulus_holds_the_sum_and_a_two_complement_reading_recovers_it() -> None:
    field = _field(bits=6, noise_multiplier=2.0)
    rng = np.random.default_rng(3)
    clients = [rng.normal(scale=0.1, size=300) for _ in range(field.clients)]
    signs = rotation_signs(11, 1, field.padded)
    total = np.zeros(field.padded, dtype=np.uint64)
    integers = np.zeros(field.padded, dtype=np.int64)
    counted = np.zeros(300)
    for x in clients:
        elements, clipped, own = encode_noisy(x, field, signs, rng, rng)
        assert elements.dtype == np.uint64 and np.all(elements <= field.mask)
        total = add(total, elements, field)
        integers += signed(elements, field)
        counted += own
        np.testing.assert_allclose(clipped, x * min(1.0, field.clip / np.linalg.norm(x)))
    # the modular sum, read signed, is the plain integer sum (nothing wrapped)
    np.testing.assert_array_equal(signed(total, field), integers)
    decoded = decode_sum(total, field, signs)
    noise = decoded - counted  # what the server's sum has beyond the clients' encodings
    want = field.step * math.sqrt(field.client_variance * field.clients)
    assert np.std(noise) == pytest.approx(want, rel=0.15)
    assert np.std(noise) > 10 * np.std(counted) / 300  # the noise is real, not negligible


def test_one_clients_integer_vector_never_exceeds_the_sensitivity() -> None:
    field = _field(bits=4, noise_multiplier=1.0)
    rng = np.random.default_rng(4)
    signs = rotation_signs(1, 1, field.padded)
    for scale in (0.001, 0.06, 1.0, 100.0):  # far below, near and far above the clip
        for _ in range(20):
            x = rng.normal(scale=scale, size=field.dim)
            clipped, z = to_integers(x, field, signs, rng)
            assert np.linalg.norm(clipped) <= field.clip + 1e-12
            assert np.linalg.norm(z) <= field.l2_sensitivity
            assert np.abs(z).sum() <= field.l1_sensitivity
            assert np.abs(z).max() <= field.levels


def test_a_field_the_modulus_cannot_hold_is_refused_with_its_numbers() -> None:
    with pytest.raises(SecAggError, match=r"needs a modulus of 2\^"):
        _field(bits=32, noise_multiplier=1e9)
    with pytest.raises(SecAggError, match="one bit is the sign"):
        _field(bits=1)


def test_skellam_epsilon_is_the_gaussian_one_plus_a_small_integer_surcharge() -> None:
    field = _field(bits=8, dim=10_000)
    l2, l1 = field.l2_sensitivity, field.l1_sensitivity
    eps = SkellamAccountant(1.0, l2, l1, 1e-5).epsilon(30)
    gaussian = epsilon_after(30, 1.0, 1.0, 1e-5)  # no sampling: q = 1
    assert gaussian < eps < gaussian * 1.02
    rdp = skellam_rdp(SKELLAM_ORDERS, l2, l1, (1.0 * l2) ** 2)
    assert np.all(rdp > np.array(SKELLAM_ORDERS) / 2.0)  # above the Gaussian's a / (2 sigma^2)
    # more rounds cost more, more noise costs less
    acc = SkellamAccountant(1.0, l2, l1, 1e-5)
    assert acc.epsilon(0) == 0.0 and acc.epsilon(10) < acc.epsilon(30)
    assert SkellamAccountant(2.0, l2, l1, 1e-5).epsilon(30) < eps


def test_the_noise_for_a_target_epsilon_is_the_smallest_that_reaches_it() -> None:
    field = _field(dim=5000)
    l2, l1 = field.l2_sensitivity, field.l1_sensitivity
    sigma = skellam_noise_for_epsilon(8.0, 1e-4, 20, l2, l1)
    assert SkellamAccountant(sigma, l2, l1, 1e-4).epsilon(20) <= 8.0
    assert SkellamAccountant(sigma * 0.99, l2, l1, 1e-4).epsilon(20) > 8.0


def test_distributed_dp_is_refused_without_secure_aggregation_and_with_adaptive_clipping(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        ConfigError, match=r"secure\.aggregation = true, or privacy\.mode = 'central'"
    ):
        tiny_config(tmp_path, **{"privacy.mode": "distributed", "privacy.noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="adaptive-clip"):
        tiny_config(tmp_path, **{**DP, "privacy.adaptive-clip": True})
    with pytest.raises(ConfigError, match=r"privacy\.mode = 'distributed' or 'none'"):
        tiny_config(tmp_path, **{**DP, "privacy.mode": "central"})
    with pytest.raises(ConfigError, match=r"exactly one of privacy\.noise-multiplier"):
        tiny_config(tmp_path, **{**DP, "privacy.noise-multiplier": 0.0})


def test_a_round_with_distributed_dp_steps_by_the_clipped_mean_plus_the_announced_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from feddistill.secagg import distributed

    cfg, models, strategy, config, arrays = _setup(tmp_path, **DP)
    grid = LoopbackGrid(tmp_path, 4)
    counted: list[np.ndarray] = []  # what each client's integers stand for: only this test looks
    encode = distributed.encode_noisy

    def spy(values, field, signs, rounding, noise):
        out = encode(values, field, signs, rounding, noise)
        counted.append(out[2])
        return out

    monkeypatch.setattr("feddistill.client.work.encode_noisy", spy)

    messages, (new, _) = _train_round(strategy, arrays, config, grid)

    assert len(messages) == 4 and new is not None and len(counted) == 4
    before = np.concatenate([models.init_arrays[n].ravel() for n in models.names])
    after = np.concatenate([new[n].numpy().ravel() for n in models.names])
    from feddistill.secagg.quantize import shared_pattern

    assert strategy.secure is not None and strategy.accountant is strategy.secure.privacy
    pattern = shared_pattern(strategy.secure.pattern_seed, 1, before.size, cfg.secure.keep)
    off = np.setdiff1d(np.arange(before.size), pattern)
    np.testing.assert_array_equal(after[off], before[off])  # only the pattern moves
    step = (after - before)[pattern] / cfg.server.lr
    noise = step - np.mean(counted, axis=0)
    figures = strategy.accountant.figures(1)
    assert figures["noise_std"] > 0
    assert np.std(noise) == pytest.approx(figures["noise_std"], rel=0.2)
    assert figures["epsilon"] is not None and figures["epsilon"] > 0
    assert figures["noise_multiplier"] == 0.5 and figures["sampling_rate"] is None
    # the clients said nothing computed from their data: the reply metrics are the count only
    stats = strategy.traffic[1]
    assert stats.replies == 4 and stats.failures == []
    assert "differential" not in strategy.accountant.guarantee(1)  # one plain sentence
    assert strategy.accountant.guarantee(1).startswith("(epsilon=")
