"""Simulation at scale: GPU request resolution, the progress Grid, the dispatcher, bench-scale."""

from __future__ import annotations

import importlib
import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from queue import Queue
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.serverapp import Grid

from feddistill.bench import scale
from feddistill.server.progress import RoundWatch, WatchedGrid
from feddistill.simulation import engine
from tests.conftest import tiny_config

# -- --gpus-per-client ------------------------------------------------------------------------


def test_gpu_request_without_cuda_runs_on_cpu_with_a_note() -> None:
    gpus, note = engine.resolve_gpus(0.5, cuda_devices=0)
    assert gpus == 0.0
    assert note.startswith("no CUDA device: running clients on CPU")
    assert "0.5" in note


@pytest.mark.parametrize(
    ("requested", "devices", "expected"), [(0.0, 0, 0.0), (0.0, 1, 0.0), (0.25, 1, 0.25), (2, 2, 2)]
)
def test_gpu_request_kept_when_possible(requested: float, devices: int, expected: float) -> None:
    assert engine.resolve_gpus(requested, cuda_devices=devices) == (expected, "")


@pytest.mark.parametrize(("requested", "devices"), [(-1.0, 1), (2.0, 1)])
def test_impossible_gpu_request_is_refused(requested: float, devices: int) -> None:
    with pytest.raises(ValueError, match="--gpus-per-client"):
        engine.resolve_gpus(requested, cuda_devices=devices)


