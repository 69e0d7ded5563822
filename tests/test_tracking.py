"""Experiment tracking: what TensorBoard and MLflow hold equals results.json.

The fast tests drive a :class:`Tracker` with a hand-made :class:`RunRecord` and read the event
files back with TensorBoard's ``EventAccumulator`` and the run back with ``MlflowClient``; one
slow test runs a tiny federation with tracking on.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feddistill.cli import build_parser, main, simulate_config
from feddistill.config import Config, ConfigError, parse_config
from feddistill.server.results import RunRecord
from feddistill.server.tracking import STATE_FILE, Tracker, round_metrics
from feddistill.strategies import RoundTraffic
from tests.conftest import tiny_config

# metric name -> round-entry field of results.json, as the docs promise
ROUND_TABLE = {
    "centralized/accuracy": "accuracy",
    "centralized/loss": "loss",
    "bytes/up_total": "bytes_up",
    "bytes/down_total": "bytes_down",
    "bytes/eval_down_total": "eval_bytes_down",
    "bytes/eval_up_total": "eval_bytes_up",
    "bytes/up_mean_per_client": "mean_bytes_up_per_client",
    "bytes/down_mean_per_client": "mean_bytes_down_per_client",
    "compression/ratio_up": "compression_ratio_up",
    "compression/ratio_down": "compression_ratio_down",
    "round/failures": "failures",
    "round/replies": "replies",
    "round/seconds": "seconds",
    "round/elapsed": "elapsed",
}


def _config(tmp_path: Path, backend: str, **overrides: Any) -> Config:
    return parse_config(
        {"output-dir": str(tmp_path / "out"), "tracking.backend": backend, **overrides}
    )


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the tests that pass a tracking URI: a new store costs seconds of
    schema migrations; each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _traffic(r: int) -> RoundTraffic:
    # byte counts above 2**24, where float32 would round them
    return RoundTraffic(
        bytes_up={1: 20_000_001 + r, 2: 30_000_003},
        bytes_down={1: 40_000_007, 2: 40_000_009 + r},
        eval_bytes_down={1: 1_000 + r},
        eval_bytes_up={1: 90 + r},
        failures=[(3, "timeout")] if r == 2 else [],
        train_metrics={"train-loss": 0.5 / r},
        eval_metrics={"eval-accuracy": 0.25 * r, "eval-loss": 1.5 / r},
        replies=2,
    )


def _record(cfg: Config) -> RunRecord:
    return RunRecord(out_dir=Path(cfg.output_dir), config=cfg.to_flat(), header={})


def _add_rounds(record: RunRecord, rounds: range, tracker: Tracker | None = None) -> None:
    for r in rounds:
        entry = record.add_round(r, 4, 0.3 + 0.1 * r, 1.0 / r, _traffic(r), 0.5 * r, 1_000_000_000)
        if r == 2:  # the privacy hook, in both shapes a privacy accountant may write
            entry["privacy.epsilon"] = 1.25
            entry["privacy"] = {"delta": 1e-5}
        record.save()
        if tracker is not None:
            tracker.log_round(entry)


def _student(tmp_path: Path) -> Path:
    folder = tmp_path / "out" / "student"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


def _run(cfg: Config, tmp_path: Path) -> dict[str, Any]:
    """Two tracked rounds and the final figures; returns results.json."""
    record = _record(cfg)
    with Tracker(cfg) as tracker:
        tracker.start(record, resumed=False)
        _add_rounds(record, range(1, 3), tracker)
        record.finish(student_dir="student", local_only_accuracy=None)
        tracker.finish(record.final, _student(tmp_path))
    return json.loads(record.path.read_text())


def _tensorboard_scalars(logdir: Path) -> tuple[dict[str, dict[int, float]], Any]:
    """Every scalar as TensorBoard reads it (events at or after a ``purge_step`` dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars: dict[str, dict[int, float]] = {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            assert e.step not in scalars.setdefault(tag, {}), f"{tag} shown twice at {e.step}"
            scalars[tag][e.step] = e.value
    return scalars, events


def _float32(value: float) -> float:
    """What TensorBoard's float32 scalars hold of ``value``."""
    return float(np.float32(value))


def _exact(value: float) -> float:
    return value


def _mlflow_run(cfg: Config) -> tuple[Any, Any, str]:
    from mlflow.tracking import MlflowClient

    saved = json.loads((Path(cfg.output_dir) / STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    return client, client.get_run(saved["run_id"]), saved["run_id"]


def _mlflow_history(client: Any, run: Any) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name in run.data.metrics:
        points = client.get_metric_history(run.info.run_id, name)
        out[name] = {m.step: m.value for m in points}
        assert len(out[name]) == len(points), f"{name} logged twice at one step"
    return out


def _assert_equal_to_results(
    scalars: dict[str, dict[int, float]], results: dict, stored: Callable[[float], float]
) -> None:
    """``stored``: how the backend keeps a float64 (exactly, or rounded to float32)."""
    for entry in results["rounds"]:
        r = entry["round"]
        for name, field in ROUND_TABLE.items():
            assert scalars[name][r] == stored(entry[field]), (name, r)
        for key, value in entry["federated_evaluation"].items():
            assert scalars[f"federated/{key}"][r] == stored(value)
        assert scalars["train/train-loss"][r] == stored(entry["train"]["train-loss"])
    two = results["rounds"][1]
    assert scalars["privacy/epsilon"] == {2: stored(two["privacy.epsilon"])} == {2: 1.25}
    assert scalars["privacy/delta"] == {2: stored(two["privacy"]["delta"])}
    last = results["rounds"][-1]["round"]
    final = results["final"]
    for key in ("accuracy", "best_accuracy", "bytes_up_total", "bytes_down_total"):
        assert scalars[f"final/{key}"] == {last: stored(final[key])}
    assert "final/local_only_accuracy" not in scalars  # None is not a figure


def test_round_metrics_take_every_figure_of_the_entry_and_skip_the_rest() -> None:
    entry = {
        "round": 3,
        "accuracy": None,
        "loss": 0.5,
        "failures": 0,
        "bytes_up_per_client": {"1": 10},
        "failure_reasons": ["node 1: x"],
        "federated_evaluation": {"eval-accuracy": 0.75, "eval-loss$": 0.1},
        "privacy.epsilon": 2.0,
    }

    metrics = round_metrics(entry)

    assert metrics == {
        "centralized/loss": 0.5,
        "round/failures": 0.0,
        "federated/eval-accuracy": 0.75,
        "federated/eval-loss_": 0.1,  # a name MLflow would refuse is made safe
        "privacy/epsilon": 2.0,
    }


def test_tensorboard_events_equal_results_json(tmp_path: Path) -> None:
    # Prepare
    cfg = _config(tmp_path, "tensorboard")

    # Execute
    results = _run(cfg, tmp_path)

    # Assert: one run folder under OUT/tensorboard, steps = rounds, values = results.json
    runs = list((tmp_path / "out" / "tensorboard").iterdir())
    assert len(runs) == 1
    scalars, events = _tensorboard_scalars(runs[0])
    _assert_equal_to_results(scalars, results, _float32)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '    tracking.backend = "tensorboard"' in text.splitlines()


def test_mlflow_run_equals_results_json(tmp_path: Path) -> None:
    # Prepare
    cfg = _config(tmp_path, "mlflow", **{"tracking.experiment": "kd-test"})

    # Execute
    results = _run(cfg, tmp_path)

    # Assert: an embedded store under OUT, the config as params, the outputs as artifacts
    assert (tmp_path / "out" / "mlflow" / "mlflow.db").is_file()
    client, run, run_id = _mlflow_run(cfg)
    assert client.get_experiment(run.info.experiment_id).name == "kd-test"
    assert run.info.status == "FINISHED"
    scalars = _mlflow_history(client, run)
    _assert_equal_to_results(scalars, results, _exact)
    assert scalars["bytes/up_total"][1] == 50_000_005  # float64: byte counts exact
    assert run.data.params == {k: str(v) for k, v in results["config"].items()}
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"student", "results.json"}
    assert [a.path for a in client.list_artifacts(run_id, "student")] == ["student/config.json"]


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_resumed_run_continues_the_same_run_and_shows_every_round_once(
    tmp_path: Path, backend: str, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: rounds 1-3 tracked, but tracking.json still says 2 (the server stopped before
    # writing it); round 4 in the saved record, never tracked
    uri = mlflow_uri if backend == "mlflow" else ""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a given URI: ./mlruns
    cfg = _config(
        tmp_path, backend, rounds=4, **{"tracking.uri": uri, "tracking.experiment": backend}
    )
    record = _record(cfg)
    first = Tracker(cfg)
    first.start(record, resumed=False)
    _add_rounds(record, range(1, 4), first)
    first.close(failed=True)
    state = json.loads(first.state_path.read_text())
    first.state_path.write_text(json.dumps({**state, "last_round": 2}))
    _add_rounds(record, range(4, 5))

    # Execute: resumed with more rounds (a resumable key), round 5 and the end
    cfg = cfg.with_overrides({"rounds": 5, "resume": True})
    with Tracker(cfg) as second:
        second.start(record, resumed=True)
        _add_rounds(record, range(5, 6), second)
        record.finish()
        second.finish(record.final, _student(tmp_path))

    # Assert: one run, every round once (the helpers check), rounds 3-4 caught up
    results = json.loads(record.path.read_text())
    if backend == "tensorboard":
        runs = list((tmp_path / "out" / "tensorboard").iterdir())
        assert len(runs) == 1
        scalars, _ = _tensorboard_scalars(runs[0])
        stored = _float32
    else:
        client, run, _ = _mlflow_run(cfg)
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert run.info.status == "FINISHED"
        assert run.data.params["rounds"] == "4" and run.data.tags["config.rounds"] == "5"
        scalars, stored = _mlflow_history(client, run), _exact
    assert sorted(scalars["centralized/accuracy"]) == [1, 2, 3, 4, 5]
    _assert_equal_to_results(scalars, results, stored)


def test_resume_false_opens_a_new_run(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a given URI: ./mlruns
    cfg = _config(
        tmp_path, "mlflow", **{"tracking.uri": mlflow_uri, "tracking.experiment": "fresh"}
    )
    _run(cfg, tmp_path)
    _, first, _ = _mlflow_run(cfg)

    _run(cfg, tmp_path)

    client, second, _ = _mlflow_run(cfg)
    assert second.info.run_id != first.info.run_id
    assert len(client.search_runs([first.info.experiment_id])) == 2


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _BrokenBackend:
    def __init__(self) -> None:
        self.calls = 0

    def state(self) -> dict[str, Any]:
        return {}

    def last_round(self) -> int | None:
        return None

    def log_config(self, config: Any, step: int) -> None:
        pass

    def log_metrics(self, metrics: Any, step: int) -> None:
        self.calls += 1
        raise ConnectionError("tracking server unreachable")

    def log_outputs(self, student_dir: Path, results: Path) -> None:
        raise AssertionError("a tracker turned off logs nothing more")

    def close(self, failed: bool) -> None:
        pass


def test_a_failing_backend_warns_once_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a backend whose every log fails
    cfg = _config(tmp_path, "mlflow")
    broken = _BrokenBackend()
    monkeypatch.setattr(Tracker, "_open", lambda self, saved: broken)
    record = _record(cfg)
    warned = _Warnings()
    logger = logging.getLogger("feddistill")  # may not propagate (see server.app.setup_logging)
    logger.addHandler(warned)

    # Execute: three rounds and the end, none of which may raise
    try:
        with Tracker(cfg) as tracker:
            tracker.start(record, resumed=False)
            _add_rounds(record, range(1, 4), tracker)
            record.finish()
            tracker.finish(record.final, _student(tmp_path))
    finally:
        logger.removeHandler(warned)

    # Assert
    warnings = warned.messages
    assert len(warnings) == 1 and "tracking server unreachable" in warnings[0]
    assert "the run goes on without tracking" in warnings[0]
    assert broken.calls == 1
    assert len(json.loads(record.path.read_text())["rounds"]) == 3


@pytest.mark.parametrize(
    ("backend", "package"), [("mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard")]
)
def test_a_missing_package_is_a_config_error_before_any_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    backend: str,
    package: str,
) -> None:
    # Prepare: the package cannot be imported (None in sys.modules makes `import` fail)
    monkeypatch.setitem(sys.modules, backend, None)
    cfg = _config(tmp_path, backend)

    # Execute / Assert: the Tracker and the command line both refuse, naming the fix
    with pytest.raises(ConfigError, match=rf"needs the {package} package") as err:
        Tracker(cfg)
    assert "pip install 'feddistill[tracking]'" in str(err.value)
    code = main(["simulate", "--tracking", backend, "--out", str(tmp_path / "cli")])
    assert code == 2
    assert f"needs the {package} package" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()  # nothing started


def test_no_tracking_writes_nothing_and_forgets_an_older_tracked_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "none")
    record = _record(cfg)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / STATE_FILE).write_text('{"backend": "mlflow", "run_id": "older"}')
    with Tracker(cfg) as tracker:
        tracker.start(record, resumed=False)
        _add_rounds(record, range(1, 2), tracker)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]


def test_tracking_keys_are_validated_and_the_flag_sets_the_backend() -> None:
    with pytest.raises(ConfigError, match=r"tracking.backend = 'wandb': expected one of 'none'"):
        parse_config({"tracking.backend": "wandb"})
    with pytest.raises(ConfigError, match=r"tracking.experiment = ' '"):
        parse_config({"tracking.experiment": " "})
    args = build_parser().parse_args(["simulate", "--tracking", "tensorboard"])
    assert simulate_config(args).tracking.backend == "tensorboard"


@pytest.mark.slow
def test_a_tiny_federation_with_mlflow_tracks_every_round(tmp_path: Path) -> None:
    from feddistill.simulation.engine import simulate

    # Prepare
    cfg = tiny_config(tmp_path, **{"tracking.backend": "mlflow", "server.local-only": "off"})

    # Execute
    results = simulate(cfg)

    # Assert: every figure of results.json's rounds and final, and the student as an artifact
    client, run, run_id = _mlflow_run(cfg)
    assert run.info.status == "FINISHED"
    scalars = _mlflow_history(client, run)
    for entry in results["rounds"]:
        assert round_metrics(entry)  # something to compare
        for name, value in round_metrics(entry).items():
            assert scalars[name][entry["round"]] == value, name
        for name, field in ROUND_TABLE.items():
            if entry[field] is not None:
                assert scalars[name][entry["round"]] == entry[field]
    assert scalars["final/accuracy"] == {2: results["final"]["accuracy"]}
    student = {a.path for a in client.list_artifacts(run_id, "student")}
    assert "student/model.safetensors" in student
    assert run.data.params["rounds"] == "2"


def _doc_commands() -> list[str]:
    doc = (Path(__file__).parents[1] / "docs" / "tracking.md").read_text()
    blocks = re.findall(r"```(?:sh|text)\n(.*?)```", doc, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_doc_commands_parse_and_point_where_the_tracker_writes() -> None:
    """Checks each ```sh and ```text line of docs/tracking.md without running it: feddistill
    commands parse to a valid config with tracking on; the viewers open the default output
    folder."""
    out = Config().output_dir
    seen = set()
    for line in _doc_commands():
        argv = shlex.split(line)
        seen.add(argv[0])
        if argv[0] == "feddistill":
            cfg = simulate_config(build_parser().parse_args(argv[1:]))
            assert cfg.tracking.backend in ("tensorboard", "mlflow"), line
        elif argv[0] == "tensorboard":
            assert argv[1:] == ["--logdir", f"{out}/tensorboard"]
        elif argv[0] == "mlflow":
            assert argv[1:] == ["ui", "--backend-store-uri", f"sqlite:///{out}/mlflow/mlflow.db"]
        else:
            assert argv[:2] == ["pip", "install"], line
            assert argv[2:] in (["-e", ".[tracking]", "-c", "constraints.txt"], ["mlflow"]), line
    assert seen == {"pip", "feddistill", "tensorboard", "mlflow"}
