"""More clients than one would keep in memory: every client's state lives on disk, under budget.

30 clients, 10 sampled per round for 3 rounds, error feedback on and a teacher budget of about
three teachers, run through the very functions the ClientApp calls (``train_round``), in
process: what each client saved after a round must be exactly what it loads the next time it is
sampled, its teacher may have been evicted meanwhile (then it is fitted again), and the cached
teachers never exceed the budget by more than one teacher.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from feddistill.client.work import RoundInput, load_initial, train_round
from feddistill.codec.chain import initial_downlink
from feddistill.config import Config
from feddistill.models.build import get_arrays
from feddistill.node_state import ClientState, folder_bytes
from feddistill.run_inputs import source_splits
from feddistill.server.run import resolve_paths
from tests.conftest import tiny_config

NUM_CLIENTS, PER_ROUND, ROUNDS = 30, 10, 3
RUN = "0123456789abcdef"  # the run id a server would send
BUDGET_MB = 0.5  # a micro teacher is ~160 KB: about three fit


def _teacher_bytes(cache: Path) -> int:
    return sum(folder_bytes(p) for p in (cache / "clients").glob("*/teacher-*"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as a simulation worker (Ray actor, num_cpus=1) has: on a busy 2-core
    machine two threads on a model this small spend their time waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path, **extra: Any) -> Config:
    """NUM_CLIENTS small iid clients with error feedback and a teacher budget of BUDGET_MB."""
    return tiny_config(
        tmp_path,
        **{
            "rounds": ROUNDS,
            "data.num-clients": NUM_CLIENTS,
            "data.num-examples": 20 * NUM_CLIENTS,
            "data.min-partition-size": 10,
            "data.partitioning": "iid",
            "compression.uplink": "topk:0.1+q8+ef",
            "cache.max-mb": BUDGET_MB,
            **extra,
        },
    )


def test_client_state_round_trips_through_disk_under_a_teacher_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    # Prepare
    cfg = resolve_paths(_config(tmp_path))
    cache = Path(cfg.cache_dir)
    budget = int(BUDGET_MB * 2**20)
    _, _, labels = source_splits(cfg)
    models = load_initial(cfg, labels, "")
    payload = initial_downlink(
        models.init_arrays, cfg.compression.downlink_spec, chained=cfg.compression.chained
    )

    loads: list[tuple[str, int, dict[str, np.ndarray]]] = []
    real_load = ClientState.load_residual

    def spy(
        self: ClientState, schema: list[tuple[str, tuple[int, ...]]], before_round: int, *, run
    ) -> dict[str, np.ndarray]:
        arrays = real_load(self, schema, before_round, run=run)
        loads.append((self.root.name, before_round, arrays))
        return arrays

    monkeypatch.setattr(ClientState, "load_residual", spy)

    saved: dict[str, dict[str, np.ndarray]] = {}  # client -> residual saved after its last round
    refitted_after_eviction = 0
    rng = random.Random(0)

    # Execute / Assert, client by client
    for server_round in range(1, ROUNDS + 1):
        inp = RoundInput(cfg, labels, models.digest, payload, server_round, run_id=RUN)
        for pid in rng.sample(range(NUM_CLIENTS), PER_ROUND):
            key = f"partition-{pid}-of-{NUM_CLIENTS}"
            state = ClientState.open(cache, key)
            teacher_was_cached = any(state.root.glob("teacher-*"))
            seen_before = key in saved
            loads.clear()

            _, metrics = train_round(inp, {"partition-id": pid})

            # the residual this round started from is the one saved the last time
            assert [(name, before) for name, before, _ in loads] == [(key, server_round)]
            used = loads[0][2]
            if seen_before:
                assert used.keys() == saved[key].keys()
                for name in used:
                    np.testing.assert_array_equal(used[name], saved[key][name])
            else:
                assert used == {}
            after = real_load(state, models.schema, server_round + 1, run=RUN)
            assert after and any(np.any(a != 0) for a in after.values())
            saved[key] = after

            # a client seen before whose teacher was evicted fits it again
            if seen_before and not teacher_was_cached:
                refitted_after_eviction += int(metrics["teacher-fitted"] == 1.0)
            assert metrics["teacher-fitted"] == float(not teacher_was_cached)

            own = sum(folder_bytes(p) for p in state.root.glob("teacher-*"))
            assert _teacher_bytes(cache) <= budget + own
            assert metrics["state-bytes"] == state.disk_bytes()

    # Every sampled client still has its residual (never evicted) and teachers were evicted.
    for key, residual in saved.items():
        stored = real_load(ClientState.open(cache, key), models.schema, ROUNDS + 1, run=RUN)
        for name in residual:
            np.testing.assert_array_equal(stored[name], residual[name])
    teachers = sum(1 for _ in (cache / "clients").glob("*/teacher-*"))
    assert teachers < len(saved)
    assert refitted_after_eviction >= 1
    # the per-process cache of initial models was never trained or moved in place
    current = get_arrays(models.student, models.names)
    for name, array in models.init_arrays.items():
        np.testing.assert_array_equal(current[name], array)
    assert all(p.device.type == "cpu" for p in models.student.parameters())
    assert all(p.device.type == "cpu" for p in models.teacher.parameters())


@pytest.mark.slow
def test_simulation_of_30_clients_records_state_and_stays_under_budget(tmp_path: Path) -> None:
    """The same shape through Flower's simulation engine (Ray), GPUs requested on any machine."""
    from feddistill.simulation.engine import simulate

    cfg = _config(
        tmp_path,
        **{"server.clients-per-round": PER_ROUND, "server.evaluate-clients": PER_ROUND},
    )

    results = simulate(cfg, gpus_per_client=0.5)  # no CUDA: a note, and clients on CPU

    rounds = results["rounds"]
    assert [r["replies"] for r in rounds] == [PER_ROUND] * ROUNDS
    for r in rounds:
        assert 0 < r["state_bytes_mean"] <= r["state_bytes_max"]
    cache = Path(results["config"]["cache-dir"])
    clients = [p for p in (cache / "clients").iterdir() if p.is_dir()]
    final = results["final"]
    assert final["cache_bytes"] == folder_bytes(cache)
    assert final["clients_with_state"] == len(clients)
    assert all(any(p.glob("residual-*.npz")) for p in clients)  # residuals are never evicted
    one_teacher = max(folder_bytes(p) for p in (cache / "clients").glob("*/teacher-*"))
    assert _teacher_bytes(cache) <= int(BUDGET_MB * 2**20) + one_teacher
