"""Every use of Flower's private API, in one place, checked when this module is imported.

Flower's public API is what ``flwr.app``, ``flwr.serverapp``, ``flwr.serverapp.strategy`` (its
classes), ``flwr.clientapp`` and ``flwr.simulation.run_simulation`` export. Where they offer no
hook, feddistill reaches into Flower's internals, and only here:

* simulation dispatcher (:func:`addressed_dispatcher`): replaces
  ``vce_api.add_messages_to_queue`` and reads ``InMemoryLinkState.lock`` /
  ``.message_ins_store`` and each message's ``metadata.delivered_at``;
* simulated node registration (:func:`on_nodes_registered`): wraps ``vce_api._register_nodes``;
* client sampling (:func:`sampling_with`): swaps ``strategy_utils.random``;
* Grid loop (:func:`is_in_memory_grid`, :func:`is_http_grid`, :data:`HTTP_GRID_PULL_INTERVAL`):
  the concrete Grid classes of ``flwr.superlink.grid`` and how their ``send_and_receive`` waits;
* task identity (:func:`lent_task_identity`): sets ``TaskIdentity`` outside a Flower runtime;
* Grid types (:data:`NodeInfo`, :data:`Run`): the types in the public ``Grid``'s signatures;
* SecAgg+ message format (:data:`secaggplus`): Flower's own quantization, mask generator and
  array serialization, to size its SecAgg+ reply exactly (``feddistill.bench.secagg``).

A minor release may rename any of these. Replacing a renamed function would do nothing and
reading a renamed field would kill the dispatcher thread, after which every round waits for its
timeout; so the checks below run at import and stop with a :class:`FlowerCompatError` that names
the touch point, what changed, the installed Flower and the tested range. docs/development.md
("The Flower boundary") says what to do when one fails. Server side only: the ClientApp never
imports this module (it would cost each ClientApp process about a second of imports).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import random
import textwrap
import threading
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

import flwr
from flwr.app import Metadata
from flwr.serverapp import Grid

# pyproject.toml's flwr range (tests/test_flower_compat.py keeps the two equal).
TESTED_RANGE = ">=1.42,<1.43"

DISPATCHER = "simulation dispatcher (feddistill.simulation.engine.dispatch_to_addressed_nodes)"
NODE_REGISTRATION = "simulated node registration (feddistill.simulation.engine.record_partitions)"
SAMPLING = "client sampling (feddistill.server.grids.private_sampling)"
GRID_LOOP = "Grid loop (feddistill.server.progress.WatchedGrid)"
TASK_IDENTITY = "task identity (feddistill.bench.wirecost.dense_exchange_bytes)"
GRID_TYPES = "Grid types (feddistill.server.grids.DelegatingGrid)"
SECAGG_FORMAT = "SecAgg+ message format (feddistill.bench.secagg.flower_masked_reply_bytes)"


class FlowerCompatError(ImportError):
    """The installed Flower lacks a private name, field or signature feddistill relies on."""


def _broken(touch: str, what: str) -> FlowerCompatError:
    return FlowerCompatError(
        f"feddistill's Flower boundary, {touch}: {what}. Installed flwr "
        f"{getattr(flwr, '__version__', 'unknown')}; feddistill is tested with flwr{TESTED_RANGE}. "
        "Install the tested version (pip install -e . -c constraints.txt) or adapt "
        "feddistill/flower_compat.py (docs/development.md, 'The Flower boundary')."
    )


@contextlib.contextmanager
def _importing(touch: str) -> Iterator[None]:
    try:
        yield
    except ImportError as err:
        raise _broken(touch, str(err)) from err


with _importing(DISPATCHER):
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
with _importing(SAMPLING):
    from flwr.serverapp.strategy import strategy_utils
with _importing(GRID_LOOP):
    from flwr.superlink.grid import HttpGrid, InMemoryGrid
with _importing(TASK_IDENTITY):
    from flwr.supercore.task_identity import TaskIdentity
with _importing(GRID_TYPES):
    # Re-exported for DelegatingGrid's annotations.
    from flwr.proto.node_pb2 import NodeInfo as NodeInfo
    from flwr.supercore.run import Run as Run
with _importing(SECAGG_FORMAT):
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation import ndarrays_arithmetic, quantization
    from flwr.common.secure_aggregation import secaggplus_utils as _secaggplus_utils
    from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggPlusKey


# -- checks ---------------------------------------------------------------------------------


def _require_attr(touch: str, owner: Any, name: str) -> Any:
    if not hasattr(owner, name):
        raise _broken(touch, f"{_name(owner)} has no attribute {name!r}")
    return getattr(owner, name)


def _require_params(touch: str, fn: Callable[..., Any], names: tuple[str, ...]) -> None:
    """``fn`` takes ``names`` (in this order, besides ``self``), the way our code calls it."""
    params = tuple(p for p in inspect.signature(fn).parameters if p != "self")
    if params[: len(names)] != names:
        raise _broken(touch, f"{_name(fn)} takes {params}, feddistill calls it with {names} first")


def _require_global(touch: str, fn: Callable[..., Any], name: str) -> None:
    """``fn`` looks ``name`` up in its module when it runs, so replacing that attribute works."""
    if name not in fn.__code__.co_names:
        raise _broken(touch, f"{_name(fn)} no longer uses the module-level {name!r}")


def _require_instance_attrs(touch: str, cls: type, names: tuple[str, ...]) -> None:
    """``cls.__init__`` assigns ``self.<name>`` for every name (instance fields we read)."""
    tree = _source_tree(touch, cls.__init__)
    if tree is None:
        return
    assigned = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    missing = [n for n in names if n not in assigned]
    if missing:
        raise _broken(touch, f"{cls.__name__}.__init__ no longer sets self.{missing[0]}")


def _require_property(touch: str, cls: type, name: str) -> None:
    if not isinstance(inspect.getattr_static(cls, name, None), property):
        raise _broken(touch, f"{_name(cls)} has no property {name!r}")


def _require_source(touch: str, fn: Callable[..., Any], snippet: str) -> None:
    """``fn``'s source contains ``snippet`` (a constant feddistill mirrors)."""
    tree = _source_tree(touch, fn)
    if tree is not None and snippet not in ast.unparse(tree):
        raise _broken(touch, f"{_name(fn)} no longer does {snippet!r}")


