"""The averaged output model (server.average-last): the running sum, its state and resume rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feddistill.config import ConfigError, parse_config
from feddistill.server.checkpoint import ServerState, load_state, save_state
from feddistill.server.lifecycle import RoundCheckpoints
from feddistill.server.output_model import (
    TailAverage,
    still_improving,
    window_size,
    window_start,
)


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
    save_state(
        path, ServerState(round=3, global_arrays=_globals(3), parts={"tail": tail.state_dict()})
    )
    saved = load_state(path)
    assert saved is not None
    back = TailAverage(1)
    back.load_state_dict(saved.parts["tail"])
    assert back.rounds == (2, 3)
    back.add(4, _globals(4))
    np.testing.assert_array_equal(back.mean(like=_globals(4))["w"], np.full((2, 3), 3.0))
    # Before the window opens the state holds no arrays, and comes back empty.
    empty = {"tail": TailAverage(2).state_dict()}
    save_state(path, ServerState(round=1, global_arrays=_globals(1), parts=empty))
    saved = load_state(path)
    assert saved is not None and saved.parts["tail"]["total"] == {}


def test_fraction_of_the_rounds_is_rounded_up() -> None:
    assert window_size(30, 0.25) == 8 and window_start(30, 0.25) == 23
    assert window_size(20, 0.25) == 5 and window_size(2, 0.25) == 1
    assert window_size(10, 3) == 3 and window_size(2, 5) == 2
    with pytest.raises(ConfigError, match=r"server\.average-last"):
        parse_config({"server.average-last": 2.5})


def _checkpoint(folder: Path, r: int) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    save_file(_globals(r), str(folder / f"round-{r:04d}.safetensors"))


def _realigned(cfg, done: int, saved: TailAverage, ckpt: RoundCheckpoints) -> TailAverage:
    """What ServerRun.resume_or_start does: load the saved sum, then fit it to the window."""
    tail = TailAverage(window_start(cfg.rounds, cfg.server.average_last))
    tail.load_state_dict(saved.state_dict())
    first = window_start(cfg.rounds, cfg.server.average_last)
    tail.realign(first, done, lambda r: ckpt.global_of(r, ["w", "b"], cfg))
    return tail


def test_resume_continues_or_resums_the_window_from_checkpoints(tmp_path: Path) -> None:
    ckpt = RoundCheckpoints(tmp_path / "checkpoints", enabled=False)
    cfg = parse_config({"rounds": 6, "server.average-last": 3})
    fresh = _realigned(cfg, 0, TailAverage(4), ckpt)
    assert fresh.first == 4 and fresh.count == 0
    summed = TailAverage(4)
    for r in (4, 5):
        summed.add(r, _globals(r))
    resumed = _realigned(cfg, 5, summed, ckpt)
    assert resumed.rounds == (4, 5)
    np.testing.assert_array_equal(resumed.total["w"], summed.total["w"])
    # rounds raised to 8 after round 5: the window is now 6..8, nothing of it done yet
    later = _realigned(cfg.with_overrides({"rounds": 8}), 5, summed, ckpt)
    assert later.first == 6 and later.count == 0
    # rounds raised to 7: window 5..7, round 5 re-summed from its checkpoint, or refused
    with pytest.raises(ConfigError, match="round 5"):
        _realigned(cfg.with_overrides({"rounds": 7}), 5, summed, ckpt)
    _checkpoint(ckpt.folder, 5)
    moved = _realigned(cfg.with_overrides({"rounds": 7}), 5, summed, ckpt)
    assert moved.rounds == (5, 5)
    np.testing.assert_array_equal(moved.mean(like=_globals(5))["w"], _globals(5)["w"])


def test_a_rising_window_is_told_from_a_flat_noisy_one() -> None:
    rng = np.random.default_rng(0)
    rounds = list(range(23, 31))
    rising = [(r, 0.30 + 0.01 * (r - 23) + rng.normal(0, 0.004)) for r in rounds]
    assert still_improving(rising) is True  # ~1 point a round, as on the 150-class set
    falling = [(r, 0.60 - 0.01 * (r - 23)) for r in rounds]
    assert still_improving(falling) is False
    # flat with noise of 4 points a round (5 clients' ~30-row splits): read as flat nearly
    # always; two standard errors let about 1 in 40 through
    flat_calls = [
        still_improving([(r, 0.8 + rng.normal(0, 0.04)) for r in rounds]) for _ in range(400)
    ]
    assert sum(flat_calls) / 400 < 0.06
    assert still_improving(rising[:3]) is None  # too few points to judge
    assert still_improving([(5, 0.5)] * 4) is None  # all in one round: no trend


def test_the_server_judges_the_trend_from_the_rounds_federated_evaluation(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from feddistill import keys
    from feddistill.server.lifecycle import ServerRun

    def traffic(accs: dict[int, float]) -> list[dict]:  # the run record's round entries
        return [
            {"round": r, "federated_evaluation": {keys.EVAL_ACCURACY: a}} for r, a in accs.items()
        ]

    rising = traffic({r: 0.3 + 0.01 * r for r in range(1, 9)})
    flat = traffic({r: 0.5 + (0.01 if r % 2 else -0.01) for r in range(1, 9)})
    for when, accs, expected in (
        ("flat", rising, True),
        ("flat", flat, False),
        ("flat", [], None),  # no federated evaluation: nothing to judge, the window averages
        ("always", rising, None),
    ):
        cfg = parse_config(
            {
                "output-dir": str(tmp_path),
                "server.average-when": when,
                "server.evaluate-clients": 5,
            }
        )
        run = SimpleNamespace(cfg=cfg, record=SimpleNamespace(rounds=accs))
        run._federated_curve = lambda first, last, run=run: ServerRun._federated_curve(
            run, first, last
        )
        assert ServerRun._still_improving(run, 1, 8) is expected  # type: ignore[arg-type]
