"""Split a labelled dataset among federated clients, using flwr-datasets partitioners.

The functions here take and return plain index arrays, so the same partitioning serves the
simulation (every client slices one shared dataset) and tests, and nothing here depends on how
the data is later tokenised or batched.

Schemes (``data.partitioning``):

* ``"iid"`` — :class:`flwr_datasets.partitioner.IidPartitioner`: near-equal random shares
  (sizes differ by at most one).
* ``"dirichlet"`` — :class:`~flwr_datasets.partitioner.DirichletPartitioner` (Yurochkin et al.
  2019, https://arxiv.org/abs/1905.12022) on the label with concentration ``alpha`` and
  ``self_balancing=True``: small ``alpha`` gives clients few dominant classes, large ``alpha``
  approaches iid. Each client gets at least ``min_partition_size`` examples; flwr-datasets
  redraws up to 10 times to get there, then gives up, which is reported as a ``DataError``.
* ``"shards"`` — :class:`~flwr_datasets.partitioner.PathologicalPartitioner` with
  ``num_classes_per_partition=shards_per_client`` and ``class_assignment_mode=
  "first-deterministic"`` (Li et al. 2021, https://arxiv.org/abs/2102.02079). It is chosen over
  ``ShardPartitioner`` because it really means "exactly k classes per client": each client is
  assigned k distinct classes and gets a slice of every one of them, whereas
  ``ShardPartitioner`` hands out contiguous blocks of label-sorted rows that can straddle class
  boundaries. "first-deterministic" gives client ``i`` class ``i mod C`` first, so every class
  is used once there are at least as many clients as classes.

As ``flwr_datasets.FederatedDataset`` does, rows are shuffled with ``seed`` before partitioning
(``IidPartitioner`` shards *contiguously*, so without this an ordered file would give
label-sorted "iid" clients). Results depend only on ``labels`` and the arguments.

Scale (measured figures: docs/data.md, "Partitioning at scale"): each Dirichlet draw is a Python
loop over classes x clients, so the time of a setting that cannot be met grows linearly with
the number of clients until flwr-datasets' 11-draw cap (not configurable in 0.6) ends it with
a ``DataError``. The partitioners' own ``load_partition`` builds one ``datasets.Dataset`` per
client, which dominates at thousands of clients, so the assignment is read directly
(``np.array_split`` for iid, the computed mapping for the others) and checked against
``load_partition`` on the first and last client; if a future flwr-datasets changes its
behaviour the check fails and every client is read through ``load_partition`` instead (slower,
same result).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

from feddistill.data.errors import DataError

__all__ = ["PARTITION_SCHEMES", "label_histogram", "partition_indices", "train_val_split"]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")

_ROW = "row"  # column holding each row's position in the shuffled dataset


def partition_indices(
    labels: Sequence[int] | np.ndarray,
    *,
    num_partitions: int,
    scheme: str,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_partition_size: int = 2,
) -> list[np.ndarray]:
    """Assign the examples with the given ``labels`` to ``num_partitions`` clients.

    Args:
        labels: one integer class label per example.
        num_partitions: number of clients (``data.num-clients``).
        scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"`` (``data.partitioning``).
        alpha: Dirichlet concentration (``data.alpha``); used by ``"dirichlet"`` only.
        shards_per_client: classes per client (``data.shards-per-client``); ``"shards"`` only.
        seed: seeds the row shuffle and the partitioner; same seed, same partitions.
        min_partition_size: the fewest examples any client may get.

    Returns:
        One sorted ``int64`` array of example indices per client. For ``"iid"`` and
        ``"dirichlet"`` the arrays are disjoint and together cover every example; for
        ``"shards"`` they are disjoint, and classes that no client was assigned (possible with
        fewer clients than classes, which is warned about) are left out.

    Raises:
        DataError: a setting is invalid or cannot be met; checked before partitioning where
            possible, and the message names the option (``data.partitioning``, ``data.alpha``,
            ``data.num-clients``, ``data.shards-per-client``). A Dirichlet setting that cannot
            give every client ``min_partition_size`` examples fails after flwr-datasets' 11
            draws (about 7 s for 5,000 clients of 50,000 examples; see the module docstring).
    """
    y = _as_labels(labels)
    num_classes = int(np.unique(y).size)
    _validate(
        num_examples=int(y.size),
        num_classes=num_classes,
        num_partitions=num_partitions,
        scheme=scheme,
        alpha=alpha,
        shards_per_client=shards_per_client,
        seed=seed,
        min_partition_size=min_partition_size,
    )

    perm = np.random.default_rng(seed).permutation(y.size)
    shuffled = datasets.Dataset.from_dict(
        {"label": y[perm], _ROW: np.arange(y.size, dtype=np.int64)}
    )
    if scheme == "iid":
        rows = _iid_rows(shuffled, num_partitions)
    elif scheme == "dirichlet":
        rows = _dirichlet_rows(shuffled, num_partitions, alpha, seed, min_partition_size)
    else:
        rows = _shards_rows(shuffled, num_partitions, shards_per_client, seed)

    parts = [np.sort(perm[r]).astype(np.int64, copy=False) for r in rows]
    smallest = min(part.size for part in parts)
    if smallest < min_partition_size:
        # Only "shards" gets here: iid sizes are implied by the validation, and the Dirichlet
        # partitioner enforces min_partition_size itself.
        raise DataError(
            f"data.num-clients={num_partitions} with data.shards-per-client={shards_per_client} "
            f"leaves a client with {smallest} examples, fewer than min_partition_size="
            f"{min_partition_size}; use fewer clients or more classes per client."
        )
    if scheme == "shards":
        covered = np.unique(y[np.concatenate(parts)])
        unused = sorted(set(np.unique(y).tolist()) - set(covered.tolist()))
        if unused:
            warnings.warn(
                f"data.num-clients={num_partitions} with data.shards-per-client="
                f"{shards_per_client}: classes {unused} are on no client.",
                stacklevel=2,
            )
    return parts


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.size == 0:
        raise DataError("labels is empty; there is nothing to partition.")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"labels must be a 1-D sequence of integer class labels, got an array of shape "
            f"{y.shape} and dtype {y.dtype}."
        )
    return y.astype(np.int64, copy=False)


def _validate(
    *,
    num_examples: int,
    num_classes: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    shards_per_client: int,
    seed: int,
    min_partition_size: int,
) -> None:
    """Reject settings that cannot work before any partitioner runs (options used by the
    chosen scheme only: ``alpha`` means nothing to ``"iid"``)."""
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"data.partitioning={scheme!r} is not a partitioning scheme; "
            f"allowed: {list(PARTITION_SCHEMES)}."
        )
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}.")
    if min_partition_size < 0:
        raise DataError(f"min_partition_size must be >= 0, got {min_partition_size}.")
    if num_partitions < 1:
        raise DataError(f"data.num-clients must be at least 1, got {num_partitions}.")
    if num_partitions > num_examples:
        raise DataError(
            f"data.num-clients={num_partitions} is more than the {num_examples} examples; "
            f"every client needs at least one example."
        )
    if num_partitions * min_partition_size > num_examples:
        raise DataError(
            f"data.num-clients={num_partitions} clients of at least {min_partition_size} "
            f"examples each need {num_partitions * min_partition_size} examples, but there are "
            f"{num_examples}; allowed: at most {num_examples // max(min_partition_size, 1)} "
            f"clients."
        )
    if scheme == "dirichlet" and not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"data.alpha must be a finite number > 0, got {alpha}.")
    if scheme == "shards" and not 1 <= shards_per_client <= num_classes:
        raise DataError(
            f"data.shards-per-client={shards_per_client} must be between 1 and the number of "
            f"classes present ({num_classes})."
        )


def _iid_rows(shuffled: datasets.Dataset, num_partitions: int) -> list[np.ndarray]:
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = shuffled
    return _read_rows(partitioner, num_partitions, _fast_assignment(partitioner))


def _dirichlet_rows(
    shuffled: datasets.Dataset,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int,
) -> list[np.ndarray]:
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        self_balancing=True,
        shuffle=False,  # order within a client is irrelevant: indices are sorted
        seed=seed,
    )
    partitioner.dataset = shuffled
    # flwr-datasets warns on every redraw and raises ValueError after 10 redraws; that bound is
    # what keeps a hopeless setting from looping. Collect the warnings, report one error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            partitioner.load_partition(0)
        except ValueError as err:
            draws = sum("min_partition_size" in str(w.message) for w in caught)
            raise DataError(
                f"data.alpha={alpha} with data.num-clients={num_partitions} could not give "
                f"every client at least min_partition_size={min_partition_size} of the "
                f"{shuffled.num_rows} examples in {draws} Dirichlet draws; raise data.alpha "
                f"or use fewer clients ({err})"
            ) from err
    return _read_rows(partitioner, num_partitions, _fast_assignment(partitioner))


def _shards_rows(
    shuffled: datasets.Dataset, num_partitions: int, shards_per_client: int, seed: int
) -> list[np.ndarray]:
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=shards_per_client,
        class_assignment_mode="first-deterministic",
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = shuffled
    with warnings.catch_warnings():
        # Its "classes will NOT be used" warning names an option we do not expose;
        # partition_indices warns about unused classes itself.
        warnings.simplefilter("ignore", UserWarning)
        try:
            partitioner.load_partition(0)
        except ValueError as err:
            raise DataError(
                f"data.num-clients={num_partitions} with data.shards-per-client="
                f"{shards_per_client} asks for more slices of a class than it has examples; "
                f"use fewer clients or fewer classes per client ({err})"
            ) from err
    return _read_rows(partitioner, num_partitions, _fast_assignment(partitioner))


def _fast_assignment(partitioner: Partitioner) -> list[np.ndarray] | None:
    """Every partition's rows without building a ``Dataset`` per partition, or None.

    Only a candidate: :func:`_read_rows` checks it against ``load_partition``.
    """
    if isinstance(partitioner, IidPartitioner):
        # IidPartitioner is dataset.shard(contiguous=True): consecutive blocks whose sizes
        # differ by at most one, larger blocks first, which is exactly np.array_split.
        rows = np.arange(partitioner.dataset.num_rows, dtype=np.int64)
        return np.array_split(rows, partitioner.num_partitions)
    # Dirichlet and Pathological keep the assignment they computed in a private attribute.
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(mapping, dict):
        return None
    try:
        return [np.asarray(mapping[i], dtype=np.int64) for i in range(len(mapping))]
    except (KeyError, TypeError, ValueError):
        return None


def _read_rows(
    partitioner: Partitioner, num_partitions: int, fast: list[np.ndarray] | None
) -> list[np.ndarray]:
    """Rows of every partition: ``fast`` if it agrees with ``load_partition``, else the slow way.

    ``load_partition`` is the public API but builds a ``Dataset`` per call; reading 5,000 of
    them costs seconds, so it is used to check the fast assignment on two clients.
    """

    def public(partition_id: int) -> np.ndarray:
        rows = partitioner.load_partition(partition_id)[:][_ROW]
        return np.sort(np.asarray(rows, dtype=np.int64))

    if fast is not None and len(fast) == num_partitions:
        probes = {0, num_partitions - 1}
        if all(np.array_equal(np.sort(fast[i]), public(i)) for i in probes):
            return fast
    return [public(i) for i in range(num_partitions)]


def train_val_split(
    indices: np.ndarray | Sequence[int], *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's example indices into training and validation indices.

    ``floor(val_fraction * n)`` examples go to validation, but at least one always stays for
    training, so a tiny partition can get an *empty* validation set (callers then skip local
    validation). The input order does not matter (indices are sorted first) and the same
    ``seed`` gives the same split.

    Returns:
        ``(train, val)``: sorted, disjoint ``int64`` arrays whose union is ``indices``.
    """
    idx = np.sort(np.asarray(indices, dtype=np.int64))
    if idx.ndim != 1 or idx.size == 0:
        raise DataError(
            f"train_val_split needs a non-empty 1-D array of indices, got shape {idx.shape}."
        )
    if not (math.isfinite(val_fraction) and 0.0 <= val_fraction < 1.0):
        raise DataError(f"data.val-fraction must be in [0, 1), got {val_fraction}.")
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}.")
    # The epsilon keeps e.g. 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996
    # from rounding the wrong way.
    num_val = min(math.floor(val_fraction * idx.size + 1e-9), idx.size - 1)
    shuffled = np.random.default_rng(seed).permutation(idx)
    return np.sort(shuffled[num_val:]), np.sort(shuffled[:num_val])


def label_histogram(
    labels: Sequence[int] | np.ndarray, indices: np.ndarray | Sequence[int], num_classes: int
) -> list[int]:
    """Count of each class among ``labels[indices]`` (length ``num_classes``), for logs."""
    y = np.asarray(labels, dtype=np.int64)[np.asarray(indices, dtype=np.int64)]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), got values {np.unique(y)}.")
    return np.bincount(y, minlength=num_classes).tolist()
