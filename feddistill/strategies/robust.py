"""A robust Flower strategy that fails a round with too few replies instead of degrading.

FedMedian over 2 replies is a mean, FedTrimmedAvg below ``1 / beta`` replies trims nothing, and
Flower's Krum and MultiKrum pick from whatever arrives (only Bulyan checks, and it skips the
round without a trace in our results). A round that lost replies to dropouts or rejected
payloads would then be aggregated by a rule that no longer tolerates the attackers it was
chosen for. :class:`ReplyFloor` wraps the Flower strategy (as Flower's DP wrappers do) and,
when the replies handed to it are fewer than :func:`feddistill.aggregation.requirement` says,
returns no arrays (``Strategy.start`` then keeps the global model), logs the reason and passes
it to ``on_shortfall`` so the round's record carries it. Otherwise it delegates unchanged, so
results equal Flower's own strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from feddistill import keys
from feddistill.aggregation import Requirement
from feddistill.strategies.state import load_strategy_state_dict, strategy_state_dict

log = logging.getLogger("feddistill.server")


class ReplyFloor(Strategy):
    """Delegate to ``inner`` unless a round's replies are below ``requirement.needed``."""

    def __init__(
        self,
        inner: Strategy,
        requirement: Requirement,
        on_shortfall: Callable[[int, str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.requirement = requirement
        self.on_shortfall = on_shortfall
        # The wrapper above reads where replies keep their arrays.
        self.arrayrecord_key: str = getattr(inner, "arrayrecord_key", keys.ARRAYS)

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's resume state: the floor itself keeps none."""
        return {"inner": strategy_state_dict(self.inner)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_strategy_state_dict(self.inner, state["inner"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        count = sum(not m.has_error() for m in replies)
        reason = self.requirement.shortfall(count)
        if reason is not None:
            reason = f"robust aggregation skipped: {reason}; global unchanged"
            log.warning("round %d: %s", server_round, reason)
            if self.on_shortfall is not None:
                self.on_shortfall(server_round, reason)
            return None, None
        if self.requirement.select_all_but is not None:  # MultiKrum's m = n - f of this round
            self.inner.num_nodes_to_select = count - self.requirement.select_all_but  # type: ignore[attr-defined]
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
        log.info(
            "\t├── Fewest replies per round: %d (%s)",
            self.requirement.needed,
            self.requirement.rule,
        )
