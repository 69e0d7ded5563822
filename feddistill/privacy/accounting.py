"""Epsilon of a run with ``dp-accounting``'s RDP accountant, for the sampling the run does.

With ``privacy.mode = "central"`` the server samples clients by **Poisson sampling**: each of
the ``N`` clients takes part in a round independently with probability ``q = m / N``
(:class:`feddistill.strategies.private.CentralPrivacy`), not Flower's fixed-size sample. Each
round is then a Poisson-subsampled Gaussian mechanism under the add-or-remove-one-client
relation (``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``), the setting of DP-FedAvg
(McMahan et al. 2018) and of the accountant's own tests; ``T`` rounds compose to
``T`` times one round's RDP.

Composing the event costs ~0.3 s (the RDP at every order), converting RDP to epsilon ~0.2 ms,
so :class:`RoundAccountant` computes one round's RDP once and scales it: epsilon after any
round is then a cheap pure function of the round number, which also makes a resumed run's
epsilon continue by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant

_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """One round: a Poisson sample of rate ``q``, then the Gaussian sum of multiplier sigma."""
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def epsilon_after(
    rounds: int, sampling_rate: float, noise_multiplier: float, delta: float
) -> float:
    """Epsilon after ``rounds`` rounds, straight from the accountant (no caching)."""
    accountant = RdpAccountant(neighboring_relation=_RELATION)
    accountant.compose(round_event(sampling_rate, noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


class RoundAccountant:
    """Epsilon after round ``t``, from one round's RDP computed once.

    The only touch of the accountant's internals: its ``_rdp`` vector after composing one
    round (checked at construction; a version without it fails loudly here).
    """

    def __init__(
        self,
        sampling_rate: float,
        noise_multiplier: float,
        delta: float,
        orders: Sequence[float] | None = None,
    ) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling rate {sampling_rate} not in (0, 1]")
        self.sampling_rate = sampling_rate
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        accountant = RdpAccountant(orders=orders, neighboring_relation=_RELATION)
        accountant.compose(round_event(sampling_rate, noise_multiplier))
        rdp = getattr(accountant, "_rdp", None)
        orders = getattr(accountant, "_orders", None)
        if rdp is None or orders is None:
            raise RuntimeError(
                f"dp-accounting {getattr(dp_accounting, '__version__', '?')}: RdpAccountant no "
                "longer has _rdp/_orders; feddistill.privacy.accounting needs updating"
            )
        self._rdp = np.array(rdp, dtype=np.float64)
        self._orders = np.array(orders, dtype=np.float64)
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int) -> float:
        """Epsilon at :attr:`delta` after ``rounds`` rounds (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        if rounds not in self._cache:
            if self.noise_multiplier == 0:
                self._cache[rounds] = math.inf
            else:
                eps, _ = rdp_privacy_accountant.compute_epsilon(
                    self._orders, rounds * self._rdp, self.delta
                )
                self._cache[rounds] = float(eps)
        return self._cache[rounds]


def noise_for_epsilon(
    target_epsilon: float, delta: float, sampling_rate: float, rounds: int
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is <= the target.

    Brent's method over sigma (``dp_accounting.calibrate_dp_mechanism``), tolerance 1e-3.
    """

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(round_event(sampling_rate, sigma), rounds)

    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: RdpAccountant(neighboring_relation=_RELATION),
        make_event,
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-2, 1e3),
        tol=1e-3,
    )
    # Brent's answer is within tol of the optimum on either side: step up until it holds.
    while epsilon_after(rounds, sampling_rate, sigma, delta) > target_epsilon:
        sigma += 1e-3
    return float(sigma)


# -- distributed DP: the Skellam mechanism (feddistill.secagg.distributed) ----------------------
# Integer orders only: the bound below is proved for integer alpha > 1.
SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 64), *range(64, 257, 8), 384, 512, 1024)


def skellam_rdp(
    orders: Sequence[int], l2_sensitivity: float, l1_sensitivity: float, variance: float
) -> np.ndarray:
    """RDP of one release of the multi-dimensional Skellam mechanism at each order.

    Agarwal, Kairouz & Liu 2021 (arXiv:2110.04995), Theorem 3.5, with ``variance`` the noise
    variance per coordinate (``mu``) and the sensitivities in the same integer units::

        eps(a) <= a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

    The first term is the Gaussian mechanism's; the second the price of integer noise.
    """
    a = np.asarray(orders, dtype=np.float64)
    d2sq, d1, mu = l2_sensitivity**2, l1_sensitivity, variance
    gaussian = a * d2sq / (2.0 * mu)
    surcharge = np.minimum(
        ((2.0 * a - 1.0) * d2sq + 6.0 * d1) / (4.0 * mu * mu), 3.0 * d1 / (2.0 * mu)
    )
    return gaussian + surcharge


class SkellamAccountant:
    """Epsilon of a client after ``t`` rounds of distributed Skellam noise.

    No amplification by sampling is claimed: under secure aggregation the server draws the
    sample and sees who took part, so a round a client joins costs it a whole release, and
    the bound assumes it joined every round. Rounds compose by adding RDP; the conversion to
    epsilon is the accountant's own (``rdp_privacy_accountant.compute_epsilon``), as for
    central DP.
    """

    def __init__(
        self, noise_multiplier: float, l2_sensitivity: float, l1_sensitivity: float, delta: float
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        variance = (noise_multiplier * l2_sensitivity) ** 2
        self._orders = np.array(SKELLAM_ORDERS, dtype=np.float64)
        self._rdp = skellam_rdp(SKELLAM_ORDERS, l2_sensitivity, l1_sensitivity, variance)

    def epsilon(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        eps, _ = rdp_privacy_accountant.compute_epsilon(
            self._orders, rounds * self._rdp, self.delta
        )
        return float(eps)


def skellam_noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    rounds: int,
    l2_sensitivity: float,
    l1_sensitivity: float,
) -> float:
    """The smallest noise multiplier (to 1e-3 relative) whose epsilon after ``rounds`` rounds
    of the Skellam mechanism is <= the target. Bisection on ``log sigma`` (epsilon falls as
    sigma grows)."""

    def eps(sigma: float) -> float:
        return SkellamAccountant(sigma, l2_sensitivity, l1_sensitivity, delta).epsilon(rounds)

    lo, hi = 1e-2, 1e4
    if eps(hi) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon:g} at delta {delta:.3g} over {rounds} rounds needs a "
            f"noise multiplier above {hi:g}"
        )
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + 1e-3:
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return float(hi)
