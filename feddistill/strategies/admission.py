"""Admission control: what a client's reply may contain, checked before anything uses it.

Every reply comes from a device the server does not control. Flower's own aggregation
(``validate_message_reply_consistency``) *raises* on a reply that differs from the others, and
trusts every value it averages; here each reply is held to a declared schema and turned into a
dropped reply, with its node and rule named, never into a stopped server or a ruined model.
The rules (docs/robustness.md, "Admission control"), in the order they run:

1. records (`check_records`): the records `keys.ReplySchema` declares; anything else is
   dropped with a note.
2. metrics (`check_metrics`): known keys only (unknown ones dropped with a note), every
   required key present, each value one finite number (no list).
3. num-examples (`check_num_examples`): a whole number, positive for training; a claim above what
   the server knows the node holds (simulation) is capped there, and where it does not know, at
   ``server.max-examples-factor`` times the round's median claim (`examples_cap`).
4. payload size: at most what the encoder writes for this model and uplink spec
   (:func:`feddistill.codec.max_encoded_bytes`), checked before decoding.
5. update norm (`update_norm`, `norm_bound`): the L2 norm of each decoded update against
   ``server.max-update-norm`` and ``server.max-update-norm-ratio`` times the round's median norm;
   scaled down (to the round's median norm, or to the bound) or rejected per
   ``server.update-norm-action``.
6. direction (`direction_cosines`): each update's cosine with the sum of the other updates'
   directions; below ``server.min-update-cosine`` it is rejected (a sign-flipped update has an
   honest norm, so the norm bound lets it through).
7. finite after apply (`all_finite`): ``global + delta`` must stay finite.

Everything here is pure (numbers, arrays and Flower records in, verdicts out): the strategy
wrapper (:mod:`feddistill.strategies.compressed`) decides what to log and count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from feddistill import keys

NORM_ACTIONS = ("reject", "clip", "clip-to-median")


class AdmissionError(ValueError):
    """A reply broke an admission rule; ``rule`` names it (``metrics``, ``update-norm``, ...)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class AdmissionPolicy:
    """The configurable bounds (``server.*`` keys; defaults and reasons in docs/robustness.md).

    Attributes:
        max_examples_factor: a claim of more than this times the round's median claim is capped
            there, where the server does not know the node's data size; 0 = off.
        max_update_norm_ratio: updates whose L2 norm exceeds this times the round's median
            update norm are scaled down or rejected (``norm_action``); 0 = off.
        max_update_norm: the same against an absolute L2 norm; 0 = off.
        norm_action: ``clip-to-median`` (scale it down to the round's median norm: the say of a
            typical reply), ``clip`` (scale it down to the bound) or ``reject`` (drop it).
        min_update_cosine: updates whose cosine with the sum of the round's other updates'
            directions is below this are rejected (from 3 updates on); -1 = off (default).
    """

    max_examples_factor: float = 10.0
    max_update_norm_ratio: float = 5.0
    max_update_norm: float = 0.0
    norm_action: str = "clip-to-median"
    min_update_cosine: float = -1.0

    def __post_init__(self) -> None:
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(f"norm_action={self.norm_action!r}: expected one of {NORM_ACTIONS}")
        if not -1.0 <= self.min_update_cosine <= 1.0:
            raise ValueError(f"min_update_cosine={self.min_update_cosine!r}: expected [-1, 1]")
        for name in ("max_examples_factor", "max_update_norm_ratio", "max_update_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a finite number >= 0 (0 = off)")


