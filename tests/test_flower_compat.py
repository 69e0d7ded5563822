"""The Flower boundary: each touch point's check passes on the installed Flower and fails loudly
(naming the version) when what it relies on is gone; nothing else imports Flower's internals."""

from __future__ import annotations

import ast
import importlib.util
import random
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.common.secure_aggregation import quantization
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp.strategy import strategy_utils
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid, InMemoryGrid
from packaging.specifiers import SpecifierSet

from feddistill import flower_compat
from feddistill.flower_compat import FlowerCompatError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "feddistill"
BOUNDARY = PACKAGE / "flower_compat.py"

# What feddistill may import from Flower outside the boundary: the public API.
PUBLIC_MODULES = {
    "flwr": {"__version__"},
    "flwr.app": None,  # None: any name
    "flwr.clientapp": None,
    "flwr.serverapp": None,
    "flwr.serverapp.strategy": "classes",
    "flwr.simulation": {"run_simulation"},
}


def _assert_loud(err: pytest.ExceptionInfo[ImportError], touch: str, what: str) -> None:
    # By name: a boundary imported afresh (below) has its own FlowerCompatError class.
    assert type(err.value).__name__ == "FlowerCompatError"
    message = str(err.value)
    assert touch in message
    assert what in message
    assert f"flwr {flwr.__version__}" in message
    assert f"flwr{flower_compat.TESTED_RANGE}" in message


# -- every check passes on the installed Flower --------------------------------------------


@pytest.mark.parametrize("check", flower_compat.CHECKS, ids=lambda c: c.__name__)
def test_check_passes_on_installed_flower(check: Callable[[], None]) -> None:
    check()


# -- and fails loudly when what it relies on is gone ---------------------------------------


def _add_messages_with_other_names(state: Any, queue: Any, mapping: Any, stop: Any) -> None: ...


def _run_api_without_dispatcher(*args: Any) -> None:
    return None


def _linkstate_init_without_lock(self: Any, *args: Any) -> None:
    self.message_ins_store = {}


def _quantize_with_other_names(arrays: Any, clip: Any, levels: Any) -> Any: ...


def _send_and_receive_sleeping_5(self: Any, messages: Any, *, timeout: Any = None) -> Any:
    time.sleep(5)


BREAKS = [
    # (check, owner, attribute, replacement or None to delete it, what the message says)
    ("check_dispatcher", vce_api, "add_messages_to_queue", None, "'add_messages_to_queue'"),
    (
        "check_dispatcher",
        vce_api,
        "add_messages_to_queue",
        _add_messages_with_other_names,
        "feddistill calls it with ('state', 'queue', 'nodes_mapping', 'f_stop')",
    ),
    ("check_dispatcher", vce_api, "run_api", _run_api_without_dispatcher, "no longer uses"),
    (
        "check_dispatcher",
        InMemoryLinkState,
        "__init__",
        _linkstate_init_without_lock,
        "no longer sets self.lock",
    ),
    ("check_dispatcher", Metadata, "delivered_at", None, "no property 'delivered_at'"),
    ("check_node_registration", vce_api, "_register_nodes", None, "'_register_nodes'"),
    ("check_sampling", strategy_utils, "random", random.Random(), "not the random module"),
    (
        "check_grid_loop",
        HttpGrid,
        "send_and_receive",
        _send_and_receive_sleeping_5,
        "no longer does 'time.sleep(3)'",
    ),
    ("check_task_identity", TaskIdentity, "_run_id", None, "no class field _run_id"),
    (
        "check_secaggplus_format",
        quantization,
        "quantize",
        _quantize_with_other_names,
        "feddistill calls it with ('parameters', 'clipping_range', 'target_range')",
    ),
]
TOUCH = {
    "check_dispatcher": flower_compat.DISPATCHER,
    "check_node_registration": flower_compat.NODE_REGISTRATION,
    "check_sampling": flower_compat.SAMPLING,
    "check_grid_loop": flower_compat.GRID_LOOP,
    "check_task_identity": flower_compat.TASK_IDENTITY,
    "check_secaggplus_format": flower_compat.SECAGG_FORMAT,
}


@pytest.mark.parametrize(
    ("check", "owner", "attribute", "replacement", "what"),
    BREAKS,
    ids=[f"{b[0]}-{b[2]}" for b in BREAKS],
)
def test_check_fails_loudly_when_flower_changes(
    monkeypatch: pytest.MonkeyPatch,
    check: str,
    owner: Any,
    attribute: str,
    replacement: Any,
    what: str,
) -> None:
    # Prepare: the installed Flower, with one thing the boundary relies on renamed or changed
    if replacement is None:
        monkeypatch.delattr(owner, attribute)
    else:
        monkeypatch.setattr(owner, attribute, replacement)

    # Execute / Assert
    with pytest.raises(FlowerCompatError) as err:
        getattr(flower_compat, check)()
    _assert_loud(err, TOUCH[check], what)


def test_every_touch_point_has_a_breaking_case() -> None:
    assert {b[0] for b in BREAKS} == {c.__name__ for c in flower_compat.CHECKS}


def _import_boundary_afresh() -> None:
    spec = importlib.util.spec_from_file_location("flower_compat_probe", BOUNDARY)
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_import_fails_loudly_when_a_private_module_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "flwr.supercore.task_identity", None)
    with pytest.raises(ImportError) as err:
        _import_boundary_afresh()
    _assert_loud(err, flower_compat.TASK_IDENTITY, "flwr.supercore.task_identity")


def test_import_runs_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(vce_api, "_register_nodes")
    with pytest.raises(ImportError) as err:
        _import_boundary_afresh()
    _assert_loud(err, flower_compat.NODE_REGISTRATION, "'_register_nodes'")


