"""A client's persistent state, kept on the node's disk rather than in any process's memory.

Layout under the node cache folder (``cache-dir`` in node config, else the run's cache)::

    clients/<client-key>/
        teacher-<hash>/model.safetensors   fine-tuned teacher, keyed by teacher+data+hyper-params
        teacher-<hash>/logits.pt           its logits on the client's training split
        teacher-<hash>/                    with distill.mutual: the teacher as this run's
                                           mutual distillation left it (its own key, never
                                           the fine-tuned teacher's)
        residual-<run>-<round>.npz         error-feedback residual of the uplink codec after
                                           that server round of run <run> (the run id the
                                           server sends); the last two of the current run are
                                           kept, other runs' are deleted

In simulation many virtual clients share one host, so the folder is created only when a client is
first sampled and nothing about it stays in RAM between rounds: memory depends on the clients
active at once, not on the total number of clients. Disk is bounded by ``cache.max-mb``: after a
client saves its teacher, :meth:`ClientState.enforce_teacher_budget` evicts other clients' least
recently used teachers (a teacher's folder mtime is its last use); residuals are never evicted.
See docs/state.md for what outlives a round and how it is scoped to its run.
Several workers may share one cache folder, so every scan tolerates files vanishing under it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from feddistill.codec import load_arrays, save_arrays

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_RUN = re.compile(r"[0-9a-f]{1,64}")


def _atomic_replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@dataclass(frozen=True)
class ClientState:
    root: Path

    @classmethod
    def open(cls, cache_root: Path, client_key: str) -> ClientState:
        root = Path(cache_root) / "clients" / _SAFE.sub("_", client_key)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    # -- fine-tuned teacher -------------------------------------------------------------------
    def teacher_dir(self, key: str) -> Path:
        return self.root / f"teacher-{key}"

    def load_teacher(self, key: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None] | None:
        folder = self.teacher_dir(key)
        weights = folder / "model.safetensors"
        try:
            state = load_file(str(weights))
            logits_path = folder / "logits.pt"
            logits = torch.load(logits_path) if logits_path.exists() else None
        except FileNotFoundError:
            return None  # never cached, or evicted (perhaps just now, by another worker)
        with contextlib.suppress(FileNotFoundError):
            os.utime(folder)  # mark as recently used for the LRU budget
        return state, logits

    def load_logits(self, key: str) -> torch.Tensor | None:
        """Only the cached teacher logits: a frozen teacher's weights are not needed to teach."""
        path = self.teacher_dir(key) / "logits.pt"
        try:
            logits = torch.load(path)
        except FileNotFoundError:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.teacher_dir(key))  # mark as recently used for the LRU budget
        return logits

    def save_teacher(
        self,
        key: str,
        state: dict[str, torch.Tensor],
        logits: torch.Tensor | None,
        *,
        keep: tuple[str, ...] = (),
    ) -> None:
        """Write to a temp folder then rename, so a killed client never leaves half a teacher.

        This client's other teachers are removed, except those under the keys in ``keep`` (a
        mutually trained teacher keeps the fine-tuned teacher it started from).
        """
        wanted = {f"teacher-{k}" for k in (key, *keep)}
        for stale in self.root.glob("teacher-*"):
            if stale.name not in wanted:
                shutil.rmtree(stale, ignore_errors=True)  # data or hyper-params changed
        tmp = self.root / f".tmp-teacher-{key}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if logits is not None:
            torch.save(logits, tmp / "logits.pt")
        _atomic_replace(tmp, self.teacher_dir(key))

    def enforce_teacher_budget(self, max_bytes: int) -> int:
        """Evict other clients' least recently used teachers until all fit in ``max_bytes``.

        Counts every ``clients/*/teacher-*`` folder under this node's cache; this client's own
        teacher is never evicted, so the cache can exceed the budget by at most that teacher.
        ``max_bytes <= 0`` means unbounded. Returns the bytes freed.
        """
        if max_bytes <= 0:
            return 0
        total, others = 0, []
        for folder in self.root.parent.glob("*/teacher-*"):
            try:
                used = folder.stat().st_mtime
            except FileNotFoundError:
                continue  # evicted or replaced by another worker since the glob
            size = folder_bytes(folder)
            total += size
            if folder.parent != self.root:
                others.append((used, str(folder), size))
        freed = 0
        for _, folder, size in sorted(others):
            if total <= max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            freed += size
        return freed

    def residual_path(self, server_round: int, *, run: str) -> Path:
        return self.root / f"residual-{_run_name(run)}-{server_round:06d}.npz"

    def _residuals(self) -> list[tuple[str, int, Path]]:
        """(run, round, path) of every residual file; run "" for files of the unscoped layout
        (``residual-<round>.npz``) that older versions wrote."""
        found = []
        for path in self.root.glob("residual-*.npz"):
            parts = path.stem.removeprefix("residual-").rsplit("-", 1)
            if len(parts) == 1 and parts[0].isdigit():
                found.append(("", int(parts[0]), path))
            elif len(parts) == 2 and parts[1].isdigit():
                found.append((parts[0], int(parts[1]), path))
        return sorted(found)

    def load_residual(
        self, schema: list[tuple[str, tuple[int, ...]]], before_round: int, *, run: str
    ) -> dict[str, np.ndarray]:
        """The residual run ``run`` saved in its latest round < ``before_round``, or {} if there
        is none or it is from a model with another schema. Other runs' files are never read."""
        name = _run_name(run)
        earlier = [r for rr, r, _ in self._residuals() if rr == name and r < before_round]
        if not earlier:
            return {}
        try:
            arrays = load_arrays(self.residual_path(earlier[-1], run=run))
        except FileNotFoundError:
            return {}
        if not arrays or {n: tuple(a.shape) for n, a in arrays.items()} != dict(schema):
            return {}
        return arrays

    def save_residual(
        self, residual: dict[str, np.ndarray], server_round: int, *, run: str
    ) -> None:
        """Save the residual left after ``server_round``; keep only it and the one before it.

        Files of later rounds are from a redone round and are dropped; so is every file of
        another run: a client holds at most two residuals, whatever the number of runs.
        """
        name = _run_name(run)
        save_arrays(self.residual_path(server_round, run=run), residual)
        mine = [r for rr, r, _ in self._residuals() if rr == name and r < server_round]
        keep = {server_round, *mine[-1:]}
        for rr, r, path in self._residuals():
            if rr != name or r not in keep:
                path.unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        return folder_bytes(self.root)


