"""Checkpoint and resume of the server's run.

Flower's ``Strategy.start`` always counts rounds from 1 and has no resume API, so the server
saves what a continuation needs after every completed round, in one file written atomically
(temp file + ``os.replace``: a crash mid-write leaves the previous round's file intact)::

    output-dir/state/server.npz
        __manifest__          JSON (as uint8): round, run id, config, and each stateful part's
                              ``state_dict()`` by the part's name (plain values inline, arrays
                              by name)
        a0, a1, ...           the global exchanged arrays (dtype as aggregated: float32 with
                              FedAvg; full precision, never the compressed downlink) and every
                              array of the parts' states

Nothing is found by scanning attributes. Like ``torch.nn.Module`` and ``torch.optim.Optimizer``,
each part that must survive a restart declares its state with ``state_dict()`` /
``load_state_dict()`` (:class:`Stateful`), and the run (:mod:`feddistill.server.lifecycle`)
names its parts: the strategy (:meth:`feddistill.strategies.CompressedStrategy.state_dict`
nests its downlink chain, its privacy step and, through :mod:`feddistill.strategies.state`, the
inner Flower strategy's declared fields), the run record, the random generators
(:class:`RandomStates`: Flower's sampling draws from :data:`feddistill.server.grids.SAMPLER`
while the server runs; torch's CPU generator for anything seeded from it) and the running tail
average, when the run averages its last rounds.

The run id (:data:`feddistill.keys.RUN_ID`) is drawn for a fresh run and kept by a resumed
one; clients key what they keep between rounds by it (docs/state.md).

:class:`ReproducibleGrid` removes the two timing-dependent inputs of a round (node-id order and
reply arrival order), so that a resumed run equals an uninterrupted one, not just resembles it.
On the client side, error-feedback residuals are saved per run and round
(:meth:`feddistill.node_state.ClientState.save_residual`), so a round redone after a restart
starts from the same residual as the first time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from feddistill.codec import save_arrays
from feddistill.config import Config, ConfigError
from feddistill.server.grids import SAMPLER, DelegatingGrid, node_order
from feddistill.server.results import json_default

FORMAT_VERSION = 3  # 3: named parts; 2: declared strategy state, fixed fields; 1: scanned
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


class Stateful(Protocol):
    """A part of the run that must survive a restart (the ``torch.optim.Optimizer`` API)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class ServerState:
    """Everything a resumed run needs to continue exactly after ``round``."""

    round: int
    global_arrays: dict[str, np.ndarray]
    parts: dict[str, Any] = field(default_factory=dict)  # part name -> its state_dict()
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""  # hex of the run id clients scope their state by


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_FILE


# -- file format ------------------------------------------------------------------------------
def _pack(value: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Describe ``value`` in JSON, moving its arrays into ``arrays`` under fresh names.

    Takes what ``state_dict()`` methods return: None, bool/int/float/str, bytes, numpy arrays,
    ``ArrayRecord``, and dicts (string keys), lists and tuples of these. A dict or list of
    plain JSON values only (the run record's rounds) is kept as it is.
    """
    if isinstance(value, dict | list) and _plain_json(value):
        return {"kind": "json", "value": value}
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


def _plain_json(value: Any) -> bool:
    """True for None, bool/int/float/str and dicts (string keys) and lists of these."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return False


def _unpack(desc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
    kind = desc["kind"]
    if kind == "json":
        return desc["value"]
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
        "config": state.config,
        "parts": {name: _pack(part, arrays) for name, part in state.parts.items()},
    }
    blob = np.frombuffer(json.dumps(manifest, default=json_default).encode(), dtype=np.uint8)
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
        parts={name: _unpack(desc, arrays) for name, desc in manifest["parts"].items()},
        config=manifest["config"],
        run_id=str(manifest["run_id"]),
    )


# -- random number generators -----------------------------------------------------------------
class RandomStates:
    """The client sampler (:data:`SAMPLER`) and torch's CPU generator, as one stateful part."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = SAMPLER.getstate()
        return {
            "sampler": {"version": version, "gauss": gauss},
            "sampler_internal": np.asarray(internal, dtype=np.int64),
            "torch": torch.get_rng_state().numpy().copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sampler = state["sampler"]
        internal = tuple(int(x) for x in state["sampler_internal"])
        SAMPLER.setstate((sampler["version"], internal, sampler["gauss"]))
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8)))


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
    parts: Mapping[str, Stateful],
    config: Mapping[str, Any],
    run_id: str = "",
) -> ServerState:
    """The state after ``server_round`` (call once the round is recorded): each part's
    ``state_dict()`` under its name, the global arrays copied, the run's flat config and its
    hex run id."""
    return ServerState(
        round=server_round,
        run_id=run_id,
        global_arrays={n: np.array(a, copy=True) for n, a in global_arrays.items()},
        parts={name: part.state_dict() for name, part in parts.items()},
        config=dict(config),
    )


def restore(state: ServerState, cfg: Config, parts: Mapping[str, Stateful]) -> None:
    """Put ``state`` back into the freshly built ``parts`` of a run with config ``cfg``.

    Raises:
        ConfigError: the saved run used other settings (outside :data:`RESUMABLE_KEYS`),
            completed more rounds than ``rounds`` asks for now, or kept other parts.
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
    if set(state.parts) != set(parts):
        raise ConfigError(
            f"resume = true, but the saved run kept the state of {sorted(state.parts)} and "
            f"this run has {sorted(parts)}: finish it with the version that started it, or "
            "start afresh (resume = false)"
        )
    for name, part in parts.items():
        part.load_state_dict(state.parts[name])


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
