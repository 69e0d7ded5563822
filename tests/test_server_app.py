"""ServerApp edge logic that needs no Flower runtime."""

from __future__ import annotations

from feddistill.config import parse_config
from feddistill.server.app import match_federation_size


class _FakeGrid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(100, 100 + nodes))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_flwr_run_with_fewer_nodes_follows_the_federation() -> None:
    cfg = parse_config(
        {"data.num-clients": 10, "server.clients-per-round": 5, "server.evaluate-clients": 5}
    )
    got = match_federation_size(cfg, _FakeGrid(2), settle_s=0.0)  # type: ignore[arg-type]
    assert got.data.num_clients == 2
    assert got.server.clients_per_round == 2 and got.server.evaluate_clients == 2
    unevaluated = parse_config({"data.num-clients": 10, "server.clients-per-round": 5})
    got = match_federation_size(unevaluated, _FakeGrid(2), settle_s=0.0)  # type: ignore[arg-type]
    assert got.server.evaluate_clients == 0  # off stays off


def test_matching_federation_keeps_config() -> None:
    cfg = parse_config({"data.num-clients": 3, "server.clients-per-round": 0.5})
    assert match_federation_size(cfg, _FakeGrid(3), settle_s=0.0) == cfg  # type: ignore[arg-type]
