"""Checkpoint and resume of the server's run.

Flower's ``Strategy.start`` always counts rounds from 1 and has no resume API, so the server
saves what a continuation needs after every completed round, in one file written atomically
(temp file + ``os.replace``: a crash mid-write leaves the previous round's file intact)::

    output-dir/state/server.npz
        __manifest__          JSON (as uint8): round, config, RNG states, run record, and where
                              each array below belongs
        a0, a1, ...           the global exchanged arrays (dtype as aggregated: float32 with
                              FedAvg; full precision, never the compressed downlink) and every
                              array-valued attribute of the inner strategy

The inner strategy's state is captured generically: every attribute that is a numpy array, a
dict or list of numpy arrays, or an ``ArrayRecord`` (FedAdam/FedYogi/FedAdagrad ``m_t``, ``v_t``,
``current_arrays``; FedAvgM ``momentum_vector`` and ``current_arrays``), so a strategy added
later needs no code here. The client sampler's state is saved (Flower's sampling draws from
:data:`feddistill.server.grids.SAMPLER` while the server runs); torch's CPU generator too, for
anything seeded from it.

:class:`ReproducibleGrid` removes the two timing-dependent inputs of a round (node-id order and
reply arrival order), so that a resumed run equals an uninterrupted one, not just resembles it.
On the client side, error-feedback residuals are saved per round
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

FORMAT_VERSION = 1
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
    strategy: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    python_random: Any = None
    torch_random: np.ndarray | None = None
    downlink: dict[str, Any] | None = None  # the chained downlink's state, if any
    tail: dict[str, Any] | None = None  # the running sum of server.average-last, if any
    privacy: dict[str, Any] | None = None  # CentralPrivacy.state_dict(), if privacy is on


def state_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STATE_FILE


# -- strategy state ---------------------------------------------------------------------------
def _is_arrays(value: Any) -> bool:
    if isinstance(value, np.ndarray | ArrayRecord):
        return True
    if isinstance(value, dict) and value:
        return all(isinstance(v, np.ndarray) for v in value.values())
    if isinstance(value, list | tuple) and value:
        return all(isinstance(v, np.ndarray) for v in value)
    return False


def capture_strategy(strategy: object) -> dict[str, Any]:
    """Every array-valued attribute of ``strategy`` (copied), by attribute name."""
    out: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if not _is_arrays(value):
            continue
        if isinstance(value, ArrayRecord):
            out[name] = ArrayRecord({k: Array(a.numpy().copy()) for k, a in value.items()})
        elif isinstance(value, np.ndarray):
            out[name] = value.copy()
        elif isinstance(value, dict):
            out[name] = {k: v.copy() for k, v in value.items()}
        else:
            out[name] = [v.copy() for v in value]
    return out


def restore_strategy(strategy: object, saved: Mapping[str, Any]) -> None:
    """Set the attributes captured by :func:`capture_strategy` back on a fresh strategy."""
    for name, value in saved.items():
        if not hasattr(strategy, name):
            raise ValueError(
                f"saved strategy state has attribute {name!r} that "
                f"{type(strategy).__name__} lacks; was server.strategy changed?"
            )
        setattr(strategy, name, value)


# -- file format ------------------------------------------------------------------------------
def _pack(value: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Describe ``value`` in JSON, moving its arrays into ``arrays`` under fresh names."""

    def put(a: np.ndarray) -> str:
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(a)
        return key

    if isinstance(value, ArrayRecord):
        return {"kind": "arrayrecord", "items": {k: put(a.numpy()) for k, a in value.items()}}
    if isinstance(value, np.ndarray):
        return {"kind": "array", "item": put(value)}
    if isinstance(value, dict):
        return {"kind": "dict", "items": {k: put(v) for k, v in value.items()}}
    return {"kind": type(value).__name__, "list": [put(v) for v in value]}


def _unpack(desc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Any:
    kind = desc["kind"]
    if kind == "arrayrecord":
        return ArrayRecord({k: Array(arrays[v]) for k, v in desc["items"].items()})
    if kind == "array":
        return arrays[desc["item"]]
    if kind == "dict":
        return {k: arrays[v] for k, v in desc["items"].items()}
    items = [arrays[v] for v in desc["list"]]
    return tuple(items) if kind == "tuple" else items


def save_state(path: Path, state: ServerState) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, replace)."""
    arrays: dict[str, np.ndarray] = {}
    manifest = {
        "format_version": FORMAT_VERSION,
        "round": state.round,
        "global": _pack(state.global_arrays, arrays),
        "strategy": {name: _pack(v, arrays) for name, v in state.strategy.items()},
        "config": state.config,
        "record": state.record,
        "python_random": state.python_random,
    }
    if state.torch_random is not None:
        manifest["torch_random"] = _pack(state.torch_random, arrays)
    if state.downlink is not None:
        manifest["downlink"] = {
            "meta": state.downlink["meta"],
            "broadcast": _pack(state.downlink["broadcast"], arrays),
            "payloads": _pack(state.downlink["payloads"], arrays),
        }
    if state.tail is not None:
        manifest["tail"] = {"meta": state.tail["meta"], "total": _pack(state.tail["total"], arrays)}
    if state.privacy is not None:
        manifest["privacy"] = state.privacy
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
        raise ValueError(f"{path} has format_version {version!r}; expected {FORMAT_VERSION}")
    torch_random = manifest.get("torch_random")
    downlink = manifest.get("downlink")
    if downlink is not None:
        downlink = {
            "meta": downlink["meta"],
            "broadcast": _unpack(downlink["broadcast"], arrays),
            "payloads": _unpack(downlink["payloads"], arrays),
        }
    tail = manifest.get("tail")
    if tail is not None:
        tail = {"meta": tail["meta"], "total": _unpack(tail["total"], arrays)}
    return ServerState(
        round=int(manifest["round"]),
        global_arrays=_unpack(manifest["global"], arrays),
        strategy={n: _unpack(d, arrays) for n, d in manifest["strategy"].items()},
        config=manifest["config"],
        record=manifest["record"],
        python_random=manifest["python_random"],
        torch_random=None if torch_random is None else _unpack(torch_random, arrays),
        downlink=downlink,
        tail=tail,
        privacy=manifest.get("privacy"),
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
) -> ServerState:
    """The state after ``server_round`` (call once the round is recorded).

    ``tail`` is :meth:`feddistill.server.tail.TailAverage.state` when the run averages its last
    rounds' models.

    The wrapper's traffic counters are already in ``record``; a stateless downlink is encoded
    afresh each round, a chained one (:class:`feddistill.codec.chain.ChainSender`) is saved.
    """
    python_random, torch_random = random_states()
    downlink = None
    if strategy.chain is not None:
        meta, broadcast, payloads = strategy.chain.state()
        downlink = {"meta": meta, "broadcast": broadcast, "payloads": payloads}
    return ServerState(
        round=server_round,
        global_arrays={n: np.array(a, copy=True) for n, a in global_arrays.items()},
        strategy=capture_strategy(strategy.inner),
        config=dict(record.config),
        record={
            "rounds": record.rounds,
            "initial": record.initial,
            "events": record.events,
            "started": record.started,
        },
        python_random=python_random,
        torch_random=torch_random,
        downlink=downlink,
        tail=tail,
        privacy=None if strategy.privacy is None else strategy.privacy.state_dict(),
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
    restore_strategy(strategy.inner, state.strategy)
    if strategy.chain is not None and state.downlink is not None:
        strategy.chain.load_state(**state.downlink)
    if strategy.privacy is not None and state.privacy is not None:
        strategy.privacy.load_state_dict(state.privacy)
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
