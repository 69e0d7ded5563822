"""Central differential privacy as one step of the compressed strategy (docs/privacy.md).

:class:`CentralPrivacy` is called by :class:`~feddistill.strategies.compressed.CompressedStrategy`
at three points and nowhere else:

* ``configure_train``: :meth:`CentralPrivacy.configure` puts this round's clip in the config,
  then :meth:`CentralPrivacy.select` keeps each message with probability ``q`` (Poisson
  sampling: the inner Flower strategy is built to address every node, see
  :func:`feddistill.strategies.factory.inner_strategy`);
* ``aggregate_train``, once on the decoded, validated replies, before the inner strategy:
  :meth:`CentralPrivacy.privatize` replaces every reply's arrays by ``global + noisy mean``
  (the same record for all), so the inner rule's average of them *is* the noisy mean and its
  server optimizer (FedAvgM's momentum, FedAdam's moments) only ever sees the privatized mean:
  post-processing;
* after the round, :meth:`CentralPrivacy.figures` gives the round's ``privacy`` entry.

Randomness: the sample and the noise come from a generator seeded from OS entropy, not from
``seed``: an observer who knew the noise could subtract it. A DP run therefore does not repeat
exactly, and a resumed run draws fresh noise.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from feddistill import keys
from feddistill.config import Config, ConfigError, PrivacyConfig
from feddistill.privacy.mechanism import (
    adaptive_clip,
    default_delta,
    noise_std,
    noisy_fraction,
    noisy_mean,
    update_noise_multiplier,
)

log = logging.getLogger("feddistill.server")


class CentralPrivacy:
    """DP-FedAvg's server side: Poisson sampling, noisy mean, adaptive clip, accounting.

    ``expected``: the clients a round samples on average (``m``, also the mean's fixed
    denominator); ``num_clients``: the population ``N`` (``q = m / N``).
    """

    def __init__(
        self,
        settings: PrivacyConfig,
        *,
        num_clients: int,
        expected: int,
        rounds: int,
        rng: np.random.Generator | None = None,
    ) -> None:
        from feddistill.privacy.accounting import RoundAccountant, noise_for_epsilon

        self.settings = settings
        self.num_clients = num_clients
        self.expected = expected
        self.sampling_rate = expected / num_clients
        self.delta = settings.delta or default_delta(num_clients)
        t0 = time.perf_counter()
        if settings.noise_multiplier > 0:
            self.noise_multiplier = settings.noise_multiplier
        else:
            self.noise_multiplier = noise_for_epsilon(
                settings.target_epsilon, self.delta, self.sampling_rate, rounds
            )
            log.info(
                "privacy: noise multiplier %.4f reaches epsilon %g at delta %.3g after %d rounds",
                self.noise_multiplier,
                settings.target_epsilon,
                self.delta,
                rounds,
            )
        self.count_stddev = 0.0
        self.update_multiplier = self.noise_multiplier
        if settings.adaptive_clip:
            self.count_stddev = settings.clipped_count_stddev or expected / 20
            try:
                self.update_multiplier = update_noise_multiplier(
                    self.noise_multiplier, self.count_stddev, expected
                )
            except ValueError:
                raise ConfigError(
                    f"invalid config privacy.adaptive-clip = true: the clipped count's noise "
                    f"(privacy.clipped-count-stddev = {self.count_stddev:g}) must exceed half "
                    f"the noise multiplier {self.noise_multiplier:.4g}; expected "
                    f"privacy.clipped-count-stddev > {self.noise_multiplier / 2:.4g}, more "
                    "clients per round, or privacy.adaptive-clip = false"
                ) from None
        self.accountant = RoundAccountant(self.sampling_rate, self.noise_multiplier, self.delta)
        self.setup_seconds = time.perf_counter() - t0
        self.clip = settings.clip
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self._rounds: dict[int, dict[str, float | None]] = {}

    @classmethod
    def from_config(cls, cfg: Config, num_clients: int) -> CentralPrivacy | None:
        if not cfg.privacy.central:
            return None
        s = cfg.server
        expected = s.num_sampled(s.clients_per_round, num_clients)
        return cls(cfg.privacy, num_clients=num_clients, expected=expected, rounds=cfg.rounds)

    # -- configure_train -----------------------------------------------------------------------
    def configure(self, config: ConfigRecord) -> None:
        config[keys.CLIP_NORM] = float(self.clip)

    def select(self, messages: Sequence[Message]) -> list[Message]:
        """Each message kept independently with probability ``q`` (Poisson sampling)."""
        keep = self.rng.random(len(messages)) < self.sampling_rate
        return [m for m, k in zip(messages, keep, strict=True) if k]

    # -- aggregate_train ----------------------------------------------------------------------
    def privatize(
        self,
        server_round: int,
        replies: list[Message],
        global_arrays: dict[str, np.ndarray],
        names: Sequence[str],
        key: str,
    ) -> list[Message]:
        """Give every reply ``global + noisy mean``; record the round's clip and clipped share.

        Replies hold dense ``global + delta_i`` (decoded by the wrapper). Each ``delta_i`` is
        clipped again here to this round's clip, so a client that skipped clipping (or the
        codec's rounding) cannot raise the sensitivity above it.
        """
        t0 = time.perf_counter()
        clip = self.clip
        deltas = []
        clipped = 0
        for msg in replies:
            record = msg.content.array_records[key]
            deltas.append({n: record[n].numpy() - global_arrays[n] for n in names})
            metrics = msg.content.metric_records[keys.METRICS]
            bit = metrics.get(keys.NORM_BIT)
            clipped += int(isinstance(bit, int | float) and bit >= 0.5)  # untrusted: 0 or 1
            if keys.NORM_BIT in metrics:  # the exact count is private: keep it out of results
                del metrics[keys.NORM_BIT]
        mean = noisy_mean(
            deltas,
            names,
            global_arrays,
            clip=clip,
            noise_multiplier=self.update_multiplier,
            denominator=self.expected,
            rng=self.rng,
        )
        noisy = ArrayRecord({n: Array(global_arrays[n] + mean[n]) for n in names})
        for msg in replies:
            msg.content[key] = noisy
        fraction: float | None = clipped / len(replies) if replies else None
        if self.settings.adaptive_clip:
            # Andrew et al.: the unclipped share, over the expected count, with its own noise.
            unclipped = noisy_fraction(
                len(replies) - clipped, self.count_stddev, self.expected, self.rng
            )
            fraction = 1.0 - unclipped
            self.clip = adaptive_clip(
                clip, unclipped, self.settings.target_quantile, self.settings.clip_lr
            )
        self._rounds[server_round] = {
            "clip": clip,
            "clipped_fraction": fraction,
            "noise_std": noise_std(self.update_multiplier, clip, self.expected),
            "seconds_mechanism": time.perf_counter() - t0,
        }
        return replies

    # -- records --------------------------------------------------------------------------------
    def figures(self, server_round: int) -> dict[str, Any]:
        """The ``privacy`` entry of round ``server_round`` in results.json.

        Epsilon counts every round so far, whether or not a reply came back: the round was
        run (its sample drawn) either way.
        """
        t0 = time.perf_counter()
        epsilon = self.accountant.epsilon(server_round)
        seconds = time.perf_counter() - t0
        done = self._rounds.get(server_round, {})
        return {
            "epsilon": _finite(epsilon),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": done.get("clip", self.clip),
            "clipped_fraction": done.get("clipped_fraction"),
            "sampling_rate": self.sampling_rate,
            "noise_std": done.get("noise_std"),
            "seconds_mechanism": done.get("seconds_mechanism"),
            "seconds_accounting": seconds,
        }

    def guarantee(self, rounds: int) -> str:
        """The run's guarantee in one sentence a non-specialist can read."""
        eps = self.accountant.epsilon(rounds)
        return (
            f"(epsilon={eps:.3g}, delta={self.delta:.3g})-DP for each client's whole dataset, "
            f"against anyone who sees the final model and the aggregates of all {rounds} rounds "
            f"(server trusted; Poisson sampling at rate {self.sampling_rate:.3g}, noise "
            f"multiplier {self.noise_multiplier:.4g}, clip {self.settings.clip:g}"
            + (", adaptive" if self.settings.adaptive_clip else "")
            + ")"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the (adaptive) clip. Epsilon follows from the round."""
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class DistributedPrivacy:
    """Distributed DP's server side: the noise multiplier, the accountant, the figures.

    The clients add the noise (:mod:`feddistill.secagg.distributed`); the server only picks
    sigma (from ``privacy.noise-multiplier``, or for ``privacy.target-epsilon`` over the planned
    rounds), announces it with each round's setup, and reports epsilon. ``values``: the most
    coordinates a round's pattern holds, which with ``secure.bits`` fixes the sensitivity.
    """

    def __init__(
        self,
        settings: PrivacyConfig,
        *,
        bits: int,
        values: int,
        num_clients: int,
        rounds: int,
    ) -> None:
        from feddistill.privacy.accounting import SkellamAccountant, skellam_noise_for_epsilon
        from feddistill.secagg.distributed import NoisyField

        self.settings = settings
        self.delta = settings.delta or default_delta(num_clients)
        unit = NoisyField(bits, settings.clip, values, 1, 1, 1.0)  # sensitivities only
        self.l2_sensitivity, self.l1_sensitivity = unit.l2_sensitivity, unit.l1_sensitivity
        t0 = time.perf_counter()
        if settings.noise_multiplier > 0:
            self.noise_multiplier = settings.noise_multiplier
        else:
            try:
                self.noise_multiplier = skellam_noise_for_epsilon(
                    settings.target_epsilon,
                    self.delta,
                    rounds,
                    self.l2_sensitivity,
                    self.l1_sensitivity,
                )
            except ValueError as err:
                raise ConfigError(f"invalid config privacy.target-epsilon: {err}") from None
            log.info(
                "privacy: noise multiplier %.4f reaches epsilon %g at delta %.3g after %d rounds",
                self.noise_multiplier,
                settings.target_epsilon,
                self.delta,
                rounds,
            )
        self.accountant = SkellamAccountant(
            self.noise_multiplier, self.l2_sensitivity, self.l1_sensitivity, self.delta
        )
        self.setup_seconds = time.perf_counter() - t0
        self._rounds: dict[int, dict[str, float | None]] = {}

    def record(self, server_round: int, noise_std: float) -> None:
        """The round's noise on the released mean (std per coordinate, in weight units)."""
        self._rounds[server_round] = {"noise_std": noise_std}

    def figures(self, server_round: int) -> dict[str, Any]:
        """The ``privacy`` entry of round ``server_round``: the keys of central DP's, with no
        sampling rate (no amplification is claimed) and no clipped share (not released)."""
        t0 = time.perf_counter()
        epsilon = self.accountant.epsilon(server_round)
        return {
            "epsilon": _finite(epsilon),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.settings.clip,
            "clipped_fraction": None,
            "sampling_rate": None,
            "noise_std": self._rounds.get(server_round, {}).get("noise_std"),
            "seconds_mechanism": None,
            "seconds_accounting": time.perf_counter() - t0,
        }

    def guarantee(self, rounds: int) -> str:
        eps = self.accountant.epsilon(rounds)
        return (
            f"(epsilon={eps:.3g}, delta={self.delta:.3g})-DP for each client's whole dataset, "
            f"against the server and anyone who sees the final model and the sums of all "
            f"{rounds} rounds (server not trusted: distributed Skellam noise inside secure "
            f"aggregation, noise multiplier {self.noise_multiplier:.4g}, clip "
            f"{self.settings.clip:g}, a client counted in every round, no sampling "
            "amplification; per-client evaluation metrics are not covered)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
