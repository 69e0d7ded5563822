"""Train to a plateau: a holdout split and the rule that says when the curve has flattened.

A fixed epoch count cannot suit every dataset: one epoch left a 150-class teacher at 43% where
five reach far more, while on an easy 4-class set extra epochs only cost time. So the teacher
trains until its accuracy on a holdout of its own training rows has not improved for
``patience`` epochs (with a cap on epochs and on time), and keeps the best epoch's weights.
Pure Python and numpy, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Below this many holdout rows one row flips the accuracy by more than 5 points: too noisy to
# stop on, so such a node trains the capped epochs on all its rows.
MIN_HOLDOUT_ROWS = 20


def holdout_split(rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (training, holdout): ``round(fraction * rows)`` rows held out, drawn with
    ``seed``; no holdout (all rows train) when that is under :data:`MIN_HOLDOUT_ROWS`."""
    n_hold = round(fraction * rows)
    if n_hold < MIN_HOLDOUT_ROWS or n_hold >= rows:
        return np.arange(rows), np.arange(0)
    order = np.random.default_rng([seed, 0x7EAC]).permutation(rows)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


@dataclass
class Plateau:
    """Best-so-far tracking: an epoch is better if its accuracy is higher, or equal with a
    lower loss; :meth:`update` says stop once ``patience`` epochs in a row were not better."""

    patience: int
    best_epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    history: list[tuple[float, float]] = field(default_factory=list)  # (accuracy, loss)

    def update(self, epoch: int, accuracy: float, loss: float) -> tuple[bool, bool]:
        """(is this epoch the best so far, stop now)."""
        self.history.append((accuracy, loss))
        better = accuracy > self.best_accuracy or (
            accuracy == self.best_accuracy and loss < self.best_loss
        )
        if better:
            self.best_epoch, self.best_accuracy, self.best_loss = epoch, accuracy, loss
        return better, epoch - self.best_epoch >= self.patience
