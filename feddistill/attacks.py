"""Hostile clients for simulation: the maths of each attack, as pure functions.

``attack.*`` (:class:`feddistill.config.AttackConfig`) turns a fraction of the simulated clients
hostile; the ClientApp's train path (:func:`feddistill.client.work.train_round`) calls
:func:`is_hostile` and then one of the functions below at the edge: on the dense update before
it is encoded (model poisoning), on the client's labels before it trains (label flipping), or on
the reply (garbage payload, metric tampering, inflated ``num-examples``). The config refuses
them in deployment mode, and with ``attack.kind = "none"`` none of this runs.

The attacks follow the usual threat models of the robust-aggregation papers: sign flip and
scaling (Blanchard et al. 2017, "Byzantine tolerant gradient descent"; Baruch et al. 2019),
Gaussian noise, label flipping (Fang et al. 2020), free riders that send nothing useful (Lin et
al. 2019), and replay of a stale update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

Update = dict[str, np.ndarray]

# Kinds that change the dense update before encoding.
UPDATE_KINDS = ("sign-flip", "scale", "noise", "free-rider", "replay")
# The metric a hostile client adds ("extra-metric") or drops ("missing-metric").
EXTRA_METRIC = "attack-extra"
DROPPED_METRIC = "train-loss"


def hostile_count(num_clients: int, fraction: float) -> int:
    """Hostile partitions for ``fraction`` of ``num_clients``, rounded to the nearest client."""
    return min(num_clients, round(fraction * num_clients))


def hostile_partitions(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The hostile partition ids: a seeded permutation's first :func:`hostile_count`.

    A function of its arguments only, so the server, the bench and every client process agree.
    """
    order = np.random.default_rng(seed).permutation(num_clients)
    return frozenset(int(p) for p in order[: hostile_count(num_clients, fraction)])


def is_hostile(partition_id: int, num_clients: int, fraction: float, seed: int) -> bool:
    return partition_id in hostile_partitions(num_clients, fraction, seed)


def attack_seed(seed: int, server_round: int, client_key: str) -> int:
    """Per client and round, stable across processes (unlike ``hash()``)."""
    mix = hashlib.sha256(f"attack/{seed}/{server_round}/{client_key}".encode()).hexdigest()
    return int(mix[:8], 16)


def sign_flip(update: Mapping[str, np.ndarray]) -> Update:
    """``-u``: pushes the global model uphill by as much as honest clients push it down."""
    return {k: -v for k, v in update.items()}


def scaled(update: Mapping[str, np.ndarray], factor: float) -> Update:
    """``factor * u`` (x100, x1e6): one reply outweighs all the others in a mean.

    Computed in float64 and clipped to the float32 range: the largest finite value a
    well-formed payload can carry, not an overflow on the client.
    """
    big = float(np.finfo(np.float32).max)
    return {
        k: np.clip(v.astype(np.float64) * factor, -big, big).astype(v.dtype)
        for k, v in update.items()
    }


def gaussian_noise(update: Mapping[str, np.ndarray], std: float, seed: int) -> Update:
    """``u + N(0, std^2)`` on every element, drawn in a fixed key order from ``seed``.

    Returned in the update's own key order: the encoder's schema follows it, and a reordered
    update is a payload for another model, which the server refuses before the norm rule this
    attack is there to test.
    """
    rng = np.random.default_rng(seed)
    noisy = {
        k: (update[k] + rng.normal(0.0, std, size=update[k].shape)).astype(update[k].dtype)
        for k in sorted(update)
    }
    return {k: noisy[k] for k in update}


def zero_update(update: Mapping[str, np.ndarray]) -> Update:
    """Free rider: takes the global model and contributes nothing, yet claims its examples."""
    return {k: np.zeros_like(v) for k, v in update.items()}


def flip_labels(labels: list[int], num_classes: int) -> list[int]:
    """``y -> C - 1 - y``: every example taught as another class (for C = 2, the other one)."""
    return [num_classes - 1 - int(y) for y in labels]


def garbage_payload(size: int, seed: int) -> np.ndarray:
    """``size`` random bytes in place of the encoded update (at least one byte)."""
    return np.random.default_rng(seed).integers(0, 256, size=max(size, 1), dtype=np.uint8)


def tamper_metrics(metrics: Mapping[str, float], kind: str) -> dict[str, float]:
    """One key more (``extra-metric``) or one fewer (``missing-metric``) than honest replies."""
    out = dict(metrics)
    if kind == "extra-metric":
        out[EXTRA_METRIC] = 1.0
    elif kind == "missing-metric":
        out.pop(DROPPED_METRIC, None)
    else:
        raise ValueError(f"not a metric attack: {kind!r}")
    return out


def inflate_examples(metrics: Mapping[str, float], factor: float) -> dict[str, float]:
    """``num-examples * factor``: the reply takes (almost) all of an example-weighted mean."""
    out = dict(metrics)
    out["num-examples"] = float(out["num-examples"]) * factor
    return out


def attack_update(
    kind: str,
    update: Mapping[str, np.ndarray],
    *,
    scale: float = 100.0,
    noise_std: float = 1.0,
    seed: int = 0,
    replayed: Mapping[str, np.ndarray] | None = None,
) -> Update:
    """The update a client of ``kind`` sends instead of ``update`` (dense, before encoding).

    ``replayed``: for ``replay``, the update this client sent first in the run (None: this is
    its first round, and it sends the honest one, which it then keeps replaying).
    """
    if kind == "sign-flip":
        return sign_flip(update)
    if kind == "scale":
        return scaled(update, scale)
    if kind == "noise":
        return gaussian_noise(update, noise_std, seed)
    if kind == "free-rider":
        return zero_update(update)
    if kind == "replay":
        return dict(update) if replayed is None else {k: replayed[k].copy() for k in update}
    raise ValueError(f"not an update attack: {kind!r}; expected one of {UPDATE_KINDS}")
