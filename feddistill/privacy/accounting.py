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
