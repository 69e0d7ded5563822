"""The teacher trains to a plateau on a holdout of its rows and keeps its best epoch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from feddistill.distill.early_stop import MIN_HOLDOUT_ROWS, Plateau, holdout_split
from feddistill.distill.train import evaluate, pick_device, subset
from feddistill.recipe import encode_train, fit_teacher
from feddistill.run_inputs import initial_models, source_splits
from tests.conftest import tiny_config


def test_the_holdout_is_a_seeded_disjoint_share_and_absent_when_too_small() -> None:
    train, hold = holdout_split(400, 0.1, seed=3)
    assert len(hold) == 40 and len(train) == 360
    assert not set(train) & set(hold) and sorted({*train, *hold}) == list(range(400))
    again, _ = holdout_split(400, 0.1, seed=3)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(holdout_split(400, 0.1, seed=4)[1], hold)
    small = (MIN_HOLDOUT_ROWS - 1) * 10
    train, hold = holdout_split(small, 0.1, seed=0)  # 19 rows would be held out: too few
    assert len(hold) == 0 and len(train) == small


def test_the_plateau_stops_after_patience_epochs_without_a_better_one() -> None:
    p = Plateau(patience=2)
    assert p.update(1, 0.50, 1.0) == (True, False)
    assert p.update(2, 0.60, 0.9) == (True, False)
    assert p.update(3, 0.60, 0.95) == (False, False)  # equal accuracy, higher loss: not better
    assert p.update(4, 0.55, 0.8) == (False, True)  # two epochs without a better one
    assert p.best_epoch == 2
    q = Plateau(patience=1)
    q.update(1, 0.5, 1.0)
    assert q.update(2, 0.5, 0.9) == (True, False)  # equal accuracy, lower loss: better


def test_fit_teacher_keeps_the_best_holdout_epoch_and_the_curve_does_not_change_it(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        tmp_path,
        **{
            "teacher.epochs": 6,
            "teacher.patience": 2,
            "teacher.min-epochs": 0,
            "teacher.holdout": 0.2,
            "teacher.lr": 3e-3,
        },
    )
    train, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    _, t_train = encode_train(models, train, cfg.data.max_length)
    device = pick_device("cpu")
    _, hold_idx = holdout_split(len(t_train), 0.2, cfg.seed)
    holdout = subset(t_train, hold_idx)

    teacher = copy.deepcopy(models.teacher)
    fit = fit_teacher(cfg, teacher, t_train, device)
    assert fit.holdout_rows == len(hold_idx) >= MIN_HOLDOUT_ROWS
    assert 1 <= fit.best_epoch <= fit.epochs <= 6
    assert len(fit.holdout_accuracy) == fit.epochs
    assert fit.stopped in ("plateau", "epochs")
    if fit.stopped == "plateau":
        assert fit.epochs == fit.best_epoch + 2
    kept = evaluate(teacher, holdout, device=device).accuracy
    assert kept == pytest.approx(max(fit.holdout_accuracy))

    # the same recipe run on to 9 epochs for a curve: 9 calls, the same weights kept
    curve: list[int] = []
    again = copy.deepcopy(models.teacher)
    fit2 = fit_teacher(cfg, again, t_train, device, watch=curve.append, at_least=9)
    assert curve == list(range(1, 10))
    assert (fit2.epochs, fit2.best_epoch) == (fit.epochs, fit.best_epoch)
    for a, b in zip(teacher.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_patience_zero_trains_the_capped_epochs_on_every_row(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"teacher.epochs": 2, "teacher.patience": 0})
    train, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    _, t_train = encode_train(models, train, cfg.data.max_length)
    seen: list[int] = []
    fit = fit_teacher(cfg, copy.deepcopy(models.teacher), t_train, pick_device("cpu"),
                      watch=seen.append)  # fmt: skip
    assert (fit.epochs, fit.stopped, fit.holdout_rows, seen) == (2, "no holdout", 0, [1, 2])


def test_the_plateau_never_stops_the_teacher_before_min_epochs(tmp_path: Path) -> None:
    """A patience of 1 at a learning rate that cannot move the holdout accuracy would stop
    after epoch 2; min-epochs keeps it training to 4."""
    cfg = tiny_config(
        tmp_path,
        **{
            "teacher.epochs": 8,
            "teacher.patience": 1,
            "teacher.min-epochs": 4,
            "teacher.holdout": 0.2,
            "teacher.lr": 1e-9,
        },
    )
    train, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    _, t_train = encode_train(models, train, cfg.data.max_length)
    fit = fit_teacher(cfg, copy.deepcopy(models.teacher), t_train, pick_device("cpu"))
    assert (fit.epochs, fit.stopped) == (4, "plateau")


def test_a_teacher_time_cap_longer_than_the_round_is_refused(tmp_path: Path) -> None:
    from feddistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"teacher\.max-minutes = 11.*server\.round-timeout"):
        tiny_config(tmp_path, **{"teacher.max-minutes": 11.0, "server.round-timeout": 600.0})


def test_the_time_cap_stops_after_the_epoch_that_ends_past_it_unless_untimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that jumps an hour per reading: every epoch ends past a 1-minute cap, so the
    timed recipe stops after epoch 1; the bench's untimed centralized reference runs the cap."""
    import itertools

    import feddistill.recipe as recipe

    clock = itertools.count(0, 3600)
    monkeypatch.setattr(recipe.time, "monotonic", lambda: float(next(clock)))
    cfg = tiny_config(
        tmp_path, **{"teacher.epochs": 3, "teacher.patience": 0, "teacher.max-minutes": 1.0}
    )
    train, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    _, t_train = encode_train(models, train, cfg.data.max_length)
    timed = fit_teacher(cfg, copy.deepcopy(models.teacher), t_train, pick_device("cpu"))
    untimed = fit_teacher(
        cfg, copy.deepcopy(models.teacher), t_train, pick_device("cpu"), timed=False
    )
    assert (timed.epochs, timed.stopped) == (1, "time")
    assert (untimed.epochs, untimed.stopped) == (3, "no holdout")
