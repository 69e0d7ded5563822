"""Checkpoint and resume of the server's run.

Flower's ``Strategy.start`` always counts rounds from 1 and has no resume API, so the server
saves what a continuation needs after every completed round, in one file written atomically
(temp file + ``os.replace``: a crash mid-write leaves the previous round's file intact)::

    output-dir/state/server.npz
        __manifest__          JSON (as uint8): round, run id, config, RNG states, run record,
                              the strategy's state (scalars inline, arrays by name)
        a0, a1, ...           the global exchanged arrays (dtype as aggregated: float32 with
                              FedAvg; full precision, never the compressed downlink) and every
                              array of the strategy's state

Nothing is found by scanning attributes: the strategy's state is what
:meth:`feddistill.strategies.CompressedStrategy.state_dict` declares (its downlink chain and,
through :mod:`feddistill.strategies.state`, the inner Flower strategy's declared fields), the
running tail average what :meth:`feddistill.server.tail.TailAverage.state` returns. The client
sampler's state is saved (Flower's sampling draws from :data:`feddistill.server.grids.SAMPLER`
while the server runs); torch's CPU generator too, for anything seeded from it.

The run id (:data:`feddistill.keys.RUN_ID`) is drawn for a fresh run and kept by a resumed
one; clients key what they keep between rounds by it (docs/state.md).

:class:`ReproducibleGrid` removes the two timing-dependent inputs of a round (node-id order and
reply arrival order), so that a resumed run equals an uninterrupted one, not just resembles it.
On the client side, error-feedback residuals are saved per run and round
(:meth:`feddistill.client.state.ClientState.save_residual`), so a round redone after a restart
starts from the same residual as the first time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from feddistill.codec import save_arrays
from feddistill.config import Config, ConfigError
from feddistill.server.grids import SAMPLER, DelegatingGrid, node_order

if TYPE_CHECKING:
    from feddistill.server.results import RunRecord
    from feddistill.strategies import CompressedStrategy

FORMAT_VERSION = 2  # 2: declared strategy state and the run id (1: scanned attributes)
STATE_FILE = Path("state") / "server.npz"
_MANIFEST = "__manifest__"

# Keys a resumed run may change; any other difference means a different experiment.
RESUMABLE_KEYS = frozenset(
    {
        "resume",
        "rounds",
        "output-dir",
        "cache-dir",
        "checkpoints",
        "cache.max-mb",
        "server.round-timeout",
        "server.min-replies",
        "server.local-only",
        "train.device",
        # Where the figures are tracked, not what is computed: a resume may turn tracking on.
        "tracking.backend",
        "tracking.uri",
        "tracking.experiment",
    }
)


@dataclass
class ServerState:
    """Everything a resumed run needs to continue exactly after ``round``."""

    round: int
    global_arrays: dict[str, np.ndarray]
    strategy: dict[str, Any] = field(default_factory=dict)  # CompressedStrategy.state_dict()
    config: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    python_random: Any = None
    torch_random: np.ndarray | None = None
    tail: dict[str, Any] | None = None  # the running sum of server.average-last, if any
    run_id: str = ""  # hex of the run id clients scope their state by


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_FILE


# -- file format ------------------------------------------------------------------------------
def _pack(value: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Describe ``value`` in JSON, moving its arrays into ``arrays`` under fresh names.

    Takes what ``state_dict()`` methods return: None, bool/int/float/str, bytes, numpy arrays,
    ``ArrayRecord``, and dicts (string keys), lists and tuples of these.
    """
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool | int | float | str):
        return {"kind": "value", "value": value}
    if isinstance(value, np.generic):
        return {"kind": "value", "value": value.item()}
    if isinstance(value, bytes):
        return {"kind": "bytes", "hex": value.hex()}
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(value)
        return {"kind": "array", "item": key}
    if isinstance(value, ArrayRecord):
        return {
            "kind": "arrayrecord",
            "items": {k: _pack(a.numpy(), arrays) for k, a in value.items()},
        }
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"state dict keys must be strings, got {sorted(map(repr, value))}")
        return {"kind": "dict", "items": {k: _pack(v, arrays) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"kind": type(value).__name__, "items": [_pack(v, arrays) for v in value]}
    raise TypeError(f"cannot save state of type {type(value).__name__}")


def _unpack(desc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
    kind = desc["kind"]
    if kind == "none":
        return None
    if kind == "value":
        return desc["value"]
    if kind == "bytes":
        return bytes.fromhex(desc["hex"])
    if kind == "array":
        return arrays[desc["item"]]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(_unpack(v, arrays)) for k, v in desc["items"].items()})
    if kind == "dict":
        return {k: _unpack(v, arrays) for k, v in desc["items"].items()}
    items = [_unpack(v, arrays) for v in desc["items"]]
    return tuple(items) if kind == "tuple" else items


def save_state(path: Path, state: ServerState) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
    arrays: dict[str, np.ndarray] = {}
    manifest = {
        "format_version": FORMAT_VERSION,
        "round": state.round,
        "run_id": state.run_id,
        "global": _pack(state.global_arrays, arrays),
        "strategy": _pack(state.strategy, arrays),
        "config": state.config,
        "record": state.record,
        "python_random": state.python_random,
        "torch_random": _pack(state.torch_random, arrays),
        "tail": _pack(state.tail, arrays),
    }
    blob = np.frombuffer(json.dumps(manifest, default=_json_default).encode(), dtype=np.uint8)
    save_arrays(path, {_MANIFEST: blob, **arrays})  # atomic: temp file + os.replace


