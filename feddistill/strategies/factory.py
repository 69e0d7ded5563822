"""Build the configured Flower strategy, wrapped for compressed updates."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import flwr.serverapp.strategy as flower_strategies
import numpy as np
from flwr.serverapp.strategy import Strategy

from feddistill.aggregation import SHARED_UPLINK, STRATEGIES, requirement
from feddistill.config import Config, ConfigError
from feddistill.secagg.quantize import SecAggError
from feddistill.strategies.admission import AdmissionPolicy
from feddistill.strategies.compressed import CompressedStrategy, RoundTraffic
from feddistill.strategies.private import CentralPrivacy, DistributedPrivacy
from feddistill.strategies.robust import ReplyFloor
from feddistill.strategies.secure import SecureAggregation

log = logging.getLogger("feddistill.server")


def inner_strategy(cfg: Config, num_nodes: int) -> Strategy:
    """The plain Flower strategy named by ``server.strategy`` (see :data:`STRATEGIES`).

    ``server.clients-per-round`` < 1 is a fraction of the connected nodes, >= 1 a count; Flower
    samples ``max(int(nodes * fraction), min_train_nodes)``, so a count sets both. With privacy
    on, training addresses every node and the privacy step samples (Poisson).
    """
    s = cfg.server
    n_train = s.num_sampled(s.clients_per_round, num_nodes)
    if cfg.privacy.central:
        # Poisson sampling: address every node; CentralPrivacy.select keeps each with rate q.
        n_train = num_nodes
    n_eval = 0 if s.evaluate_clients == 0 else s.num_sampled(s.evaluate_clients, num_nodes)
    choice = STRATEGIES[s.strategy]
    kwargs: dict[str, Any] = {
        "fraction_train": n_train / num_nodes,
        "fraction_evaluate": n_eval / num_nodes,
        "min_train_nodes": n_train,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": max(n_train, n_eval, 1),
        **{arg: getattr(s, name) for arg, name in choice.params},
    }
    if s.strategy == "multikrum" and s.multikrum_select == 0:
        # n - f with every sampled client replying; ReplyFloor sets it from each round's count.
        kwargs["num_nodes_to_select"] = n_train - s.num_malicious
    return getattr(flower_strategies, choice.flower)(**kwargs)


def build_strategy(
    cfg: Config,
    num_nodes: int,
    schema: list[tuple[str, tuple[int, ...]]],
    initial: dict[str, np.ndarray],
    known_examples: Callable[[int], tuple[int, int] | None] | None = None,
) -> CompressedStrategy:
    """``known_examples``: node -> (training, validation) examples it holds, where the server
    knows (simulation); admission control refuses larger ``num-examples`` claims."""
    s = cfg.server
    inner = inner_strategy(cfg, num_nodes)
    req = requirement(cfg.server)
    if req is not None:
        _log_tolerance(cfg, num_nodes, req.needed, req.rule)
        _warn_unshared_coordinates(cfg)
        inner = ReplyFloor(inner, req)
    strategy = CompressedStrategy(
        inner,
        schema=schema,
        initial=initial,
        uplink=cfg.compression.uplink_spec,
        downlink=cfg.compression.downlink_spec,
        chained=cfg.compression.chained,
        max_payload_bytes=int(cfg.compression.max_payload_mb * 2**20),
        seed=cfg.seed,
        min_replies=cfg.server.min_replies,
        uniform=cfg.server.weighting == "uniform",
        admission=AdmissionPolicy(
            max_examples_factor=s.max_examples_factor,
            # With privacy on, the server clips every update to privacy.clip instead: a bound
            # taken from the round's median norm, or a direction judged against the round's
            # other updates, would let one client's data decide whether another's update
            # counts, which breaks the sensitivity the accountant assumes.
            max_update_norm_ratio=0.0 if cfg.privacy.central else s.max_update_norm_ratio,
            max_update_norm=s.max_update_norm,
            norm_action=s.update_norm_action,
            min_update_cosine=-1.0 if cfg.privacy.central else s.min_update_cosine,
        ),
        known_examples=known_examples,
        privacy=CentralPrivacy.from_config(cfg, num_nodes),
        secure=secure_aggregation(cfg, num_nodes, schema),
        step=s.robust_step if STRATEGIES[s.strategy].robust else 1.0,
    )
    if isinstance(inner, ReplyFloor):

        def record(server_round: int, reason: str) -> None:
            strategy.traffic.setdefault(server_round, RoundTraffic()).round_failure = reason

        inner.on_shortfall = record
    return strategy


def secure_aggregation(
    cfg: Config, num_nodes: int, schema: list[tuple[str, tuple[int, ...]]]
) -> SecureAggregation | None:
    """The secure-aggregation steps (with distributed DP's noise settings when asked);
    a setting whose group cannot hold a round of ``num_nodes`` is refused here, at start."""
    if not cfg.secure.aggregation:
        return None
    size = sum(math.prod(shape) for _, shape in schema)
    secure = SecureAggregation(cfg.secure, size, cfg.server.round_timeout, seed=cfg.seed)
    if cfg.privacy.distributed:
        secure.privacy = DistributedPrivacy(
            cfg.privacy,
            bits=cfg.secure.bits,
            values=secure.max_values,
            num_clients=num_nodes,
            rounds=cfg.rounds,
        )
    n = max(3, cfg.server.num_sampled(cfg.server.clients_per_round, num_nodes))
    try:
        secure.field(n, cfg.secure.threshold(n), secure.max_values)
    except SecAggError as err:
        raise ConfigError(f"invalid config secure.bits = {cfg.secure.bits}: {err}") from None
    return secure


def _warn_unshared_coordinates(cfg: Config) -> None:
    """A robust rule over updates that each keep their own coordinates degenerates.

    With ``topk:0.01`` every client sends the 1% it changed most, mostly not the 1% of the
    others: a coordinate-wise median or trimmed mean of 10 such updates is zero almost
    everywhere, and Krum's distances are their norms. Measured on the embedded corpus: every
    robust rule stays at chance where FedAvg learns (docs/robustness-bench.md). A warning, not
    an error: a dense enough top-k (or a federation whose updates agree) may still work.
    """
    spec = cfg.compression.uplink_spec
    own = spec.select == "thresh" or (spec.select in ("topk", "gtopk") and spec.keep < 0.5)
    if not own:
        return
    log.warning(
        "server.strategy = %r aggregates each coordinate (or each update) across the replies, "
        "but compression.uplink = %r lets each client send its own coordinates, so most "
        "coordinates come from one client only and the rule moves the model hardly at all "
        "(measured: chance accuracy on the embedded corpus); send shared coordinates with "
        "compression.uplink = %r (docs/robustness-bench.md)",
        cfg.server.strategy,
        cfg.compression.uplink,
        SHARED_UPLINK,
    )


def _log_tolerance(cfg: Config, num_nodes: int, needed: int, rule: str) -> None:
    """Say once, at start, how many missing replies a round of the robust rule survives.

    The config already refused settings that fail with every client replying; what is left
    can only fail through dropouts, timeouts or rejected replies. That is a warning while the
    server would otherwise accept rounds the rule cannot aggregate (server.min-replies below
    what it needs), and a note once the user has raised server.min-replies to match.
    """
    s = cfg.server
    expected = s.num_sampled(s.clients_per_round, num_nodes)
    level = logging.WARNING if needed > s.min_replies else logging.INFO
    log.log(
        level,
        "server.strategy = %r: %s needs %d replies per round and a round samples %d, so it "
        "survives %d missing (dropouts, timeouts, rejected replies); a round with fewer is "
        "skipped and keeps the global model (raise server.clients-per-round to survive more)",
        s.strategy,
        rule,
        needed,
        expected,
        expected - needed,
    )