def test_simulate_with_gpus_on_a_cpu_machine_notes_and_asks_ray_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: no CUDA, and a stand-in for Flower's run_simulation that records its arguments
    import flwr.simulation
    import torch

    cfg = tiny_config(tmp_path)
    seen: dict[str, Any] = {}

    def fake_run_simulation(**kwargs: Any) -> None:
        seen.update(kwargs)
        out = Path(cfg.output_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rounds": [], "final": {}}))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)

    # Execute
    with caplog.at_level(logging.WARNING, logger="feddistill"):
        engine.simulate(cfg, gpus_per_client=0.5)

    # Assert
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert "no CUDA device: running clients on CPU" in caplog.text


# -- the progress Grid ------------------------------------------------------------------------


def _msg(kind: str, server_round: int, msg_id: str) -> Any:
    content = SimpleNamespace(config_records={"config": {"server-round": server_round}})
    return SimpleNamespace(
        metadata=SimpleNamespace(message_type=kind, message_id=msg_id), content=content
    )


def _reply(to: str, state_bytes: float | None = None, error: bool = False) -> Any:
    metrics = {} if state_bytes is None else {"metrics": {"state-bytes": state_bytes}}
    return SimpleNamespace(
        metadata=SimpleNamespace(reply_to_message_id=to),
        content=SimpleNamespace(metric_records=metrics),
        has_error=lambda: error,
    )


class FakeGrid(Grid):
    """Replies arrive in the given batches, one batch per pull (then nothing)."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches
        self.pulls = 0

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        self.pulls += 1
        return self.batches.pop(0) if self.batches else []

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Any:
        return [r for batch in self.batches for r in batch]


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WatchedGrid, "_pull_interval", lambda self: 0.01)


def test_watched_grid_collects_replies_as_they_arrive(fast_poll: None) -> None:
    # Prepare: three train messages; replies come over three pulls, one of them an error
    out = io.StringIO()
    watch = RoundWatch(num_rounds=4, display="lines", stream=out)
    msgs = [_msg("train", 2, f"m{i}") for i in range(3)]
    batches = [[_reply("m0", 100.0)], [], [_reply("m1", 300.0), _reply("m2", 999.0, error=True)]]
    grid = WatchedGrid(FakeGrid(batches), watch)

    # Execute
    replies = list(grid.send_and_receive(msgs, timeout=5.0))

    # Assert: all replies, stats of the successful ones, one line for the round
    assert len(replies) == 3
    assert watch.state_bytes_summary(2) == {"state_bytes_mean": 200.0, "state_bytes_max": 300.0}
    assert watch.state_bytes_summary(3) == {"state_bytes_mean": None, "state_bytes_max": None}
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("round 2/4  training: 3/3 clients done")


def test_watched_grid_keeps_flowers_timeout(fast_poll: None) -> None:
    watch = RoundWatch(num_rounds=1)
    inner = FakeGrid([[_reply("m0")]])  # m1 never answers
    grid = WatchedGrid(inner, watch)

    start = time.time()
    replies = list(
        grid.send_and_receive([_msg("train", 1, "m0"), _msg("train", 1, "m1")], timeout=0.3)
    )

    assert len(replies) == 1
    assert 0.29 <= time.time() - start < 2.0
    assert inner.pulls > 2


def test_tty_progress_rewrites_one_line_and_clears_it(fast_poll: None) -> None:
    out = io.StringIO()
    watch = RoundWatch(num_rounds=3, display="tty", stream=out)
    grid = WatchedGrid(FakeGrid([[_reply("m0", 1.0)]]), watch)

    grid.send_and_receive([_msg("train", 1, "m0")], timeout=5.0)
    grid.send_and_receive([_msg("evaluate", 1, "e0")], timeout=0.05)

    text = out.getvalue()
    assert "\n" not in text
    assert "round 1/3  training: 0/1" in text and "round 1/3  evaluating: 0/1" in text
    assert text.endswith("\r\033[K")


def test_unknown_grid_runs_its_own_loop() -> None:
    watch = RoundWatch(num_rounds=1)
    grid = WatchedGrid(FakeGrid([[_reply("m0", 5.0)]]), watch)

    replies = list(grid.send_and_receive([_msg("train", 1, "m0")], timeout=1.0))

    assert len(replies) == 1
    assert watch.state_bytes_summary(1)["state_bytes_max"] == 5.0


def test_eta_uses_rounds_after_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    watch = RoundWatch(num_rounds=10)
    watch.round_seconds = {1: 100.0, 2: 10.0, 3: 12.0}
    watch._round, watch._round_started = 4, time.monotonic()
    eta = watch.eta_seconds()
    assert eta is not None and 76 < eta <= 77  # 7 rounds left at 11 s


# -- the dispatcher ---------------------------------------------------------------------------


def test_dispatcher_delivers_only_addressed_messages_and_is_restored() -> None:
    # Prepare: Flower's in-memory link state with 200 virtual nodes and 3 messages in flight
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    rs = importlib.import_module("flwr.simulation.run_simulation")
    original = vce_api.add_messages_to_queue
    factory = LinkStateFactory(
        rs.FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    run = Run.create_empty(run_id=7)
    run.federation_id = rs.NOOP_FEDERATION_ID
    run.primary_task_id = 3
    state = factory.state()
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[3] = rs.Task(task_id=3, run_id=7)
    ident = rs.TaskIdentity
    saved_identity = (ident._task_id, ident._run_id, ident._node_id)  # None unless a run set it
    rs.TaskIdentity.task_id, rs.TaskIdentity.run_id = 3, 7
    rs.TaskIdentity.node_id = rs.SUPERLINK_NODE_ID
    try:
        mapping = vce_api._register_nodes(200, factory)
        grid = InMemoryGrid(factory)
        grid.set_run(run)
        targets = sorted(mapping)[:3]
        grid.push_messages([Message(RecordDict(), n, "train") for n in targets])
        queue: Queue = Queue()
        stop = threading.Event()
        asked: list[int] = []
        real_get = state.get_message_ins

        def counting_get(node_id: int, limit: int | None, **kwargs: Any) -> Any:
            asked.append(node_id)
            return real_get(node_id=node_id, limit=limit, **kwargs)

        state.get_message_ins = counting_get  # type: ignore[method-assign]

        # Execute
        with engine.dispatch_to_addressed_nodes():
            assert vce_api.add_messages_to_queue is not original
            thread = threading.Thread(
                target=vce_api.add_messages_to_queue, args=(state, queue, mapping, stop)
            )
            thread.start()
            time.sleep(0.35)
            stop.set()
            thread.join()
    finally:
        ident._task_id, ident._run_id, ident._node_id = saved_identity

    # Assert: each message delivered once, only addressed nodes asked, Flower's loop is back
    delivered = [queue.get_nowait().metadata.dst_node_id for _ in range(queue.qsize())]
    assert sorted(delivered) == targets
    assert sorted(asked) == targets  # Flower's loop asks all 200 nodes every 0.1 s
    assert vce_api.add_messages_to_queue is original


# -- bench-scale ------------------------------------------------------------------------------


def test_scale_config_gives_every_client_the_same_work(tmp_path: Path) -> None:
    from feddistill.config import parse_config
    from feddistill.run_inputs import partitions

    for n in (100, 1000):
        cfg = parse_config(scale.scale_config(n, 4, tmp_path))
        sizes = {len(p) for p in partitions(cfg)}
        assert sizes == {scale.EXAMPLES_PER_CLIENT}
        assert cfg.server.num_sampled(cfg.server.clients_per_round, n) == 10
    assert parse_config(scale.scale_config(10_000, 4, tmp_path)).data.num_examples == 50_000


def test_parse_clients() -> None:
    assert scale.parse_clients("100,1000") == [100, 1000]
    with pytest.raises(ValueError, match="--clients"):
        scale.parse_clients("5")
    with pytest.raises(ValueError, match="--clients"):
        scale.parse_clients("a,b")


def test_tree_memory_counts_children() -> None:
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'x = b\"x\" * 50_000_000; "
        "import time; time.sleep(1.5)']); time.sleep(1.5); c.wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    with scale.TreeMemory(proc.pid, interval=0.1) as mem:
        proc.wait()
    assert mem.peak > 50_000_000


def test_scale_table_reports_targets() -> None:
    rows = [
        {
            "clients": n,
            "examples": 10 * n,
            "peak_rss_bytes": rss,
            "seconds_per_round": spr,
            "loop_seconds_per_round": 1.0,
            "overhead_ratio": spr,
            "teachers_fitted_fraction": 1.0,
            "completed": True,
            "loop_workers": 2,
        }
        for n, rss, spr in ((100, 1000 * 2**20, 1.1), (1000, 1100 * 2**20, 1.2), (5000, 2**31, 1.5))
    ]
    table = scale.format_scale_table(rows)
    assert "1000 vs 100 clients: peak RSS x1.10, s/round x1.09 (target <= 1.2x): met" in table
    assert "5000 clients completed: yes" in table
    assert "overhead after round 1: worst x1.50 (target <= 1.3x): NOT met" in table


@pytest.mark.slow
def test_bench_scale_end_to_end(tmp_path: Path) -> None:
    rows = scale.run_scale_bench([20], rounds=2, work_dir=tmp_path, repeats=2)

    (row,) = rows
    assert row["completed"] and row["clients"] == 20 and row["repeats"] == 2
    assert row["peak_rss_bytes"] > row["loop_peak_rss_bytes"] > 0
    assert row["seconds_per_round"] > 0 and row["loop_seconds_per_round"] > 0
    assert row["overhead_ratio"] == pytest.approx(
        row["seconds_per_round"] / row["loop_seconds_per_round"]
    )
    assert len(row["runs"]["simulate"]) == len(row["runs"]["loop"]) == 2
    assert "20" in scale.format_scale_table(rows)
