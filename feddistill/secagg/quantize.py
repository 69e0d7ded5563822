"""Compressed updates in a finite group: a shared pattern, clipping, stochastic rounding.

Masked sums need every client's vector on the same coordinates and in one group ``Z_{2^m}``.
Top-k positions differ per client, so under secure aggregation a round's coordinates are a
random-k subset drawn from a seed the server announces (public: it reveals nothing about any
update); what a round's pattern leaves out stays in each client's error-feedback residual. Each
kept value is clipped to ``[-clip, clip]`` and stochastically rounded to one of ``2^bits``
levels (unbiased, so the sum of the dequantized values is unbiased too), then lives in
``Z_{2^m}`` with ``m = bits + ceil(log2(clients))``: the sum of ``clients`` values below
``2^bits`` stays below ``2^m`` and the modular sum is the plain sum. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MAX_MODULUS_BITS = 62  # uint64 arithmetic: a + b of two values below 2^62 cannot overflow


class SecAggError(ValueError):
    """A secure-aggregation setting or message that cannot work; the message says which."""


class Group(Protocol):
    """What masking needs of a round's encoding: the group ``Z_{2^m}``. :class:`FieldSpec`
    (plain quantization) and :class:`feddistill.secagg.distributed.NoisyField` (with noise)."""

    @property
    def modulus_bits(self) -> int: ...

    @property
    def mask(self) -> np.uint64: ...


@dataclass(frozen=True)
class FieldSpec:
    """How one round's values become group elements.

    ``bits``: quantization levels ``2^bits`` over ``[-clip, clip]``; ``clients``: the most
    vectors ever summed in one round (the group must hold their sum without wrapping).
    """

    bits: int
    clip: float
    clients: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise SecAggError(f"secure.bits = {self.bits}: expected an integer in [1, 32]")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"secure.clip = {self.clip}: expected a finite number > 0")
        if self.clients < 1:
            raise SecAggError(f"clients per round = {self.clients}: expected >= 1")
        if self.modulus_bits > MAX_MODULUS_BITS:
            raise SecAggError(
                f"secure.bits = {self.bits} with {self.clients} clients needs a modulus of "
                f"2^{self.modulus_bits}; at most 2^{MAX_MODULUS_BITS} is supported"
            )

    @property
    def levels(self) -> int:
        """The largest quantized value, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def modulus_bits(self) -> int:
        """``m = bits + ceil(log2(clients))``: no sum of ``clients`` values wraps."""
        return self.bits + max(0, math.ceil(math.log2(self.clients)))

    @property
    def mask(self) -> np.uint64:
        """``2^m - 1``: reduction modulo ``2^m`` is ``& mask`` on uint64."""
        return np.uint64((1 << self.modulus_bits) - 1)


def shared_pattern(seed: int, server_round: int, size: int, keep: float) -> np.ndarray:
    """The round's coordinates: ``round(keep * size)`` (at least 1) distinct indices into the
    flat update, sorted, the same on every client given the announced ``seed``."""
    if not 0.0 < keep <= 1.0:
        raise SecAggError(f"secure.keep = {keep}: expected a fraction in (0, 1]")
    k = max(1, min(size, round(keep * size)))
    rng = np.random.default_rng([seed, server_round])
    return np.sort(rng.choice(size, size=k, replace=False)).astype(np.int64)


def quantize(values: np.ndarray, spec: FieldSpec, rng: np.random.Generator) -> np.ndarray:
    """``values`` clipped and stochastically rounded to ``{0, ..., 2^bits - 1}`` (uint64).

    The level ``(x + clip) / (2 clip) * (2^bits - 1)`` is rounded up with probability equal to
    its fractional part, so each dequantized value is ``x`` (clipped) in expectation.
    """
    x = np.clip(np.asarray(values, dtype=np.float64), -spec.clip, spec.clip)
    scaled = (x + spec.clip) / (2.0 * spec.clip) * spec.levels
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.minimum(low + up, spec.levels).astype(np.uint64)


def dequantize_sum(total: np.ndarray, spec: FieldSpec, count: int) -> np.ndarray:
    """The float sum of ``count`` dequantized values from their group sum ``total``."""
    if not 1 <= count <= spec.clients:
        raise SecAggError(f"{count} summands; the field holds 1 to {spec.clients}")
    step = 2.0 * spec.clip / spec.levels
    return (total.astype(np.float64) * step - count * spec.clip).astype(np.float32)


def add(a: np.ndarray, b: np.ndarray, spec: Group) -> np.ndarray:
    return (a + b) & spec.mask


def subtract(a: np.ndarray, b: np.ndarray, spec: Group) -> np.ndarray:
    return (a - b) & spec.mask  # uint64 wraps modulo 2^64, a multiple of 2^m


def encode_update(
    update: np.ndarray, pattern: np.ndarray, spec: FieldSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A client's flat ``update`` (error-feedback residual already added) on the round's
    ``pattern``: the group elements it masks, and what stays for its next round.

    The residual keeps everything this round did not carry: the coordinates off the pattern,
    the part of each value beyond the clip, and the rounding error, so over rounds nothing is
    lost (error feedback, as for the plain uplink).
    """
    flat = np.asarray(update, dtype=np.float32).ravel()
    values = flat[pattern]
    q = quantize(values, spec, rng)
    residual = flat.copy()
    residual[pattern] = values - dequantize_one(q, spec)
    return q, residual


def dequantize_one(q: np.ndarray, spec: FieldSpec) -> np.ndarray:
    """One client's quantized values back to floats (what the sum counts it as)."""
    step = 2.0 * spec.clip / spec.levels
    return (q.astype(np.float64) * step - spec.clip).astype(np.float32)


def mean_update(
    total: np.ndarray, pattern: np.ndarray, size: int, spec: FieldSpec, count: int
) -> np.ndarray:
    """The round's mean update, flat and dense (zero off the pattern), from the group sum of
    ``count`` clients' values on ``pattern``."""
    out = np.zeros(size, dtype=np.float32)
    out[pattern] = dequantize_sum(total, spec, count) / np.float32(count)
    return out
