"""The aggregation strategies offered, declared once, and how many replies the robust ones need.

``server.strategy`` names one entry of :data:`STRATEGIES`: the Flower class it builds (from
``flwr.serverapp.strategy``) and which ``server.*`` fields become which of its arguments. The
config validates names against it and :mod:`feddistill.strategies.factory` builds from it, so a
strategy is added here and nowhere else. This module imports no Flower: the config (parsed on
clients too) stays free of it, and a test checks every declared class and argument against the
installed Flower.

A robust rule only tolerates attackers with enough replies in the round. :func:`requirement`
says how many, and why, from the settings alone (pure arithmetic, unit-tested):

* FedMedian: 3. Over 2 replies the coordinate-wise median is their mean; over 1, that reply.
* FedTrimmedAvg: Flower trims ``int(beta * n)`` of the ``n`` replies from each end of every
  coordinate, so it trims nothing until ``beta * n >= 1``.
* Krum (Blanchard et al. 2017, Prop. 1): ``n > 2f + 2``. Flower does not check it; it scores each
  reply by its ``max(1, n - f - 2)`` nearest neighbours and so picks silently from too few.
* MultiKrum: as Krum, and the ``m`` averaged replies must leave out at least ``max(f, 1)``, or
  an attacker is always among them (``m = n``: the plain mean). ``m = 0`` here means per round
  ``n - f``, the most the paper allows.
* Bulyan (El Mhamdi et al. 2018): ``n >= 4f + 3``, Flower's own check (it skips the round
  below it, unrecorded); with ``f = 0`` it is exactly the coordinate-wise mean of all replies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from feddistill.config import ServerConfig


@dataclass(frozen=True)
class StrategyChoice:
    """One value of ``server.strategy``.

    ``flower``: the class name in ``flwr.serverapp.strategy``. ``params``: pairs of (Flower
    argument, ``ServerConfig`` field) passed at build. ``robust``: the rule discards or
    down-weights outlying replies, so it needs a minimum of replies (:func:`requirement`).
    """

    flower: str
    params: tuple[tuple[str, str], ...] = ()
    robust: bool = False

    @property
    def composes_with_dp(self) -> bool:
        """Whether central DP noise on the mean of clipped updates makes this rule private.

        The Gaussian mechanism privatizes the *mean* (its sensitivity to one client is
        ``C / m``); a rule that then only moves the global along that noisy mean (FedAvg,
        FedProx, FedAvgM, the adaptive FedAdam/FedYogi/FedAdagrad) is post-processing of it.
        The robust rules need each client's update on its own (a median, trimmed ends,
        Krum's distances): they would see the clipped but un-noised updates, whose
        sensitivity is the whole update, so no noise of the mean covers them.
        """
        return not self.robust


_OPT = (("eta", "eta"), ("tau", "tau"))
_F = ("num_malicious_nodes", "num_malicious")

STRATEGIES: Mapping[str, StrategyChoice] = MappingProxyType(
    {
        "fedavg": StrategyChoice("FedAvg"),
        "fedprox": StrategyChoice("FedProx", (("proximal_mu", "proximal_mu"),)),
        "fedavgm": StrategyChoice(
            "FedAvgM", (("server_learning_rate", "lr"), ("server_momentum", "momentum"))
        ),
        "fedadam": StrategyChoice("FedAdam", _OPT),
        "fedyogi": StrategyChoice("FedYogi", _OPT),
        "fedadagrad": StrategyChoice("FedAdagrad", _OPT),
        "fedmedian": StrategyChoice("FedMedian", robust=True),
        "fedtrimmedavg": StrategyChoice("FedTrimmedAvg", (("beta", "trim_beta"),), robust=True),
        "krum": StrategyChoice("Krum", (_F,), robust=True),
        "multikrum": StrategyChoice(
            "MultiKrum", (_F, ("num_nodes_to_select", "multikrum_select")), robust=True
        ),
        "bulyan": StrategyChoice("Bulyan", (_F,), robust=True),
    }
)


# The uplink a robust rule needs: every client of a round sends the same random tenth of each
# tensor (in runs of 16, so its positions cost 0.3 bits a value), where top-k sends each client's
# own 1% and a coordinate-wise median of those is zero almost everywhere
# (measured: docs/robustness-bench.md, "2026-12-07").
SHARED_UPLINK = "pattern:0.1+block:16+q4+ef"


class RobustSettingError(ValueError):
    """The robust rule cannot hold at any number of replies (the message says why)."""


@dataclass(frozen=True)
class Requirement:
    """The fewest replies with which a robust rule does what it promises.

    ``rule``: the rule and its settings, in words, for messages. ``select_all_but``: set for
    MultiKrum with ``server.multikrum-select = 0``: each round averages ``n - select_all_but``.
    """

    needed: int
    rule: str
    select_all_but: int | None = None

    def shortfall(self, replies: int) -> str | None:
        """Why ``replies`` are too few for the rule, or None when they suffice."""
        if replies >= self.needed:
            return None
        return f"{replies} replies < {self.needed} needed by {self.rule}"


def trim_needed(beta: float) -> int:
    """Fewest replies ``n`` for which Flower's trimmed mean trims: ``int(beta * n) >= 1``."""
    n = max(1, math.floor(1 / beta))
    while int(beta * n) < 1:  # the same float expression Flower evaluates
        n += 1
    return n