def check_records(
    content: RecordDict, schema: keys.ReplySchema, array_key: str | None
) -> list[str]:
    """Refuse a reply without the records ``schema`` declares; name the extra ones.

    ``array_key``: the ArrayRecord that carries the payload (the strategy's ``arrayrecord_key``,
    ``keys.ARRAYS`` by default); None where the schema has no payload. Returns the records the
    schema does not declare (the caller drops them). The payload array itself is checked on the
    decoder path (dtype, shape, size).
    """
    extra = [f"ConfigRecord {name!r}" for name in content.config_records]
    extra += [f"MetricRecord {name!r}" for name in content.metric_records if name != keys.METRICS]
    extra += [f"ArrayRecord {name!r}" for name in content.array_records if name != array_key]
    if keys.METRICS not in content.metric_records:
        raise AdmissionError("records", f"reply has no MetricRecord {keys.METRICS!r}")
    if array_key is not None and array_key not in content.array_records:
        raise AdmissionError("records", f"reply has no ArrayRecord {array_key!r}")
    return extra


def check_metrics(
    values: Mapping[str, object], schema: keys.ReplySchema
) -> tuple[dict[str, float], list[str]]:
    """(the declared metrics as floats, the unknown keys dropped).

    Raises AdmissionError("metrics") for a missing required key or a declared value that is not
    one finite number: a list (Flower's MetricRecord allows them), NaN, Inf, or anything else.
    """
    known = set(schema.metric_keys)
    dropped = sorted(k for k in values if k not in known)
    missing = [k for k in schema.required if k not in values]
    if missing:
        raise AdmissionError("metrics", f"missing required metric {missing[0]!r}")
    out: dict[str, float] = {}
    for key in schema.metric_keys:
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdmissionError(
                "metrics", f"metric {key!r} must be one number, got {type(value).__name__}"
            )
        if not math.isfinite(value):
            raise AdmissionError("metrics", f"metric {key!r} is not finite: {value!r}")
        out[key] = float(value)
    return out, dropped


def check_num_examples(value: float, *, positive: bool) -> int:
    """``num-examples`` as an int: a whole number, >= 1 (``positive``) or >= 0.

    Whether the claim is believed is decided by the round (:func:`examples_cap`, or the node's
    known partition size in simulation): a claim too large only loses weight.
    """
    lowest = 1 if positive else 0
    if value != math.floor(value) or value < lowest:
        raise AdmissionError(
            "metrics",
            f"{keys.NUM_EXAMPLES} must be a whole number >= {lowest}, got {value!r}",
        )
    return int(value)


def examples_cap(claims: Sequence[int], factor: float) -> int | None:
    """The most examples a reply may claim this round: ``factor`` times the median claim.

    The low median: with two replies it is the smaller one, so one inflated claim cannot set
    its own cap. None when off (factor 0) or nothing to compare (no claims).
    """
    if factor <= 0 or not claims:
        return None
    return max(1, math.floor(factor * statistics.median_low(claims)))


def arrival_evaluation(
    reports: Sequence[tuple[float, float, int]], factor: float
) -> dict[str, float] | None:
    """The received global's validation figures over a round's training clients.

    ``reports``: each client's ``(accuracy, loss, validation rows)`` as it claims them. The
    mean is weighted by rows, as federated evaluation is, but a claim counts at most ``factor``
    times the low median claim (:func:`examples_cap`), so one client cannot claim the weight of
    the round; accuracy is clamped to [0, 1] and loss to >= 0, so a lie moves the mean by its
    bounded share only. None when no client has validation rows.
    """
    rows = [(a, loss, n) for a, loss, n in reports if n > 0]
    if not rows:
        return None
    cap = examples_cap([n for _, _, n in rows], factor)
    weights = [min(n, cap) if cap is not None else n for _, _, n in rows]
    total = sum(weights)
    return {
        keys.EVAL_ACCURACY: sum(
            w * min(max(a, 0.0), 1.0) for w, (a, _, _) in zip(weights, rows, strict=True)
        )
        / total,
        keys.EVAL_LOSS: sum(
            w * max(loss, 0.0) for w, (_, loss, _) in zip(weights, rows, strict=True)
        )
        / total,
        "examples": float(sum(n for _, _, n in rows)),
        "clients": float(len(rows)),
    }


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of an update over all its tensors, summed in float64 (float32 squares of the
    values a hostile payload may carry, up to 3.4e38, overflow to Inf)."""
    total = 0.0
    for array in delta.values():
        flat = np.ravel(array)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return math.sqrt(total)


def clip_target(norms: Sequence[float], bound: float, policy: AdmissionPolicy) -> float:
    """The norm an update over ``bound`` is scaled down to: the bound itself (``clip``) or the
    round's low median norm (``clip-to-median``), never above the bound."""
    if policy.norm_action == "clip-to-median" and norms:
        return min(bound, statistics.median_low(norms))
    return bound


