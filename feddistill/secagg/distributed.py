"""Distributed DP under secure aggregation: each client adds its share of Skellam noise.

With ``privacy.mode = "distributed"`` the server never sees an update, so it cannot add the
noise; the clients do, inside their masked vectors, and the sum the server unmasks is already
private (the distributed Skellam mechanism, Agarwal, Kairouz & Liu 2021, on the integer
encoding of the distributed discrete Gaussian, Kairouz, Liu & Steinke 2021). One client, one
round, on the round's shared pattern (``d`` values):

1. clip the values to L2 norm ``C`` (``privacy.clip``);
2. rotate them: pad to ``D = 2^ceil(log2 d)``, flip signs drawn from the round's public seed,
   normalized Walsh-Hadamard transform. The rotation keeps the norm and spreads it evenly,
   so each coordinate is about ``C / sqrt(D)``, not up to ``C``: the integer grid can be
   ``sqrt(D)`` times finer for the same bits;
3. clip each rotated coordinate to ``[-r, r]`` with ``r = ROTATED_CLIP_STDS * C / sqrt(D)``
   (coordinate-wise clipping never raises the L2 norm) and divide by the step
   ``gamma = r / (2^(bits-1) - 1)``, so the values lie in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``;
4. round stochastically to integers, **conditionally**: draw again until the integer vector's
   norm is at most ``Delta_2`` (Kairouz et al., Theorem 2, with ``beta = e^-0.5``), so the
   sensitivity is ``Delta_2`` always, not with high probability;
5. add ``Skellam(mu / t)`` per coordinate (``Poisson(mu / 2t) - Poisson(mu / 2t)``), where
   ``mu = (sigma * Delta_2)^2`` and ``t`` is the fewest survivors the round may end with:
   Skellam is closed under sums, so any ``>= t`` survivors give noise of variance ``>= mu``;
6. embed in ``Z_{2^m}`` (two's complement), ``m`` large enough that the sum of ``n`` values and
   the noise does not wrap but with probability below ``1e-20`` per coordinate.

The server's unmasked sum, read as a signed integer, scaled by ``gamma`` and rotated back, is
the sum of the clients' clipped updates plus noise. What the integer step changed on the
pattern (the coordinate clip, the rounding) goes to the client's error-feedback residual.
Pure numpy; the noise generator is the caller's (seeded from OS entropy, never from the run
seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from feddistill.secagg.quantize import MAX_MODULUS_BITS, SecAggError

# A rotated coordinate of a vector of norm C is roughly N(0, C^2 / D): 4 standard deviations
# leave 6e-5 of the coordinates clipped (and what is clipped waits in the residual).
ROTATED_CLIP_STDS = 4.0
# Kairouz et al.'s beta: the chance one rounding exceeds the norm bound (it is then drawn again)
BETA = math.exp(-0.5)
ROUNDING_TRIES = 100
# The modulus holds n values plus this many standard deviations of the noise on each side;
# Skellam tails are at most Gaussian-like for large variance: P(|noise| > 10 std) < 1e-20.
TAIL_STDS = 10.0


@dataclass(frozen=True)
class NoisyField:
    """One round's integer encoding with noise: what clients and server must agree on.

    ``bits``: the signed range of one client's values before noise; ``clip``: the L2 clip C;
    ``dim``: the pattern's length d; ``clients``: the round's n; ``threshold``: the fewest
    survivors t; ``noise_multiplier``: sigma, the noise's std over the sensitivity.
    """

    bits: int
    clip: float
    dim: int
    clients: int
    threshold: int
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise SecAggError(
                f"secure.bits = {self.bits} with privacy.mode = 'distributed': expected an "
                "integer in [2, 32] (one bit is the sign)"
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"privacy.clip = {self.clip}: expected a finite number > 0")
        if self.dim < 1 or not 1 <= self.threshold <= self.clients:
            raise SecAggError(
                f"{self.dim} values, {self.clients} clients, threshold {self.threshold}: "
                "expected at least one value and 1 <= threshold <= clients"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise SecAggError(f"noise multiplier {self.noise_multiplier}: expected > 0")
        if self.modulus_bits > MAX_MODULUS_BITS:
            raise SecAggError(
                f"distributed DP with secure.bits = {self.bits}, noise multiplier "
                f"{self.noise_multiplier:g} and {self.clients} clients needs a modulus of "
                f"2^{self.modulus_bits}; at most 2^{MAX_MODULUS_BITS} is supported"
            )

    @property
    def padded(self) -> int:
        """``D``: the pattern's length rounded up to a power of two (the Hadamard size)."""
        return 1 << max(0, math.ceil(math.log2(self.dim)))

    @property
    def levels(self) -> int:
        """The largest integer value of one client before noise, ``2^(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def step(self) -> float:
        """``gamma``: the float width of one integer step."""
        return ROTATED_CLIP_STDS * self.clip / math.sqrt(self.padded) / self.levels

    @property
    def l2_sensitivity(self) -> float:
        """``Delta_2``: the largest L2 norm of one client's integer vector (conditional
        rounding makes it hold always)."""
        c, d = self.clip / self.step, self.padded
        slack = math.sqrt(2.0 * math.log(1.0 / BETA))
        return math.sqrt(c * c + d / 4.0 + slack * (c + math.sqrt(d) / 2.0))

    @property
    def l1_sensitivity(self) -> float:
        """``Delta_1``: of an integer vector of norm ``Delta_2`` (``|z| <= z^2`` on integers)."""
        l2 = self.l2_sensitivity
        return min(math.sqrt(self.padded) * l2, l2 * l2)

    @property
    def variance(self) -> float:
        """``mu``: the noise variance per coordinate of the sum of ``threshold`` clients."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2

    @property
    def client_variance(self) -> float:
        """Each client's share of the noise variance: ``mu / t``."""
        return self.variance / self.threshold

    @property
    def modulus_bits(self) -> int:
        """``m``: the sum of ``n`` values plus ``TAIL_STDS`` stds of ``n`` clients' noise fits
        in ``[-2^(m-1), 2^(m-1))``."""
        reach = self.clients * self.levels + TAIL_STDS * math.sqrt(
            self.client_variance * self.clients
        )
        return math.ceil(math.log2(2.0 * reach + 2.0))

    @property
    def mask(self) -> np.uint64:
        return np.uint64((1 << self.modulus_bits) - 1)