# -- what each wrapper does -------------------------------------------------------------------
# The dispatcher's behaviour: tests/test_simulation_scale.py
# (test_dispatcher_delivers_only_addressed_messages_and_is_restored).


def test_sampling_with_makes_flower_sample_with_the_given_generator() -> None:
    class Nodes:
        def get_node_ids(self) -> list[int]:
            return list(range(100))

    original = strategy_utils.random
    with flower_compat.sampling_with(random.Random(3)):
        first, _ = strategy_utils.sample_nodes(Nodes(), 0, 5)  # type: ignore[arg-type]
    with flower_compat.sampling_with(random.Random(3)):
        again, _ = strategy_utils.sample_nodes(Nodes(), 0, 5)  # type: ignore[arg-type]
    assert first == again == random.Random(3).sample(range(100), 5)
    assert strategy_utils.random is original


def test_on_nodes_registered_sees_the_mapping_and_is_restored() -> None:
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    original = vce_api._register_nodes
    seen: list[dict[int, int]] = []
    with flower_compat.on_nodes_registered(seen.append):
        mapping = vce_api._register_nodes(num_nodes=3, state_factory=factory)
    assert seen == [mapping]
    assert sorted(mapping.values()) == [0, 1, 2]
    assert vce_api._register_nodes is original


def test_grid_kinds_and_their_pull_intervals() -> None:
    grid = InMemoryGrid.__new__(InMemoryGrid)  # no link state needed to ask its kind
    grid.pull_interval = 0.1
    assert flower_compat.is_in_memory_grid(grid) and not flower_compat.is_http_grid(grid)
    assert flower_compat.in_memory_pull_interval(grid) == 0.1
    http = HttpGrid.__new__(HttpGrid)
    assert flower_compat.is_http_grid(http) and not flower_compat.is_in_memory_grid(http)
    assert flower_compat.HTTP_GRID_PULL_INTERVAL == 3.0


def test_lent_task_identity_is_given_back() -> None:
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    with flower_compat.lent_task_identity():
        assert TaskIdentity.run_id is not None
    assert (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id) == saved


# -- touch points dropped: the public copy stays equal to Flower's ----------------------------


def test_byte_counting_walks_the_same_objects_as_flower() -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from feddistill.records import nested_objects

    shared = Array(np.arange(12, dtype=np.float32))
    content = RecordDict(
        {
            "arrays": ArrayRecord({"a": shared, "b": Array(np.ones((300, 300), np.float32))}),
            "same": ArrayRecord({"a": shared}),  # the same Array twice: shipped once
            "config": ConfigRecord({"x": 1, "y": b"z"}),
            "metrics": MetricRecord({"m": 0.5}),
        }
    )
    assert nested_objects(content).keys() == get_all_nested_objects(content).keys()


def test_client_error_code_is_flowers() -> None:
    from flwr.common.constant import ErrorCode

    from feddistill.client import app

    assert ErrorCode.MOD_FAILED_PRECONDITION == app._MOD_FAILED_PRECONDITION


# -- nothing else imports Flower's internals --------------------------------------------------


def _flower_imports(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import of flwr (name None for ``import flwr.x``)."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if _is_flwr(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_flwr(node.module):
            found += [(node.lineno, node.module, a.name) for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and _is_flwr(str(node.args[0].value))
        ):
            found.append((node.lineno, str(node.args[0].value), None))
    return found


def _is_flwr(module: str) -> bool:
    return module == "flwr" or module.startswith("flwr.")


def _is_public(module: str, name: str | None) -> bool:
    if module not in PUBLIC_MODULES:
        return False
    allowed = PUBLIC_MODULES[module]
    if name is None or allowed is None:
        return True
    if allowed == "classes":
        import flwr.serverapp.strategy as strategies

        return isinstance(getattr(strategies, name, None), type)
    return name in allowed


def test_only_the_boundary_imports_private_flower_names() -> None:
    private = [
        f"{path.relative_to(ROOT)}:{line}: {module}{'' if name is None else ' ' + name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != BOUNDARY
        for line, module, name in _flower_imports(ast.parse(path.read_text()))
        if not _is_public(module, name)
    ]
    assert private == []


def test_the_scan_sees_private_imports() -> None:
    tree = ast.parse(
        "from flwr.serverapp.strategy import strategy_utils, FedAvg\n"
        "import flwr.superlink.grid\n"
        "from flwr.app import Message\n"
        "importlib.import_module('flwr.supercore.run')\n"
    )
    assert [(m, n) for _, m, n in _flower_imports(tree) if not _is_public(m, n)] == [
        ("flwr.serverapp.strategy", "strategy_utils"),
        ("flwr.superlink.grid", None),
        ("flwr.supercore.run", None),
    ]


def _module_level_imports(path: Path) -> set[str]:
    """feddistill modules ``path`` imports when it is imported (not inside functions)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("feddistill")}


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def test_the_client_app_does_not_import_the_boundary() -> None:
    # A ClientApp process starts per message; the boundary's imports cost it about a second.
    seen: set[str] = set()
    todo = ["feddistill.client.app"]
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages' __init__
        todo += sorted(_module_level_imports(path))
    assert "feddistill.records" in seen
    assert "feddistill.flower_compat" not in seen


# -- the pin ----------------------------------------------------------------------------------


def test_pyproject_pins_flower_to_the_tested_range() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = [d for d in pyproject["project"]["dependencies"] if d.startswith("flwr[")]
    assert flower == [f"flwr[simulation]{flower_compat.TESTED_RANGE}"]


def test_the_lock_is_inside_the_tested_range() -> None:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    locked = [line.split("==")[1] for line in lines if line.startswith("flwr==")]
    assert len(locked) == 1
    assert locked[0] in SpecifierSet(flower_compat.TESTED_RANGE)