def norm_bound(norms: Sequence[float], policy: AdmissionPolicy) -> float | None:
    """The largest update norm admitted this round, or None when no bound applies.

    The smaller of ``max_update_norm`` and ``max_update_norm_ratio`` times the low median of
    the round's norms (robust while fewer than half the replies are hostile; with two replies,
    the smaller norm). A median of 0 (most replies empty) gives no ratio bound: every nonzero
    update would exceed it.
    """
    bounds = []
    if policy.max_update_norm > 0:
        bounds.append(policy.max_update_norm)
    if policy.max_update_norm_ratio > 0 and norms:
        median = statistics.median_low(norms)
        if median > 0:
            bounds.append(policy.max_update_norm_ratio * median)
    return min(bounds) if bounds else None


MIN_DIRECTION_UPDATES = 3  # with two, each is judged by the other alone: no majority to follow


def direction_cosines(deltas: Sequence[np.ndarray]) -> list[float] | None:
    """Each flat update's cosine with the sum of the *other* updates' unit directions, both
    restricted to the coordinates the update shares with another; None with fewer than
    :data:`MIN_DIRECTION_UPDATES`.

    Unit directions, so that the consensus is one vote per client: an update the norm bound let
    through at five times the median would otherwise outweigh four honest ones. On the others'
    coordinates only, because top-k updates of different clients share few coordinates: over
    the whole vector every cosine of a 1%-sparse round sits within a few hundredths of 0 (the
    coordinates the others left at 0 add to the update's norm and nothing to the dot product),
    honest and flipped alike; for dense updates it is the plain cosine. An update of norm 0 (or
    not finite: the finite check refuses it) scores 0, and so does one whose others are 0 where
    it is not. Sums in float64.
    """
    if len(deltas) < MIN_DIRECTION_UPDATES:
        return None
    norms = [update_norm({"": d}) for d in deltas]
    usable = [0 < n < math.inf for n in norms]
    total = np.zeros(deltas[0].shape, dtype=np.float64)
    touched = np.zeros(deltas[0].shape, dtype=np.int32)  # how many usable updates touch each
    for d, n, ok in zip(deltas, norms, usable, strict=True):
        if ok:
            total += d.astype(np.float64) / n  # n may be past float32's range
            touched += d != 0
    cosines = []
    for d, n, ok in zip(deltas, norms, usable, strict=True):
        if not ok:
            cosines.append(0.0)
            continue
        unit = d.astype(np.float64) / n
        mine = d != 0
        others = total - unit
        shared = mine & (touched - mine > 0)  # coordinates of d that another update touches
        own = math.sqrt(float(np.dot(unit[shared], unit[shared])))
        size = math.sqrt(float(np.dot(others[shared], others[shared])))
        dot = float(np.dot(unit[shared], others[shared]))
        cosines.append(dot / (own * size) if own > 0 and size > 0 else 0.0)
    return cosines


def all_finite(arrays: Mapping[str, np.ndarray]) -> bool:
    """Every element finite. A finite sum proves it (NaN and Inf propagate); only a sum that
    overflows, or a real Inf, pays for the element-wise test."""
    with np.errstate(over="ignore"):
        for array in arrays.values():
            if not np.isfinite(np.sum(array)) and not np.isfinite(array).all():
                return False
    return True
