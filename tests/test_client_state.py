"""The teacher cache budget (``cache.max-mb``): LRU eviction of other clients' teachers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from feddistill.node_state import ClientState, folder_bytes

SCHEMA = [("w", (4,))]


def _teacher(cache: Path, client: str, numel: int = 1000, *, used: float | None = None) -> Path:
    """Save a fake teacher of ``numel`` float32 values; ``used`` sets its last-use time."""
    state = ClientState.open(cache, client)
    state.save_teacher("k", {"w": torch.zeros(numel)}, torch.zeros(3, 2))
    if used is not None:
        os.utime(state.teacher_dir("k"), (used, used))
    return state.teacher_dir("k")


def _teachers(cache: Path) -> set[str]:
    return {p.parent.name for p in (cache / "clients").glob("*/teacher-*")}


def test_evicts_least_recently_used_other_clients_until_under_budget(tmp_path: Path) -> None:
    # Prepare: four clients' teachers, last used at t = 100, 300, 200, 400
    for client, used in (("a", 100), ("b", 300), ("c", 200), ("d", 400)):
        _teacher(tmp_path, client, used=used)
    one = folder_bytes(ClientState.open(tmp_path, "a").teacher_dir("k"))
    me = ClientState.open(tmp_path, "e")
    me.save_teacher("k", {"w": torch.zeros(1000)}, torch.zeros(3, 2))

    # Execute: room for three teachers, five cached
    freed = me.enforce_teacher_budget(3 * one)

    # Assert: the two least recently used (a, then c) went; mine stays
    assert _teachers(tmp_path) == {"b", "d", "e"}
    assert freed == 2 * one


def test_own_teacher_is_kept_even_alone_over_budget(tmp_path: Path) -> None:
    _teacher(tmp_path, "a", used=100)
    me = ClientState.open(tmp_path, "me")
    me.save_teacher("k", {"w": torch.zeros(5000)}, None)

    me.enforce_teacher_budget(1)

    assert _teachers(tmp_path) == {"me"}


def test_zero_budget_means_unbounded(tmp_path: Path) -> None:
    for client in "abc":
        _teacher(tmp_path, client)
    assert ClientState.open(tmp_path, "a").enforce_teacher_budget(0) == 0
    assert _teachers(tmp_path) == {"a", "b", "c"}


def test_residuals_are_never_evicted(tmp_path: Path) -> None:
    other = ClientState.open(tmp_path, "other")
    other.save_residual({"w": np.ones(4, dtype=np.float32)}, 1, run="a1")
    _teacher(tmp_path, "other", used=100)
    me = ClientState.open(tmp_path, "me")
    me.save_teacher("k", {"w": torch.zeros(1000)}, None)

    me.enforce_teacher_budget(1)

    assert _teachers(tmp_path) == {"me"}
    np.testing.assert_array_equal(
        other.load_residual(SCHEMA, before_round=2, run="a1")["w"], np.ones(4)
    )


def test_loading_a_teacher_marks_it_recently_used(tmp_path: Path) -> None:
    _teacher(tmp_path, "old", used=100)
    _teacher(tmp_path, "new", used=200)
    one = folder_bytes(ClientState.open(tmp_path, "old").teacher_dir("k"))
    assert ClientState.open(tmp_path, "old").load_teacher("k") is not None  # touches "old"
    me = ClientState.open(tmp_path, "me")
    me.save_teacher("k", {"w": torch.zeros(1000)}, None)

    me.enforce_teacher_budget(2 * one)

    assert _teachers(tmp_path) == {"old", "me"}


def test_evicted_teacher_loads_as_missing(tmp_path: Path) -> None:
    folder = _teacher(tmp_path, "a")
    state = ClientState.open(tmp_path, "a")
    (folder / "model.safetensors").unlink()  # evicted by another worker mid-way

    assert state.load_teacher("k") is None
    assert folder_bytes(tmp_path / "nowhere") == 0


def test_concurrent_workers_tolerate_each_other(tmp_path: Path) -> None:
    # Prepare: 20 cached teachers; two workers save and enforce a 3-teacher budget at once
    for i in range(20):
        _teacher(tmp_path, f"c{i:02d}", used=100 + i)
    one = folder_bytes(ClientState.open(tmp_path, "c00").teacher_dir("k"))
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            for j in range(5):
                state = ClientState.open(tmp_path, f"{name}{j}")
                state.save_teacher("k", {"w": torch.zeros(1000)}, torch.zeros(3, 2))
                state.enforce_teacher_budget(3 * one)
                state.load_teacher("k")
        except BaseException as err:  # reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    total = sum(folder_bytes(p) for p in (tmp_path / "clients").glob("*/teacher-*"))
    assert total <= 3 * one + one  # the budget, plus at most one teacher being saved


def test_downlink_cache_keeps_the_newest_versions_of_its_chain(tmp_path: Path) -> None:
    from feddistill.node_state import DownlinkCache

    cache = DownlinkCache.open(tmp_path)
    old = cache.root / "0000000000000000-v00000001.npz"  # an earlier run's chain, a day old
    np.savez(old, w=np.zeros(4, np.float32))
    os.utime(old, (1.0, 1.0))
    for version in range(1, 8):
        cache.save("abcd", version, {"w": np.full(4, version, np.float32)})
    assert sorted(p.name for p in cache.root.iterdir()) == [
        f"abcd-v{v:08d}.npz" for v in range(4, 8)
    ]
    found = cache.newest("abcd", 2, 5)
    assert found is not None and found[0] == 5 and found[1]["w"][0] == 5
    assert cache.newest("abcd", 1, 3) is None  # pruned
    assert cache.newest("other", 0, 9) is None


def test_residuals_are_scoped_to_their_run_and_other_runs_files_are_removed(
    tmp_path: Path,
) -> None:
    # Prepare: run "a1" saved rounds 1-2; an older version left an unscoped residual file
    state = ClientState.open(tmp_path, "client")
    for r in (1, 2):
        state.save_residual({"w": np.full(4, r, np.float32)}, r, run="a1")
    np.save(state.root / "residual-000001.npy", np.ones(1))  # not ours: left alone
    legacy = state.root / "residual-000002.npz"
    np.savez(legacy, w=np.ones(4, np.float32))

    # Execute: a new run "b2" in the same cache folder reaches its round 3
    before = state.load_residual(SCHEMA, before_round=3, run="b2")
    state.save_residual({"w": np.full(4, 7, np.float32)}, 3, run="b2")

    # Assert: it started from no residual, and only its own file is left
    assert before == {}
    assert sorted(p.name for p in state.root.glob("residual-*.npz")) == ["residual-b2-000003.npz"]
    assert state.load_residual(SCHEMA, before_round=9, run="a1") == {}
    np.testing.assert_array_equal(state.load_residual(SCHEMA, 9, run="b2")["w"], np.full(4, 7))


def test_a_run_id_that_could_name_another_folder_is_refused(tmp_path: Path) -> None:
    state = ClientState.open(tmp_path, "client")
    for bad in ("", "../x", "AB", "a" * 65):
        with pytest.raises(ValueError, match="run id"):
            state.save_residual({"w": np.zeros(4, np.float32)}, 1, run=bad)