def load_state(path: Path) -> ServerState | None:
    """The state saved at ``path``, or None if there is none."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    manifest = json.loads(arrays.pop(_MANIFEST).tobytes().decode())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}; this feddistill reads {FORMAT_VERSION}: "
            "finish that run with the version that started it, or start afresh (resume = false)"
        )
    return ServerState(
        round=int(manifest["round"]),
        global_arrays=_unpack(manifest["global"], arrays),
        strategy=_unpack(manifest["strategy"], arrays),
        config=manifest["config"],
        record=manifest["record"],
        python_random=manifest["python_random"],
        torch_random=_unpack(manifest["torch_random"], arrays),
        tail=_unpack(manifest["tail"], arrays),
        run_id=str(manifest["run_id"]),
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# -- random number generators -----------------------------------------------------------------
def random_states() -> tuple[Any, np.ndarray]:
    """The client sampler's state (JSON-friendly lists) and torch's CPU generator state."""
    version, internal, gauss = SAMPLER.getstate()
    return [version, list(internal), gauss], torch.get_rng_state().numpy().copy()


def set_random_states(python_random: Any, torch_random: np.ndarray | None) -> None:
    version, internal, gauss = python_random
    SAMPLER.setstate((version, tuple(internal), gauss))
    if torch_random is not None:
        torch.set_rng_state(torch.from_numpy(np.asarray(torch_random, dtype=np.uint8)))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys (outside :data:`RESUMABLE_KEYS`) whose value differs, as ``key: saved -> now``."""
    keys = (set(saved) | set(current)) - RESUMABLE_KEYS
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(keys)
        if saved.get(k) != current.get(k)
    ]


# -- the run's side ---------------------------------------------------------------------------
def snapshot(
    server_round: int,
    global_arrays: Mapping[str, np.ndarray],
    strategy: CompressedStrategy,
    record: RunRecord,
    tail: dict[str, Any] | None = None,
    run_id: str = "",
) -> ServerState:
    """The state after ``server_round`` (call once the round is recorded).

    ``tail`` is :meth:`feddistill.server.tail.TailAverage.state` when the run averages its last
    rounds' models; ``run_id`` the hex run id the run sends its clients.

    The wrapper's traffic counters are already in ``record``; the rest of its state (a chained
    downlink, the inner strategy's) is what :meth:`CompressedStrategy.state_dict` declares.
    """
    python_random, torch_random = random_states()
    return ServerState(
        round=server_round,
        run_id=run_id,
        global_arrays={n: np.array(a, copy=True) for n, a in global_arrays.items()},
        strategy=strategy.state_dict(),
        config=dict(record.config),
        record={
            "rounds": record.rounds,
            "initial": record.initial,
            "events": record.events,
            "started": record.started,
        },
        python_random=python_random,
        torch_random=torch_random,
        tail=tail,
    )


def restore(
    state: ServerState, cfg: Config, strategy: CompressedStrategy, record: RunRecord
) -> None:
    """Put ``state`` back into a freshly built strategy and run record.

    Raises:
        ConfigError: the saved run used other settings (outside :data:`RESUMABLE_KEYS`), or
            completed more rounds than ``rounds`` asks for now.
    """
    diffs = config_differences(state.config, cfg.to_flat())
    if diffs:
        raise ConfigError(
            "resume = true, but the saved run in this output-dir used other settings ("
            + "; ".join(diffs)
            + "): use the saved values, another output-dir, or resume = false"
        )
    if state.round > cfg.rounds:
        raise ConfigError(
            f"invalid config rounds = {cfg.rounds}: the saved run already completed "
            f"{state.round} rounds; expected rounds >= {state.round}"
        )
    strategy.load_state_dict(state.strategy)
    strategy.round_offset = state.round
    record.rounds = list(state.record["rounds"])
    record.initial = dict(state.record["initial"])
    record.events = list(state.record["events"])
    record.started = float(state.record["started"])
    set_random_states(state.python_random, state.torch_random)


# -- reproducible rounds ----------------------------------------------------------------------
def _reply_key(msg: Message) -> tuple[int, bytes, bytes, int]:
    """Error replies last (by node); others by a digest of their arrays, then of their metrics.

    Arrays first: train replies also carry timings (``client-seconds``) that differ run to run.
    """
    if msg.has_error():
        return 1, b"", b"", msg.metadata.src_node_id
    arrays, metrics = hashlib.sha256(), hashlib.sha256()
    for _, record in sorted(msg.content.array_records.items()):
        for name, array in record.items():
            arrays.update(name.encode())
            arrays.update(array.data)
    for _, values in sorted(msg.content.metric_records.items()):
        metrics.update(json.dumps(dict(values), sort_keys=True).encode())
    return 0, arrays.digest(), metrics.digest(), msg.metadata.src_node_id


class ReproducibleGrid(DelegatingGrid):
    """A Grid view that makes a round a function of its inputs, not of timing.

    * ``get_node_ids`` is sorted: Flower samples with ``random.sample(list(node_ids), k)``, and
      the SuperLink promises no order, so only sorted ids make the sample a function of the
      ``random`` state the checkpoint restores. Simulated nodes are sorted by partition id
      (:func:`feddistill.server.grids.node_order`), since their ids are random per process.
    * ``send_and_receive`` returns replies in the order of their content's digest instead of
      their arrival order: aggregation sums floats in reply order, and float sums depend on it.

    With both, a resumed run repeats an uninterrupted one bit for bit, and two runs of
    ``feddistill simulate`` with the same config give the same result. (With ``flwr run`` the
    simulated SuperLink lives in another process, so node ids are sorted as they come and the
    sample differs between runs unless every client is sampled.)
    """

    def get_node_ids(self) -> list[int]:
        return node_order(self.inner.get_node_ids())

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return sorted(self.inner.send_and_receive(messages, timeout=timeout), key=_reply_key)