def _source_tree(touch: str, fn: Callable[..., Any]) -> ast.AST | None:
    """The parsed source of ``fn``; None where Flower is installed without sources."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    return ast.parse(textwrap.dedent(source))


def _name(obj: Any) -> str:
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def check_dispatcher() -> None:
    add = _require_attr(DISPATCHER, vce_api, "add_messages_to_queue")
    _require_params(DISPATCHER, add, ("state", "queue", "nodes_mapping", "f_stop"))
    _require_global(
        DISPATCHER, _require_attr(DISPATCHER, vce_api, "run_api"), "add_messages_to_queue"
    )
    _require_instance_attrs(DISPATCHER, InMemoryLinkState, ("lock", "message_ins_store"))
    get = _require_attr(DISPATCHER, InMemoryLinkState, "get_message_ins")
    _require_params(DISPATCHER, get, ("node_id", "limit"))
    _require_property(DISPATCHER, Metadata, "delivered_at")
    _require_property(DISPATCHER, Metadata, "dst_node_id")


def check_node_registration() -> None:
    register = _require_attr(NODE_REGISTRATION, vce_api, "_register_nodes")
    _require_params(NODE_REGISTRATION, register, ("num_nodes", "state_factory"))
    start = _require_attr(NODE_REGISTRATION, vce_api, "start_vce")
    _require_global(NODE_REGISTRATION, start, "_register_nodes")


def check_sampling() -> None:
    if _require_attr(SAMPLING, strategy_utils, "random") is not random:
        raise _broken(SAMPLING, "strategy_utils.random is not the random module")
    sample_nodes = _require_attr(SAMPLING, strategy_utils, "sample_nodes")
    _require_global(SAMPLING, sample_nodes, "random")


def check_grid_loop() -> None:
    for cls in (InMemoryGrid, HttpGrid):
        if not issubclass(cls, Grid):
            raise _broken(GRID_LOOP, f"{_name(cls)} is not a flwr.serverapp.Grid")
        _require_params(GRID_LOOP, cls.send_and_receive, ("messages", "timeout"))
    _require_instance_attrs(GRID_LOOP, InMemoryGrid, ("pull_interval",))
    _require_source(GRID_LOOP, InMemoryGrid.send_and_receive, "time.sleep(self.pull_interval)")
    _require_source(GRID_LOOP, HttpGrid.send_and_receive, "time.sleep(3)")


def check_task_identity() -> None:
    for name in ("run_id", "task_id", "node_id"):
        if f"_{name}" not in vars(TaskIdentity):
            raise _broken(TASK_IDENTITY, f"TaskIdentity has no class field _{name}")
        prop = inspect.getattr_static(type(TaskIdentity), name, None)
        if not isinstance(prop, property) or prop.fset is None:
            raise _broken(TASK_IDENTITY, f"TaskIdentity.{name} is not a settable property")


def check_secaggplus_format() -> None:
    _require_params(SECAGG_FORMAT, quantization.quantize,
                    ("parameters", "clipping_range", "target_range"))  # fmt: skip
    _require_params(SECAGG_FORMAT, _secaggplus_utils.pseudo_rand_gen,
                    ("seed", "num_range", "dimensions_list"))  # fmt: skip
    for name in ("parameters_addition", "parameters_mod"):
        _require_attr(SECAGG_FORMAT, ndarrays_arithmetic, name)
    _require_attr(SECAGG_FORMAT, SecAggPlusKey, "MASKED_PARAMETERS")


class _SecAggPlus:
    """Flower's functions that make a SecAgg+ stage-2 reply, under one name."""

    quantize = staticmethod(quantization.quantize)
    pseudo_rand_gen = staticmethod(_secaggplus_utils.pseudo_rand_gen)
    parameters_addition = staticmethod(ndarrays_arithmetic.parameters_addition)
    parameters_mod = staticmethod(ndarrays_arithmetic.parameters_mod)
    ndarray_to_bytes = staticmethod(ndarray_to_bytes)
    masked_parameters_key = SecAggPlusKey.MASKED_PARAMETERS


