"""Error feedback (the caller's side of `spec.error_feedback`) and residual persistence.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, arXiv:1901.09847) keeps
what compression dropped and adds it to the next update, so every coordinate is eventually
sent and biased compressors (top-k, sign) still converge::

    corrected = with_residual(update, residual)      # update + residual
    enc = encode(corrected, spec)
    residual = residual_after(corrected, enc.decoded)  # corrected - decoded

The residual lives on the client between rounds (a Flower client is rebuilt every round), so
`save_arrays` / `load_arrays` keep it in a `.npz` file, written atomically so a crash mid-write
never leaves a half-written residual behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def with_residual(
    update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """update + residual as float32, per name; names missing from `residual` pass unchanged.

    Raises:
        ValueError: if a residual has a different shape from its update tensor (a stale file
            from another model).
    """
    out: dict[str, np.ndarray] = {}
    for name, value in update.items():
        value = np.asarray(value, dtype=np.float32)
        extra = None if residual is None else residual.get(name)
        if extra is None:
            out[name] = value.copy()
            continue
        extra = np.asarray(extra)
        if extra.shape != value.shape:
            raise ValueError(
                f"residual[{name!r}] has shape {extra.shape}, update has {value.shape}; "
                "delete the stale residual file"
            )
        out[name] = value + extra.astype(np.float32, copy=False)
    return out


def residual_after(
    corrected: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """corrected - decoded per name: what the receiver did not get this round.

    Raises:
        ValueError: if the names or shapes of the two do not match.
    """
    if set(corrected) != set(decoded):
        raise ValueError(
            f"corrected and decoded name different tensors: {sorted(set(corrected) ^ set(decoded))}"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in corrected.items():
        value = np.asarray(value, dtype=np.float32)
        sent = np.asarray(decoded[name], dtype=np.float32)
        if sent.shape != value.shape:
            raise ValueError(f"decoded[{name!r}] has shape {sent.shape}, expected {value.shape}")
        out[name] = value - sent
    return out


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` to an .npz at `path` atomically (temp file in the same folder + replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **{name: np.asarray(a) for name, a in arrays.items()})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray] | None:
    """Arrays saved by `save_arrays`, in saved order, or None if `path` does not exist."""
    target = Path(path)
    if not target.exists():
        return None
    with np.load(target, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