def requirement(s: ServerConfig) -> Requirement | None:
    """What ``s.strategy`` needs per round (None: not a robust rule).

    Raises :class:`RobustSettingError` for settings that make the rule a plain mean whatever
    the number of replies.
    """
    f = s.num_malicious
    if s.strategy == "fedmedian":
        return Requirement(3, "FedMedian (over 2 replies the median is their mean)")
    if s.strategy == "fedtrimmedavg":
        if s.trim_beta == 0:
            raise RobustSettingError(
                "server.trim-beta = 0 trims nothing at any number of replies; expected "
                "server.trim-beta in (0, 0.5), "
                "or server.strategy = 'fedavg' with server.weighting = 'uniform' for a plain mean"
            )
        needed = trim_needed(s.trim_beta)
        rule = f"FedTrimmedAvg with server.trim-beta = {s.trim_beta:g} (trims int(beta * n) a side)"
        return Requirement(needed, rule)
    if s.strategy == "krum":
        return Requirement(2 * f + 3, f"Krum with server.num-malicious = {f} (n > 2f + 2)")
    if s.strategy == "multikrum":
        m = s.multikrum_select
        if m == 0:
            if f == 0:
                raise RobustSettingError(
                    "server.num-malicious = 0 with server.multikrum-select = 0 (n - f per round) "
                    "averages every reply; "
                    "expected server.num-malicious >= 1 or server.multikrum-select >= 1"
                )
            rule = f"MultiKrum with server.num-malicious = {f} (n > 2f + 2)"
            return Requirement(2 * f + 3, rule, select_all_but=f)
        needed = max(2 * f + 3, m + max(f, 1))
        rule = (
            f"MultiKrum with server.num-malicious = {f}, server.multikrum-select = {m} "
            "(n > 2f + 2 and n >= m + max(f, 1))"
        )
        return Requirement(needed, rule)
    if s.strategy == "bulyan":
        if f == 0:
            raise RobustSettingError(
                "server.num-malicious = 0 makes Bulyan the plain mean of every reply; "
                "expected server.num-malicious >= 1"
            )
        return Requirement(4 * f + 3, f"Bulyan with server.num-malicious = {f} (n >= 4f + 3)")
    return None


def what_works(s: ServerConfig, replies: int) -> str | None:
    """Other settings of ``s.strategy`` that would hold with ``replies`` per round, if any."""
    f, n = s.num_malicious, replies
    if n < 3:
        return None  # not even a median of 3
    if s.strategy == "fedtrimmedavg":
        return f"server.trim-beta >= {1 / n:.4g} (and < 0.5)"
    f_max = (n - 3) // 2  # Krum: n > 2f + 2
    if s.strategy == "krum" or (s.strategy == "multikrum" and s.multikrum_select == 0):
        return f"server.num-malicious <= {f_max}"
    if s.strategy == "multikrum":
        if f > f_max:
            return f"server.num-malicious <= {f_max}"
        return f"server.multikrum-select <= {n - max(f, 1)} (or 0: n - f per round)"
    if s.strategy == "bulyan" and n >= 7:
        return f"server.num-malicious <= {(n - 3) // 4}"
    return None
