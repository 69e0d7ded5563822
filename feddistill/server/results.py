"""The run record: ``results.json``, per-round checkpoints and the round lines users read.

Schema (``schema_version`` 1) is documented in docs/output.md; keys are only ever added.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddistill import keys
from feddistill.strategies import RoundTraffic

SCHEMA_VERSION = 1
log = logging.getLogger("feddistill")


def write_json_atomic(path: Path, data: Any) -> None:
    """Temp file + rename: a crash mid-write never leaves a truncated results.json."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=json_default))
    os.replace(tmp, path)


def json_default(obj: Any) -> Any:
    """numpy scalars as Python numbers in JSON (results.json, the checkpoint manifest)."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class RunRecord:
    """Accumulates what happened; ``save()`` rewrites results.json after every round."""

    out_dir: Path
    config: dict[str, Any]
    header: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return self.out_dir / "results.json"

    def add_round(
        self,
        server_round: int,
        num_rounds: int,
        accuracy: float,
        loss: float,
        traffic: RoundTraffic,
        seconds: float,
        dense_bytes_per_client: int,
        client_state: dict[str, Any] | None = None,
        privacy: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record one round; ``privacy``: :meth:`CentralPrivacy.figures` when DP is on."""
        up = sum(traffic.bytes_up.values())
        down = sum(traffic.bytes_down.values())
        n_up = max(len(traffic.bytes_up), 1)
        n_down = max(len(traffic.bytes_down), 1)
        entry = {
            "round": server_round,
            "accuracy": _clean(accuracy),
            "loss": _clean(loss),
            "bytes_up": up,
            "bytes_down": down,
            "eval_bytes_down": sum(traffic.eval_bytes_down.values()),
            "eval_bytes_up": sum(traffic.eval_bytes_up.values()),
            "bytes_up_per_client": {str(k): v for k, v in traffic.bytes_up.items()},
            "bytes_down_per_client": {str(k): v for k, v in traffic.bytes_down.items()},
            "mean_bytes_up_per_client": up / n_up,
            "mean_bytes_down_per_client": down / n_down,
            "dense_float32_bytes_per_client": dense_bytes_per_client,
            "compression_ratio_up": dense_bytes_per_client / (up / n_up) if up else None,
            "compression_ratio_down": dense_bytes_per_client / (down / n_down) if down else None,
            "replies": traffic.replies,
            "failures": len(traffic.failures),
            "failure_reasons": [f"node {n}: {r}" for n, r in traffic.failures],
            "round_failure": traffic.round_failure or None,
            # Admission control (docs/robustness.md)
            "eval_failures": len(traffic.eval_failures),
            "eval_failure_reasons": [f"node {n}: {r}" for n, r in traffic.eval_failures],
            "update_norms": {str(k): v for k, v in traffic.update_norms.items()},
            "update_cosines": {str(k): v for k, v in traffic.update_cosines.items()},
            "clipped": [
                {"node": n, "norm": norm, "bound": bound} for n, norm, bound in traffic.clipped
            ],
            "capped_examples": [
                {"node": n, "claimed": claim, "cap": cap}
                for n, claim, cap in traffic.capped_examples
            ],
            "eval_capped_examples": [
                {"node": n, "claimed": claim, "cap": cap}
                for n, claim, cap in traffic.eval_capped_examples
            ],
            "aggregation_errors": list(traffic.aggregation_errors),
            # Secure aggregation: every protocol message by step, both directions, all clients
            **(
                {
                    "secure_bytes": dict(traffic.secure_bytes),
                    "secure_survivors": traffic.replies,
                    "secure_dropouts": traffic.secure_dropouts,
                    "secure_bits_per_weight": traffic.secure_bits_per_weight,
                }
                if traffic.secure_bytes
                else {}
            ),
            "train": traffic.train_metrics,
            "local_epochs": traffic.local_epochs,  # None: the clients' train.local-epochs
            "federated_evaluation": traffic.eval_metrics,
            # the previous round's global on this round's training clients, before they trained
            "arrival_evaluation": traffic.arrival_metrics,
            "seconds": seconds,
            "elapsed": time.time() - self.started,
            **(client_state or {}),  # state_bytes_mean / state_bytes_max of sampled clients
        }
        if privacy is not None:
            entry["privacy"] = privacy
        self.rounds.append(entry)
        acc = "n/a" if entry["accuracy"] is None else f"{accuracy:.4f}"
        fed = traffic.eval_metrics.get(keys.EVAL_ACCURACY)
        fed_txt = "" if fed is None else f"  fed-acc {fed:.4f}"
        arrived = traffic.arrival_metrics.get(keys.EVAL_ACCURACY)
        if fed is None and arrived is not None:
            fed_txt = f"  val-acc of round {server_round - 1} {arrived:.4f}"
        if privacy is not None:
            eps = privacy.get("epsilon")
            fed_txt += "  eps inf" if eps is None else f"  eps {eps:.3g}"
        log.info(
            "round %d/%d  acc %s  loss %.4f%s  up %s  down %s  %.1f s  failures %d",
            server_round,
            num_rounds,
            acc,
            loss,
            fed_txt,
            human_bytes(up),
            human_bytes(down),
            seconds,
            len(traffic.failures),
        )
        return entry

    def finish(self, **final: Any) -> None:
        accs = [r["accuracy"] for r in self.rounds if r["accuracy"] is not None]
        self.final = {
            "accuracy": self.rounds[-1]["accuracy"] if self.rounds else None,
            "loss": self.rounds[-1]["loss"] if self.rounds else None,
            "best_accuracy": max(accs) if accs else None,
            "best_round": (self.rounds[accs.index(max(accs))]["round"] if accs else None),
            "rounds_completed": len(self.rounds),
            "bytes_up_total": sum(r["bytes_up"] for r in self.rounds),
            "bytes_down_total": sum(r["bytes_down"] for r in self.rounds),
            "eval_bytes_down_total": sum(r["eval_bytes_down"] for r in self.rounds),
            "eval_bytes_up_total": sum(r.get("eval_bytes_up", 0) for r in self.rounds),
            "failures_total": sum(r["failures"] for r in self.rounds),
            "clipped_total": sum(len(r.get("clipped", ())) for r in self.rounds),
            "seconds_total": time.time() - self.started,
            **final,
        }
        self.save()

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            **self.header,
            "config": self.config,
            "initial": self.initial,
            "rounds": self.rounds,
            "final": self.final,
            "events": self.events,
        }

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.to_dict())

    # -- resume: the rounds so far; the header and config are rebuilt from the run's settings
    def state_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "initial": self.initial,
            "events": self.events,
            "started": self.started,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds = list(state["rounds"])
        self.initial = dict(state["initial"])
        self.events = list(state["events"])
        self.started = float(state["started"])


def per_class_result(
    class_correct: list[int], class_rows: list[int], names: list[str]
) -> dict[str, dict[str, Any]]:
    """``final.per_class_accuracy`` ({label name: accuracy}, ``None`` for a class with no test
    rows) and ``final.per_class_count`` ({label name: test rows}) from one evaluation's counts."""
    if not class_rows:
        return {"per_class_accuracy": None, "per_class_count": None}
    if len(class_rows) != len(names):
        raise ValueError(f"{len(class_rows)} per-class counts for {len(names)} labels {names}")
    return {
        "per_class_accuracy": {
            n: (c / t if t else None)
            for n, c, t in zip(names, class_correct, class_rows, strict=True)
        },
        "per_class_count": dict(zip(names, class_rows, strict=True)),
    }


def summarize_local_only(accuracies: list[float]) -> dict[str, float | None]:
    if not accuracies:
        return {"local_only_accuracy": None, "local_only_std": None}
    return {
        "local_only_accuracy": statistics.fmean(accuracies),
        "local_only_std": statistics.pstdev(accuracies),
        "local_only_min": min(accuracies),
        "local_only_max": max(accuracies),
    }
