"""A Grid that forwards everything to another Grid: the base of our Grid views.

Flower's ``Strategy.start`` talks to one Grid; wrapping it is how the server adds behaviour to the
round loop (reproducible sampling, progress) without copying the loop. Subclasses override only
what they change.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from feddistill import flower_compat
from feddistill.flower_compat import NodeInfo, Run

# Node id -> partition id of the virtual nodes of a simulation running in this process (filled by
# ``feddistill.simulation.engine``): simulated node ids are random per process, partition ids are
# not, so ordering nodes by partition makes client sampling repeat across runs.
SIMULATED_PARTITIONS: dict[int, int] = {}


# Flower's strategies sample clients with ``random.sample`` of the global ``random`` module, which
# other threads of a simulation (Ray, Flower) draw from too, at times that depend on timing. While
# the server runs (:func:`private_sampling`), Flower's sampler uses this generator instead; the
# server seeds it with the run's seed and checkpoints its state.
SAMPLER = random.Random()


@contextlib.contextmanager
def private_sampling() -> Iterator[random.Random]:
    """Point Flower's client sampling (``strategy_utils.random``) at :data:`SAMPLER`."""
    with flower_compat.sampling_with(SAMPLER):
        yield SAMPLER


def node_order(node_ids: Iterable[int]) -> list[int]:
    """Simulated nodes by partition id, then any other node by id (deployment: by id)."""
    ids = list(node_ids)
    return sorted(ids, key=lambda n: (SIMULATED_PARTITIONS.get(n, len(ids)), n))


class DelegatingGrid(Grid):
    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
