"""Build the configured Flower strategy, wrapped for compressed updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from feddistill.codec import parse_spec
from feddistill.config import Config
from feddistill.strategies.admission import AdmissionPolicy
from feddistill.strategies.compressed import CompressedStrategy


def inner_strategy(cfg: Config, num_nodes: int) -> Strategy:
    """The plain Flower strategy named by ``server.strategy``.

    ``server.clients-per-round`` < 1 is a fraction of the connected nodes, >= 1 a count; Flower
    samples ``max(int(nodes * fraction), min_train_nodes)``, so a count sets both.
    """
    s = cfg.server
    n_train = s.num_sampled(s.clients_per_round, num_nodes)
    n_eval = 0 if s.evaluate_clients == 0 else s.num_sampled(s.evaluate_clients, num_nodes)
    common: dict[str, Any] = {
        "fraction_train": n_train / num_nodes,
        "fraction_evaluate": n_eval / num_nodes,
        "min_train_nodes": n_train,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": max(n_train, n_eval, 1),
    }
    extra: dict[str, dict[str, Any]] = {
        "fedprox": {"proximal_mu": s.proximal_mu},
        "fedavgm": {"server_learning_rate": s.lr, "server_momentum": s.momentum},
        "fedadam": {"eta": s.eta, "tau": s.tau},
        "fedyogi": {"eta": s.eta, "tau": s.tau},
        "fedadagrad": {"eta": s.eta, "tau": s.tau},
        "fedtrimmedavg": {"beta": s.trim_beta},
    }
    classes: dict[str, type[Strategy]] = {
        "fedavg": FedAvg,
        "fedprox": FedProx,
        "fedavgm": FedAvgM,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
        "fedmedian": FedMedian,
        "fedtrimmedavg": FedTrimmedAvg,
    }
    return classes[s.strategy](**common, **extra.get(s.strategy, {}))


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
    return CompressedStrategy(
        inner_strategy(cfg, num_nodes),
        schema=schema,
        initial=initial,
        uplink=parse_spec(cfg.compression.uplink),
        downlink=parse_spec(cfg.compression.downlink),
        max_payload_bytes=int(cfg.compression.max_payload_mb * 2**20),
        seed=cfg.seed,
        min_replies=cfg.server.min_replies,
        uniform=cfg.server.weighting == "uniform",
        admission=AdmissionPolicy(
            max_examples_factor=s.max_examples_factor,
            max_update_norm_ratio=s.max_update_norm_ratio,
            max_update_norm=s.max_update_norm,
            norm_action=s.update_norm_action,
        ),
        known_examples=known_examples,
    )
