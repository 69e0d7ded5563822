"""Local work per round (``train.rising-epochs``): more epochs until the federated validation
accuracy stops rising, then ``train.local-epochs``; decided by the server, obeyed by clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from feddistill import keys
from feddistill.client import app as real_client
from feddistill.client import work
from feddistill.client.app import _local_epochs
from feddistill.codec import PayloadError, encode, parse_spec
from feddistill.records import payload_record, server_config
from feddistill.run_inputs import initial_models, source_splits
from feddistill.server.local_work import PLATEAU_WINDOW, epochs_for_round, plateau_round
from tests.conftest import simulate_with, tiny_config
from tests.test_client_app import _context


def _curve(values: list[float], first: int = 1) -> list[tuple[int, float]]:
    return [(first + i, v) for i, v in enumerate(values)]


def test_a_rising_curve_keeps_the_rising_epochs() -> None:
    # noisy but rising: 2 points a round with +-3 points of noise, as on CLINC150
    noise = [0.03, -0.03, 0.02, -0.02, 0.03, -0.01, 0.0, -0.03, 0.02, 0.01]
    rising = _curve([0.1 + 0.02 * i + e for i, e in enumerate(noise)])
    assert plateau_round(rising) is None
    assert epochs_for_round(rising, 2, 4) == (4, None)


def test_a_flat_window_settles_for_the_rest_of_the_run() -> None:
    values = [0.2, 0.4, 0.6, 0.7, 0.75, 0.78, 0.8, 0.79, 0.8, 0.78, 0.79, 0.8, 0.79]
    curve = _curve(values)
    settled = plateau_round(curve)
    assert settled is not None
    # the first window of PLATEAU_WINDOW points whose slope is <= 0 ends there
    assert 7 <= settled <= len(values)
    assert epochs_for_round(curve, 2, 4) == (2, settled)
    # sticky: a later rise does not bring the rising epochs back
    later = curve + _curve([0.85, 0.9, 0.95, 0.97, 0.98, 0.99], first=len(values) + 1)
    assert epochs_for_round(later, 2, 4) == (2, settled)


def test_too_few_evaluated_rounds_are_not_a_plateau() -> None:
    short = _curve([0.5] * (PLATEAU_WINDOW - 1))  # flat, but shorter than the window
    assert plateau_round(short) is None
    assert epochs_for_round(short, 2, 4) == (4, None)
    assert plateau_round(_curve([0.5] * PLATEAU_WINDOW)) == PLATEAU_WINDOW


def test_the_rule_off_or_below_local_epochs_never_removes_work() -> None:
    assert epochs_for_round(_curve([0.1, 0.2]), 2, 0) == (2, None)
    assert epochs_for_round(_curve([0.1, 0.2]), 10, 4) == (10, None)


@pytest.mark.parametrize("value", [-1, 1001, 2.5, "4", True, None])
def test_a_bad_local_epochs_from_the_server_is_a_named_payload_error(value: object) -> None:
    with pytest.raises(PayloadError, match=keys.LOCAL_EPOCHS):
        _local_epochs(value)


def test_the_server_sends_each_rounds_epochs(tmp_path: Path) -> None:
    """A 3-round federation with the rule on: every round asks for the rising epochs (too few
    evaluated rounds to see a plateau) and results.json records them; with it off, none. The
    evaluation messages never carry them (Flower hands both steps one config record)."""
    checking = ClientApp()

    @checking.train()
    def train(msg: Message, context: Context) -> Message:
        return real_client.train(msg, context)

    @checking.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if keys.LOCAL_EPOCHS in msg.content[keys.CONFIG]:
            return real_client._error_reply(msg, ValueError("local epochs in an evaluation"))
        return real_client.evaluate(msg, context)

    on = tiny_config(tmp_path / "on", **{"rounds": 3, "train.rising-epochs": 2})
    results = simulate_with(on, checking)
    assert [r["local_epochs"] for r in results["rounds"]] == [2, 2, 2]
    assert [(r["failures"], r["eval_failures"]) for r in results["rounds"]] == [(0, 0)] * 3
    off = tiny_config(tmp_path / "off", **{"rounds": 1, "server.local-only": "off"})
    results = simulate_with(off, checking)
    assert [r["local_epochs"] for r in results["rounds"]] == [None]


def test_a_client_trains_the_epochs_the_server_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    cfg = tiny_config(
        tmp_path, **{"compression.downlink": "q8", "compression.downlink-protocol": "stateless"}
    )
    _, _, labels = source_splits(cfg)
    models = initial_models(cfg, labels)
    zero = {n: np.zeros_like(a) for n, a in models.init_arrays.items()}
    payload = encode(zero, parse_spec(cfg.compression.downlink)).payload
    asked: list[int] = []
    real = work.distill_student

    def recording(*args: object, epochs: int, **kwargs: object) -> object:
        asked.append(epochs)
        return real(*args, epochs=epochs, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(work, "distill_student", recording)
    for sent in (3, None):
        config = {**server_config(cfg.to_json(), labels.names, models.digest, b"run-A-id")}
        config[keys.SERVER_ROUND] = 1
        if sent is not None:
            config[keys.LOCAL_EPOCHS] = sent
        content = RecordDict(
            {keys.ARRAYS: payload_record(payload), keys.CONFIG: ConfigRecord(config)}
        )
        msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
        assert not real_client.train(msg, _context(tmp_path)).has_error()
    assert asked == [3, cfg.train.local_epochs]  # not sent (an older server): its own config


def test_the_plan_is_read_from_the_run_record_so_a_resume_decides_alike() -> None:
    """``ServerRun._plan_local_work`` reads only the saved record: a record that holds a flat
    stretch (as a resumed run's does) settles at once; rounds without a finite validation
    accuracy are left out of the curve; the arrival figures of round r judge round r-1's
    global; with no validation curve nothing is sent."""
    from types import SimpleNamespace

    from feddistill.config import parse_config
    from feddistill.server.lifecycle import ServerRun

    def run(values: list[float | None], field: str, **flat: object) -> SimpleNamespace:
        rounds = [
            {"round": i + 1, field: {} if v is None else {keys.EVAL_ACCURACY: v}}
            for i, v in enumerate(values)
        ]
        stub = SimpleNamespace(
            cfg=parse_config({"train.rising-epochs": 4, **flat}),
            record=SimpleNamespace(rounds=rounds),
            strategy=SimpleNamespace(train_overrides={}),
            settled=None,
        )
        stub._federated_curve = lambda: ServerRun._federated_curve(stub)  # type: ignore[arg-type]
        ServerRun._plan_local_work(stub)  # type: ignore[arg-type]
        return stub

    federated = {"server.evaluate-clients": 5}
    flat = run([0.3, 0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], "federated_evaluation", **federated)
    assert flat.strategy.train_overrides == {keys.LOCAL_EPOCHS: 2} and flat.settled == 9
    gaps = run(
        [0.3, None, 0.5, float("nan"), 0.7, 0.8, 0.85, None, 0.9],  # 6 finite, rising
        "federated_evaluation",
        **federated,
    )
    assert gaps.strategy.train_overrides == {keys.LOCAL_EPOCHS: 4} and gaps.settled is None
    # the default: no federated evaluation, the training clients' arrival figures instead
    arrival = run([0.3, 0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], "arrival_evaluation")
    assert arrival.strategy.train_overrides == {keys.LOCAL_EPOCHS: 2} and arrival.settled == 8
    ignored = run([0.8] * 9, "federated_evaluation")  # evaluation off: its field is not read
    assert ignored.strategy.train_overrides == {keys.LOCAL_EPOCHS: 4}
    off = run([0.3], "arrival_evaluation", **{"data.val-fraction": 0.0})
    assert off.strategy.train_overrides == {}
