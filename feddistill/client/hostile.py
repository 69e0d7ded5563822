"""Where a simulated hostile client departs from the honest train path (``attack.*``).

Thin glue between :func:`feddistill.client.work.train_round` and the pure attacks of
:mod:`feddistill.attacks`: each function returns its input untouched unless this node is one of
the configured hostile partitions, so an honest run never reaches the maths. Only simulated
nodes (those with a ``partition-id``) can be hostile; the config refuses attacks in deployment.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from feddistill import attacks, keys
from feddistill.config import Config


def is_hostile(cfg: Config, node_config: dict[str, Any]) -> bool:
    a = cfg.attack
    if not a.active or cfg.mode != "simulation" or keys.PARTITION_ID not in node_config:
        return False
    pid = int(node_config[keys.PARTITION_ID])
    return attacks.is_hostile(pid, cfg.data.num_clients, a.fraction, a.seed)


def training_data(cfg: Config, num_classes: int, data: Any) -> Any:
    """Label flipping: the client trains (teacher and student) on flipped labels."""
    if cfg.attack.kind != "label-flip":
        return data
    flipped = dataclasses.replace(
        data.train, labels=attacks.flip_labels(data.train.labels, num_classes)
    )
    return dataclasses.replace(data, train=flipped)


def _replay_path(cfg: Config, state_root: Path) -> Path:
    # Scoped to the run's whole config (output folder included): another run sharing the
    # cache never replays this one's update.
    run = hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]
    return state_root / f"attack-replay-{run}.npz"


def update(
    cfg: Config,
    dense: dict[str, np.ndarray],
    state_root: Path,
    server_round: int,
    client_key: str,
) -> dict[str, np.ndarray]:
    """The dense update a hostile client encodes instead of ``dense``."""
    a = cfg.attack
    if a.kind not in attacks.UPDATE_KINDS:
        return dense
    replayed = None
    if a.kind == "replay":
        path = _replay_path(cfg, state_root)
        if path.exists():
            with np.load(path) as z:
                replayed = {k: z[k] for k in z.files}
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **dense)
    return attacks.attack_update(
        a.kind,
        dense,
        scale=a.scale,
        noise_std=a.noise_std,
        seed=attacks.attack_seed(a.seed, server_round, client_key),
        replayed=replayed,
    )


def reply(
    cfg: Config,
    payload: np.ndarray,
    metrics: dict[str, float],
    server_round: int,
    client_key: str,
) -> tuple[np.ndarray, dict[str, float]]:
    """Payload and metric attacks on the reply, after encoding."""
    a = cfg.attack
    if a.kind == "garbage":
        seed = attacks.attack_seed(a.seed, server_round, client_key)
        return attacks.garbage_payload(payload.size, seed), metrics
    if a.kind in ("extra-metric", "missing-metric"):
        return payload, attacks.tamper_metrics(metrics, a.kind)
    if a.kind == "inflate-examples":
        return payload, attacks.inflate_examples(metrics, a.inflate)
    return payload, metrics


def tampers_metrics(cfg: Config, node_config: dict[str, Any]) -> bool:
    """This node sends a metric record off the declared schema (``extra-metric``,
    ``missing-metric``): its reply must skip the honest client's own schema check, which a
    real attacker would not run, or the attack would stop at the client and never reach the
    server's admission control it is there to test."""
    kinds = ("extra-metric", "missing-metric")
    return cfg.attack.kind in kinds and is_hostile(cfg, node_config)
