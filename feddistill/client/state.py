"""A client's persistent state, kept on the node's disk rather than in any process's memory.

Layout under the node cache folder (``cache-dir`` in node config, else the run's cache)::

    clients/<client-key>/
        teacher-<hash>/model.safetensors   fine-tuned teacher, keyed by teacher+data+hyper-params
        teacher-<hash>/logits.pt           its logits on the client's training split
        residual.npz                       error-feedback residual of the uplink codec

In simulation many virtual clients share one host, so the folder is created only when a client is
first sampled and nothing about it stays in RAM between rounds: memory depends on the clients
active at once, not on the total number of clients.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from feddistill.codec import load_arrays, save_arrays

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


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
        if not weights.exists():
            return None
        logits_path = folder / "logits.pt"
        logits = torch.load(logits_path) if logits_path.exists() else None
        return load_file(str(weights)), logits

    def save_teacher(
        self, key: str, state: dict[str, torch.Tensor], logits: torch.Tensor | None
    ) -> None:
        """Write to a temp folder then rename, so a killed client never leaves half a teacher."""
        for stale in self.root.glob("teacher-*"):
            if stale.name != f"teacher-{key}":
                shutil.rmtree(stale, ignore_errors=True)  # data or hyper-params changed
        tmp = self.root / f".tmp-teacher-{key}-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if logits is not None:
            torch.save(logits, tmp / "logits.pt")
        _atomic_replace(tmp, self.teacher_dir(key))

    def evict_teachers(self) -> int:
        """Drop cached teachers (recomputed on demand); returns bytes freed."""
        freed = 0
        for folder in self.root.glob("teacher-*"):
            freed += folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
        return freed

    # -- error-feedback residual --------------------------------------------------------------
    @property
    def residual_path(self) -> Path:
        return self.root / "residual.npz"

    def load_residual(self, schema: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
        """The stored residual, or {} if absent or from a model with another schema."""
        arrays = load_arrays(self.residual_path)
        if not arrays:
            return {}
        if {n: tuple(a.shape) for n, a in arrays.items()} != dict(schema):
            return {}
        return arrays

    def save_residual(self, residual: dict[str, np.ndarray]) -> None:
        save_arrays(self.residual_path, residual)

    def disk_bytes(self) -> int:
        return folder_bytes(self.root)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