def rotation_signs(seed: int, server_round: int, length: int) -> np.ndarray:
    """The round's public random signs (+1/-1, float64), the same on every client."""
    rng = np.random.default_rng([seed, server_round, 0x507])
    return rng.integers(0, 2, size=length).astype(np.float64) * 2.0 - 1.0


def hadamard(x: np.ndarray) -> np.ndarray:
    """The normalized Walsh-Hadamard transform of ``x`` (length a power of two); orthogonal
    and its own inverse."""
    y = np.array(x, dtype=np.float64)
    n = y.size
    if n & (n - 1):
        raise SecAggError(f"Hadamard transform of length {n}: expected a power of two")
    h = 1
    while h < n:
        v = y.reshape(-1, 2, h)
        a, b = v[:, 0, :].copy(), v[:, 1, :]
        v[:, 0, :] += b
        v[:, 1, :] = a - b
        h *= 2
    return y / math.sqrt(n)


def rotate(values: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H diag(signs) pad(values)``."""
    padded = np.zeros(signs.size, dtype=np.float64)
    padded[: values.size] = values
    return hadamard(padded * signs)


def unrotate(rotated: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """The inverse of :func:`rotate`, cut back to ``dim`` values."""
    return (hadamard(rotated) * signs)[:dim]


def clip_l2(values: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(values))
    return values * (clip / norm) if norm > clip else values


def conditional_round(
    scaled: np.ndarray, bound: float, rng: np.random.Generator, tries: int = ROUNDING_TRIES
) -> np.ndarray:
    """Unbiased stochastic rounding to integers, drawn again until the norm is <= ``bound``.

    If ``tries`` draws all exceed it (it has probability ``beta^tries``), round toward zero:
    that never raises any coordinate's magnitude, so the norm is at most ``||scaled||``.
    """
    low = np.floor(scaled)
    frac = scaled - low
    for _ in range(tries):
        z = low + (rng.random(scaled.shape) < frac)
        if float(np.dot(z, z)) <= bound * bound:
            return z.astype(np.int64)
    return np.trunc(scaled).astype(np.int64)


def skellam(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise of the given variance: ``Poisson(v/2) - Poisson(v/2)``."""
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def to_integers(
    values: np.ndarray, field: NoisyField, signs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1 to 4: the values clipped to ``C``, and the integer vector (length ``D``, norm
    at most ``Delta_2``) that stands for them."""
    if values.size != field.dim or signs.size != field.padded:
        raise SecAggError(f"{values.size} values and {signs.size} signs for {field}")
    clipped = clip_l2(np.asarray(values, dtype=np.float64), field.clip)
    gamma = field.step
    rotated = np.clip(rotate(clipped, signs), -field.levels * gamma, field.levels * gamma)
    return clipped, conditional_round(rotated / gamma, field.l2_sensitivity, rng)


def encode_noisy(
    values: np.ndarray,
    field: NoisyField,
    signs: np.ndarray,
    rounding: np.random.Generator,
    noise: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One client's pattern ``values``: the group elements to mask (length ``D``), the clipped
    values, and what the server will count them as (the float of the integer vector before
    noise, rotated back). ``clipped - counted`` is the encoding's error: the residual."""
    clipped, z = to_integers(values, field, signs, rounding)
    counted = unrotate(z * field.step, signs, field.dim)
    noisy = z + skellam(field.client_variance, z.size, noise)
    return noisy.astype(np.uint64) & field.mask, clipped, counted


def signed(total: np.ndarray, field: NoisyField) -> np.ndarray:
    """Group elements read as two's-complement integers in ``[-2^(m-1), 2^(m-1))``."""
    t = (np.asarray(total, dtype=np.uint64) & field.mask).astype(np.int64)
    half = 1 << (field.modulus_bits - 1)
    return np.where(t >= half, t - (1 << field.modulus_bits), t)


def decode_sum(total: np.ndarray, field: NoisyField, signs: np.ndarray) -> np.ndarray:
    """The float sum on the pattern (noise included) from the survivors' group sum."""
    if total.size != field.padded:
        raise SecAggError(f"a sum of {total.size} values; the round has {field.padded}")
    return unrotate(signed(total, field).astype(np.float64) * field.step, signs, field.dim)
