"""What each strategy must keep across a restart, declared rather than found.

Like ``torch.optim.Optimizer``, a stateful part says what its state is: a strategy of ours
defines ``state_dict()`` / ``load_state_dict()`` (the compressed wrapper, and any wrapper added
later, which nests its inner strategy's state through :func:`strategy_state_dict`); Flower's
own strategies cannot, so :data:`FLOWER_STATE` lists, per class, the attributes that hold what
their rounds accumulate (read from the installed ``flwr/serverapp/strategy`` sources):

* ``FedAvgM``: ``current_arrays`` (the weights the momentum step starts from) and
  ``momentum_vector``;
* ``FedAdam`` / ``FedYogi`` / ``FedAdagrad`` (``FedOpt``): ``current_arrays``, ``m_t``, ``v_t``;
* ``QFedAvg``: ``current_arrays``;
* ``FedAvg``, ``FedProx``, ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum``,
  ``Bulyan``: stateless (everything they hold is a constructor setting).

The rule is explicit: a strategy is looked up by its exact class, so a subclass (which may add
state) is not taken for its parent, and a strategy that neither defines ``state_dict`` nor is
listed here is refused with :class:`UndeclaredStateError`, never checkpointed without its state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
)

_FEDOPT = ("current_arrays", "m_t", "v_t")

# Exact class -> the attributes that hold its state (empty: declared stateless).
FLOWER_STATE: dict[type, tuple[str, ...]] = {
    FedAvg: (),
    FedProx: (),
    FedMedian: (),
    FedTrimmedAvg: (),
    Krum: (),
    MultiKrum: (),
    Bulyan: (),
    FedAvgM: ("current_arrays", "momentum_vector"),
    FedAdam: _FEDOPT,
    FedYogi: _FEDOPT,
    FedAdagrad: _FEDOPT,
    QFedAvg: ("current_arrays",),
}


class UndeclaredStateError(TypeError):
    """A strategy whose state nobody declared: resuming it could silently lose that state."""


def declared_fields(strategy: object) -> tuple[str, ...]:
    """The state attributes :data:`FLOWER_STATE` declares for ``strategy``'s exact class."""
    cls = type(strategy)
    if cls not in FLOWER_STATE:
        raise UndeclaredStateError(
            f"{cls.__module__}.{cls.__qualname__} declares no resume state: give it "
            "state_dict()/load_state_dict(), or list its stateful attributes (or () when it "
            "has none) in feddistill.strategies.state.FLOWER_STATE"
        )
    return FLOWER_STATE[cls]


def strategy_state_dict(strategy: object) -> dict[str, Any]:
    """``strategy``'s state, copied: its own ``state_dict()``, else its declared attributes."""
    own = getattr(strategy, "state_dict", None)
    if callable(own):
        return dict(own())
    return {name: _copy(getattr(strategy, name)) for name in declared_fields(strategy)}


def load_strategy_state_dict(strategy: object, state: Mapping[str, Any]) -> None:
    """Put what :func:`strategy_state_dict` returned back into a freshly built ``strategy``.

    Raises:
        ValueError: ``state`` is not that of this kind of strategy (``server.strategy`` changed).
    """
    own = getattr(strategy, "load_state_dict", None)
    if callable(own):
        own(state)
        return
    fields = declared_fields(strategy)
    if set(state) != set(fields):
        raise ValueError(
            f"saved strategy state has fields {sorted(state)}, {type(strategy).__name__} "
            f"keeps {sorted(fields)}; was server.strategy changed?"
        )
    for name in fields:
        setattr(strategy, name, _copy(state[name]))


def _copy(value: Any) -> Any:
    """A deep copy of the value kinds Flower strategies keep (None, arrays, records of them)."""
    if value is None:
        return None
    if isinstance(value, ArrayRecord):
        return ArrayRecord({k: Array(np.array(a.numpy(), copy=True)) for k, a in value.items()})
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, bool | int | float | str | bytes):
        return value
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")
