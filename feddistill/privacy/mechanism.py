"""The DP-FedAvg mechanism as pure functions on arrays (no Flower objects, no global RNG).

One round (McMahan et al. 2018, arXiv:1710.06963, Alg. 1 with the fixed denominator
``m = q * N``; Andrew et al. 2021, arXiv:1905.03871, for adaptive clipping):

* each participating client's update ``u_i`` is clipped to L2 norm ``C`` (:func:`clip_to_norm`);
* the server releases ``(sum_i u_i + N(0, sigma^2 C^2 I)) / m`` (:func:`noisy_mean`), i.e.
  noise of standard deviation ``sigma * C / m`` on the mean (Flower's ``compute_stdv``);
* with adaptive clipping, ``C <- C * exp(-lr * (b - gamma))`` where ``b`` is the noisy
  fraction of updates that were *not* clipped and ``gamma`` the target quantile
  (Andrew et al., Eq. 2 and Alg. 1): the count is released with its own noise, and the update
  noise is raised so that the pair costs what one Gaussian of multiplier ``sigma`` costs
  (:func:`update_noise_multiplier`, Flower's ``compute_adaptive_noise_params``).

The norm, the noise scale and the adaptive split are the same formulas as Flower's helpers in
``flwr.supercore.differential_privacy`` (a module outside Flower's public API, so not imported
here); the noise itself is drawn from a ``numpy`` Generator the caller
passes, so tests fix the seed and the server draws it from fresh OS entropy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors flattened together (the norm DP-FedAvg clips)."""
    return math.sqrt(
        sum(float(np.square(np.asarray(a, dtype=np.float64)).sum()) for a in arrays.values())
    )


def clip_to_norm(
    arrays: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """``arrays * min(1, clip / norm)`` as float32, and the norm before clipping.

    Flat clipping (one factor for the whole update) as Flower's ``clip_inputs_inplace``, but
    out of place and with a margin: the norm is computed in float64 (exact to ~1e-15
    relative); the float32 roundings (of the input, of the factor, of each product) move a
    value by at most 2^-24 relative each, so the result's norm is at most
    ``clip * (1 - 1e-6) * (1 + 2^-24)^3 < clip``: no second pass is needed to check it.
    """
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with non-finite norm {norm}")
    if norm <= clip:
        return {n: np.asarray(a, dtype=np.float32).copy() for n, a in arrays.items()}, norm
    factor = np.float32(clip / norm * (1 - 1e-6))
    out = {n: np.asarray(a, dtype=np.float32) * factor for n, a in arrays.items()}
    return out, norm


def noise_std(noise_multiplier: float, clip: float, denominator: float) -> float:
    """Standard deviation of the noise on the mean: ``sigma * C / m``."""
    return float(noise_multiplier * clip / denominator)


def noisy_mean(
    updates: Sequence[Mapping[str, np.ndarray]],
    names: Sequence[str],
    like: Mapping[str, np.ndarray],
    *,
    clip: float,
    noise_multiplier: float,
    denominator: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``(sum of updates clipped to clip + N(0, (sigma * clip)^2)) / denominator``, float32.

    ``like`` gives the shapes (an empty ``updates`` still releases noise). The updates are
    clipped here again whatever the clients did: the sum's sensitivity to one client is then
    ``clip`` by construction, whatever a client (or the codec's rounding) sent.
    """
    total = {n: np.zeros(np.shape(like[n]), dtype=np.float64) for n in names}
    for update in updates:
        clipped, _ = clip_to_norm({n: update[n] for n in names}, clip)
        for n in names:
            total[n] += clipped[n]
    std = noise_std(noise_multiplier, clip, denominator)
    out: dict[str, np.ndarray] = {}
    for n in names:
        mean = (total[n] / denominator).astype(np.float32)
        if std > 0:
            mean += np.float32(std) * rng.standard_normal(mean.shape, dtype=np.float32)
        out[n] = mean
    return out


def noisy_fraction(
    count: int, stddev: float, denominator: float, rng: np.random.Generator
) -> float:
    """``(count + N(0, stddev^2)) / denominator``: a privatized share of clients."""
    noise = float(rng.normal(0.0, stddev)) if stddev > 0 else 0.0
    return (count + noise) / denominator


def adaptive_clip(
    clip: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Geometric update of Andrew et al. 2021 (Eq. 2): ``C * exp(-lr * (b - gamma))``.

    ``b`` is the (noisy) fraction of updates whose norm was at most ``C``: above the target
    quantile ``gamma`` the clip shrinks, below it grows.
    """
    return clip * math.exp(-lr * (unclipped_fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float, expected: float) -> float:
    """Multiplier for the update noise when the clipped count is released too.

    Andrew et al. 2021 (Sec. 3.1): releasing the count with noise ``count_stddev`` and the
    update with multiplier ``z`` costs the same as one Gaussian of multiplier
    ``(z^-2 + (2 count_stddev)^-2)^-1/2``; solving for ``z`` keeps the accounted multiplier at
    ``noise_multiplier``. Raises ValueError when ``noise_multiplier >= 2 * count_stddev``.
    """
    if noise_multiplier <= 0:
        return 0.0
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(
            f"noise multiplier {noise_multiplier} needs a clipped-count noise above "
            f"{noise_multiplier / 2} (got {count_stddev}, for {expected:g} expected clients "
            "per round): raise privacy.clipped-count-stddev or lower the noise multiplier"
        )
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def default_delta(num_clients: int) -> float:
    """``1 / N^1.1``: below ``1 / N``, so that releasing one client's data whole is excluded."""
    return float(num_clients) ** -1.1