secaggplus = _SecAggPlus


CHECKS: tuple[Callable[[], None], ...] = (
    check_dispatcher,
    check_node_registration,
    check_sampling,
    check_grid_loop,
    check_task_identity,
    check_secaggplus_format,
)
for _check in CHECKS:
    _check()


# -- simulation dispatcher ------------------------------------------------------------------


@contextlib.contextmanager
def addressed_dispatcher(period: float) -> Iterator[None]:
    """Replace Flower's simulation dispatcher loop with one that asks only addressed nodes.

    Flower's ``vce_api.add_messages_to_queue`` calls ``state.get_message_ins(node_id,
    limit=1)`` for every registered node every 0.1 s. The replacement makes those same calls for
    only the nodes that have an undelivered message in the in-memory link state, every
    ``period`` seconds; for any other state class it runs Flower's loop. Restored on exit.
    """
    original: Callable[..., None] = vce_api.add_messages_to_queue

    def add_addressed_messages_to_queue(
        state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
    ) -> None:
        if not isinstance(state, InMemoryLinkState):
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                addressed = {
                    msg.metadata.dst_node_id
                    for msg in state.message_ins_store.values()
                    if msg.metadata.delivered_at == ""
                }
            for node_id in sorted(addressed):
                if node_id in nodes_mapping:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(period)

    vce_api.add_messages_to_queue = add_addressed_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


# -- simulated node registration ------------------------------------------------------------


@contextlib.contextmanager
def on_nodes_registered(callback: Callable[[dict[int, int]], None]) -> Iterator[None]:
    """Call ``callback(node id -> partition id)`` when the simulation creates its nodes.

    Wraps ``vce_api._register_nodes`` (which gives the virtual nodes random ids); restored on
    exit.
    """
    original: Callable[..., dict[int, int]] = vce_api._register_nodes

    def register_nodes(*args: Any, **kwargs: Any) -> dict[int, int]:
        mapping = original(*args, **kwargs)
        callback(mapping)
        return mapping

    vce_api._register_nodes = register_nodes
    try:
        yield
    finally:
        vce_api._register_nodes = original


# -- client sampling ------------------------------------------------------------------------


@contextlib.contextmanager
def sampling_with(rng: random.Random) -> Iterator[None]:
    """Flower's strategies sample clients (``random.sample``) with ``rng``; restored on exit."""
    original = strategy_utils.random
    strategy_utils.random = rng  # type: ignore[assignment]
    try:
        yield
    finally:
        strategy_utils.random = original


# -- Grid loop ------------------------------------------------------------------------------

# HttpGrid.send_and_receive (deployment) sleeps a fixed 3 s between pulls (check_grid_loop).
HTTP_GRID_PULL_INTERVAL = 3.0


def is_in_memory_grid(grid: Grid) -> bool:
    """The simulation's Grid, whose loop waits ``in_memory_pull_interval(grid)`` per pull."""
    return isinstance(grid, InMemoryGrid)


def in_memory_pull_interval(grid: Grid) -> float:
    return float(grid.pull_interval)  # type: ignore[attr-defined]


def is_http_grid(grid: Grid) -> bool:
    """The deployment Grid, whose loop waits :data:`HTTP_GRID_PULL_INTERVAL` per pull."""
    return isinstance(grid, HttpGrid)


# -- task identity --------------------------------------------------------------------------


@contextlib.contextmanager
def lent_task_identity() -> Iterator[None]:
    """Messages need a task identity, which only a Flower runtime sets; lend one if unset."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