def _run_name(run: str) -> str:
    """A run id as it appears in file names; refuses what could escape the folder."""
    if not _RUN.fullmatch(run):
        raise ValueError(f"run id must be 1-64 lowercase hex digits, got {run!r}")
    return run


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 if absent); files removed meanwhile count 0."""
    total = 0
    for parent, _, files in os.walk(folder):  # os.walk skips folders that vanish
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


@dataclass(frozen=True)
class DownlinkCache:
    """The chained downlink's models held by this node: ``downlink/<chain>-v<version>.npz``.

    One folder per node, not per client: in simulation every virtual client on a host can
    start from the newest version any of them reached, so a host keeps a few models in total,
    not one per client. Files are written atomically and only the newest ``keep`` versions of a
    chain stay; other chains (earlier runs) are removed after a day.
    """

    root: Path
    keep: int = 4

    @classmethod
    def open(cls, cache_root: Path) -> DownlinkCache:
        root = Path(cache_root) / "downlink"
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def _path(self, chain: str, version: int) -> Path:
        return self.root / f"{chain}-v{version:08d}.npz"

    def _versions(self, chain: str) -> list[int]:
        found = []
        for path in self.root.glob(f"{chain}-v*.npz"):
            suffix = path.stem.rsplit("-v", 1)[-1]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def newest(self, chain: str, lo: int, hi: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest cached version in ``[lo, hi]`` and its arrays, or None."""
        for version in reversed(self._versions(chain)):
            if not lo <= version <= hi:
                continue
            try:
                arrays = load_arrays(self._path(chain, version))
            except FileNotFoundError:
                continue  # pruned by another worker just now: try an older one
            if arrays:
                return version, arrays
        return None

    def drop(self, chain: str) -> None:
        """Forget every version of ``chain`` held here (one of them is not what the server
        sent, see :func:`feddistill.codec.chain.apply_chain`): the node restarts from version 0."""
        for version in self._versions(chain):
            self._path(chain, version).unlink(missing_ok=True)

    def save(self, chain: str, version: int, arrays: dict[str, np.ndarray]) -> None:
        save_arrays(self._path(chain, version), arrays)
        for old in self._versions(chain)[: -self.keep]:
            self._path(chain, old).unlink(missing_ok=True)
        cutoff = time.time() - 86400
        for path in self.root.glob("*.npz"):
            if not path.name.startswith(chain):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
