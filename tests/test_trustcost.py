"""The trust-cost timer wraps what it names and puts it back."""

from __future__ import annotations

import collections
import types

import numpy as np

from feddistill.bench.trustcost import HOOKS, TRUST_CALLS, instrument
from feddistill.strategies import compressed


def test_every_timed_call_exists_where_the_server_looks_it_up() -> None:
    for owner, name in TRUST_CALLS:
        assert callable(getattr(owner, name)), name
    for hook in HOOKS:
        assert callable(getattr(compressed.CompressedStrategy, hook)), hook


def test_instrument_counts_and_times_calls_and_restores() -> None:
    owner = types.SimpleNamespace(norm=lambda v: float(np.linalg.norm(v)))
    original = owner.norm
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    restore = instrument(((owner, "norm"),), totals, counts)
    assert owner.norm is not original
    assert owner.norm(np.array([3.0, 4.0])) == 5.0 and owner.norm(np.zeros(2)) == 0.0
    assert counts["norm"] == 2 and totals["norm"] > 0
    restore()
    assert owner.norm is original
