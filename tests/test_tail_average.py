"""The averaged output model (server.average-last): the running sum, its state and resume rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feddistill.config import ConfigError, parse_config
from feddistill.server.checkpoint import ServerState, load_state, save_state
from feddistill.server.run import _tail_average
from feddistill.server.tail import TailAverage, window_start


def _globals(r: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), float(r), dtype=np.float32),
        "b": np.arange(3, dtype=np.float32) * r,
    }


def test_window_and_mean_of_the_last_rounds() -> None:
    assert window_start(30, 10) == 21
    assert window_start(5, 10) == 1  # fewer rounds than the window: all of them
    tail = TailAverage(window_start(5, 3))
    for r in range(1, 6):
        tail.add(r, _globals(r))
    assert tail.rounds == (3, 5)
    mean = tail.mean(like=_globals(5))
    np.testing.assert_array_equal(mean["w"], np.full((2, 3), 4.0, dtype=np.float32))
    np.testing.assert_array_equal(mean["b"], np.arange(3, dtype=np.float32) * 4)
    assert mean["w"].dtype == np.float32
    with pytest.raises(ValueError, match="in order"):
        tail.add(7, _globals(7))
    with pytest.raises(ValueError, match="no rounds"):
        TailAverage(3).mean(like=_globals(1))


def test_tail_survives_the_state_file(tmp_path: Path) -> None:
    tail = TailAverage(2)
    for r in (1, 2, 3):
        tail.add(r, _globals(r))
    path = tmp_path / "server.npz"
    save_state(path, ServerState(round=3, global_arrays=_globals(3), tail=tail.state()))
    saved = load_state(path)
    assert saved is not None and saved.tail is not None
    back = TailAverage.from_state(saved.tail)
    assert back.rounds == (2, 3)
    back.add(4, _globals(4))
    np.testing.assert_array_equal(back.mean(like=_globals(4))["w"], np.full((2, 3), 3.0))
    # Before the window opens the state holds no arrays, and comes back empty.
    save_state(path, ServerState(round=1, global_arrays=_globals(1), tail=TailAverage(2).state()))
    saved = load_state(path)
    assert saved is not None and saved.tail is not None and saved.tail["total"] == {}


def test_resume_keeps_the_window_or_refuses() -> None:
    cfg = parse_config({"rounds": 6, "server.average-last": 3})
    assert _tail_average(parse_config({"rounds": 6}), 0, None) is None
    fresh = _tail_average(cfg, 0, None)
    assert fresh is not None and fresh.first == 4
    summed = TailAverage(4)
    for r in (4, 5):
        summed.add(r, _globals(r))
    resumed = _tail_average(cfg, 5, summed.state())
    assert resumed is not None and resumed.rounds == (4, 5)
    # Not yet in the window: rounds may still change.
    assert _tail_average(cfg.with_overrides({"rounds": 8}), 2, TailAverage(4).state()) is not None
    with pytest.raises(ConfigError, match="rounds = 8"):
        _tail_average(cfg.with_overrides({"rounds": 8}), 5, summed.state())
    with pytest.raises(ConfigError, match=r"server\.average-last"):
        _tail_average(cfg, 5, None)  # rounds 4 and 5 were never summed
