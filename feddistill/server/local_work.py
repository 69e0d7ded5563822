"""How much local training each round asks for: more while the federation still learns.

Local work per round was the largest lever on the speed of learning in rounds: on CLINC150
(150 intents, about 300 rows a client) 4 local epochs instead of 2 gained 9 points for the same
bytes. On the embedded corpus the same 4 epochs learned faster and then, once the federation
had learned what it could, over-fitted each client's share and drifted down. So the clients
train ``train.rising-epochs`` epochs a round until the federated validation accuracy stops
rising, then ``train.local-epochs`` for the rest of the run: a reduce-on-plateau step, applied
to the local work instead of the learning rate (docs/aggregation.md, "Local work per round";
the measured runs, the cost on the embedded corpus included, in docs/benchmarks.md).

The decision reads only the federated validation accuracy the server already receives (the
clients' own validation splits), never the server's test set, and it is a function of the run
record, so a resumed run decides every round as the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence

from feddistill.server.output_model import trend

# Evaluated rounds whose least-squares slope decides "stopped rising". Fewer points read the
# round-to-round noise of a few clients' small validation splits as a plateau: on CLINC150,
# still gaining 2 points a round, windows of 4 or 5 rounds showed a slope <= 0 by round 14-16.
PLATEAU_WINDOW = 6


def plateau_round(curve: Sequence[tuple[int, float]], window: int = PLATEAU_WINDOW) -> int | None:
    """The first round that ends ``window`` evaluated rounds whose slope is not above zero.

    ``curve``: ``(round, federated validation accuracy)`` in round order, rounds without a
    finite value left out. None while no such window exists (the federation still rises, or
    fewer than ``window`` rounds were evaluated).
    """
    for end in range(window, len(curve) + 1):
        fit = trend(curve[end - window : end])
        if fit is not None and fit[0] <= 0:
            return curve[end - 1][0]
    return None


def epochs_for_round(
    curve: Sequence[tuple[int, float]], local_epochs: int, rising_epochs: int
) -> tuple[int, int | None]:
    """Local epochs for the next round from the curve of the rounds before it, and the round
    the curve stopped rising (None: not yet). ``rising_epochs`` 0 turns the rule off; it never
    trains less than ``local_epochs`` (a user who asks for 10 epochs a round gets 10)."""
    if not rising_epochs:
        return local_epochs, None
    settled = plateau_round(curve)
    return (max(rising_epochs, local_epochs) if settled is None else local_epochs), settled
