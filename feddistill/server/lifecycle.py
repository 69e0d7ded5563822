"""One server run as parts with declared state, and the end-of-round step that composes them.

Flower's ``Strategy.start`` runs the rounds; its ``evaluate_fn`` is the only hook it calls after
each one. :meth:`ServerRun.end_of_round` is that hook, and the parts it calls in order are::

    Evaluator          the new global on the server's test set (stateless)
    RoundCheckpoints   round-NNNN.safetensors of the full student (stateless: files on disk)
    RunRecord          the round's entry in results.json                        state_dict()
    TailAverage        the running sum the output model averages                state_dict()
    CompressedStrategy downlink chain, privacy step, inner strategy             state_dict()
    RandomStates       client sampling and torch's generator                    state_dict()

After a round the parts with state are saved together (:func:`~feddistill.server.checkpoint.
snapshot`), and only then does results.json claim the round: a run killed in between resumes
from this round, not from the one before. :meth:`ServerRun.resume_or_start` loads them back.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from feddistill import keys
from feddistill.config import Config, ConfigError
from feddistill.distill.train import Stats, Tokenized, evaluate, torch_threads
from feddistill.models.build import set_arrays
from feddistill.records import RUN_ID_BYTES
from feddistill.server.checkpoint import (
    RandomStates,
    Stateful,
    load_state,
    restore,
    save_state,
    snapshot,
    state_path,
)
from feddistill.server.local_work import epochs_for_round
from feddistill.server.output_model import (
    TailAverage,
    still_improving,
    validation_curve,
    window_start,
)
from feddistill.server.progress import RoundWatch
from feddistill.server.results import RunRecord, per_class_result
from feddistill.server.tracking import Tracker
from feddistill.strategies import CompressedStrategy

log = logging.getLogger("feddistill")


class Evaluator:
    """A global model's accuracy and loss on the server's test set (none in deployment
    without ``data.test-path``); keeps the model, whose weights the checkpoints save too."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str],
        test: Tokenized | None,
        device: torch.device,
        threads: int,
    ) -> None:
        self.model, self.names, self.test = model, list(names), test
        self.device, self.threads = device, threads
        self.last: Stats | None = None  # the newest evaluation, for per-class accuracy

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        set_arrays(self.model, {n: arrays[n] for n in self.names})

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> Stats | None:
        """Load ``arrays`` into the model and evaluate it (None without a test set)."""
        self.load(arrays)
        if self.test is None:
            return None
        with torch_threads(self.threads):
            self.last = evaluate(self.model, self.test, device=self.device)
        return self.last


class RoundCheckpoints:
    """``checkpoints/round-NNNN.safetensors``: each round's full student, for users (with
    ``checkpoints = true``) and for re-summing a moved tail-average window on resume."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder, self.enabled = folder, enabled
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.safetensors"

    def write(self, server_round: int, model: torch.nn.Module) -> None:
        if not self.enabled:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(self.path(server_round)))

    def global_of(self, server_round: int, names: Sequence[str], cfg: Config) -> dict:
        """The exchanged arrays of ``server_round``'s global, for :meth:`TailAverage.realign`."""
        path = self.path(server_round)
        if not path.exists():
            raise ConfigError(
                f"invalid config rounds = {cfg.rounds}: server.average-last = "
                f"{cfg.server.average_last} now averages rounds "
                f"{window_start(cfg.rounds, cfg.server.average_last)}-{cfg.rounds}, but the "
                f"saved run did not sum round {server_round} and its checkpoint {path} is "
                "missing; resume with the rounds the run was started with"
            )
        arrays = load_numpy(str(path))
        return {n: arrays[n] for n in names}


class RunStopped(Exception):
    """Raised out of Flower's round loop when ``server.max-failed-rounds`` rounds in a row left
    the global unchanged; :func:`~feddistill.server.run.run_server` finishes the run with it."""

    def __init__(self, server_round: int, reason: str) -> None:
        super().__init__(reason)
        self.server_round, self.reason = server_round, reason


class ServerRun:
    """The parts of one run, the state they save, and the step that ends each round."""

    def __init__(
        self,
        cfg: Config,
        *,
        strategy: CompressedStrategy,
        record: RunRecord,
        evaluator: Evaluator,
        tracker: Tracker,
        watch: RoundWatch,
        dense_bytes: int,
    ) -> None:
        self.cfg, self.strategy, self.record = cfg, strategy, record
        self.evaluator, self.tracker, self.watch = evaluator, tracker, watch
        self.dense_bytes = dense_bytes
        out = Path(cfg.output_dir)
        self.state_file = state_path(out)
        self.checkpoints = RoundCheckpoints(out / "checkpoints", cfg.checkpoints)
        self.tail = (
            TailAverage(window_start(cfg.rounds, cfg.server.average_last))
            if cfg.server.average_last
            else None
        )
        self.parts: dict[str, Stateful] = {
            "strategy": strategy,
            "record": record,
            "random": RandomStates(),
        }
        if self.tail is not None:
            self.parts["tail"] = self.tail
        self.done = 0  # rounds completed before this process started (resume)
        self.run_id = ""
        self.last_global: dict[str, np.ndarray] | None = None  # the newest round's global
        self.settled: int | None = None  # the round the federated curve stopped rising
        self._clock = time.time()

    # -- start --------------------------------------------------------------------------------
    def resume_or_start(self, init: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global arrays to start from; sets :attr:`done` and :attr:`run_id`.

        ``resume = true`` restores every part from the saved state and records a ``resume``
        event; without a saved state it starts afresh. ``resume = false`` removes any saved
        state, so a later resume never picks up an older run. A fresh run draws a new run id:
        clients never continue another run's residuals or co-trained teacher.
        """
        self.run_id = secrets.token_bytes(RUN_ID_BYTES).hex()
        if not self.cfg.resume:
            self.state_file.unlink(missing_ok=True)
            return dict(init)
        saved = load_state(self.state_file)
        if saved is None:
            log.info("resume = true but %s does not exist: starting from round 1", self.state_file)
            return dict(init)
        restore(saved, self.cfg, self.parts)
        self.done, self.run_id = saved.round, saved.run_id
        self.strategy.round_offset = saved.round  # Strategy.start counts from 1 again
        if self.tail is not None:
            first = window_start(self.cfg.rounds, self.cfg.server.average_last)
            names = self.evaluator.names
            self.tail.realign(
                first, self.done, lambda r: self.checkpoints.global_of(r, names, self.cfg)
            )
        self.record.events.append(
            {"event": "resume", "from_round": saved.round, "time": time.time()}
        )
        self.record.save()
        log.info("resuming after round %d of %d (state %s)", saved.round, self.cfg.rounds,
                 self.state_file)  # fmt: skip
        return saved.global_arrays

    # -- Flower's evaluate_fn -----------------------------------------------------------------
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.done:  # resumed: the initial model was evaluated before
            self._clock = time.time()
            self._plan_local_work()
            return None
        server_round += self.done  # Strategy.start counts from 1 again after a resume
        global_now = self.strategy.dense(arrays)
        stats = self.evaluator(global_now)
        acc, loss = (stats.accuracy, stats.loss) if stats else (float("nan"), float("nan"))
        metrics = None if stats is None else MetricRecord({"accuracy": acc, "loss": loss})
        if server_round == 0:
            self.record.initial = {
                "accuracy": acc if stats else None,
                "loss": loss if stats else None,
            }
            self._clock = time.time()
            self._plan_local_work()
            return metrics
        self.checkpoints.write(server_round, self.evaluator.model)
        now = time.time()
        privacy = self.strategy.accountant
        entry = self.record.add_round(
            server_round,
            self.cfg.rounds,
            acc,
            loss,
            self.strategy.traffic[server_round],
            now - self._clock,
            self.dense_bytes,
            client_state=self.watch.state_bytes_summary(server_round),
            privacy=None if privacy is None else privacy.figures(server_round),
        )
        if self.tail is not None:
            self.tail.add(server_round, global_now)
        state = snapshot(server_round, global_now, self.parts, self.record.config, self.run_id)
        save_state(self.state_file, state)
        # Only now that the state holds this round may results.json claim it.
        self.record.save()
        self.tracker.log_round(entry)  # the very entry results.json holds
        self._clock = now
        self.last_global = global_now
        if server_round < self.cfg.rounds:
            self._stop_if_failing(server_round)
            self._plan_local_work()
        return metrics

    def _plan_local_work(self) -> None:
        """Set the next round's local epochs (``train.rising-epochs``) from the run record's
        federated validation accuracy, which a resumed run holds too."""
        train = self.cfg.train
        if not train.rising_epochs or not self.cfg.validation_curve:
            return  # the clients' own train.local-epochs
        curve = self._federated_curve()
        epochs, settled = epochs_for_round(curve, train.local_epochs, train.rising_epochs)
        if settled is not None and self.settled is None:
            log.info(
                "train.rising-epochs: the federated validation accuracy stopped rising at "
                "round %d; train.local-epochs = %d local epochs a round from now on",
                settled,
                epochs,
            )
        self.settled = settled
        self.strategy.train_overrides[keys.LOCAL_EPOCHS] = epochs

    def _stop_if_failing(self, server_round: int) -> None:
        """Raise :class:`RunStopped` after ``server.max-failed-rounds`` failed rounds in a row
        (counted over the saved rounds too, so a resumed run keeps its count)."""
        limit = self.cfg.server.max_failed_rounds
        if not limit:
            return
        failed = 0
        for entry in reversed(self.record.rounds):
            if not entry.get("round_failure"):
                break
            failed += 1
        if failed < limit:
            return
        last = self.record.rounds[-1]
        reasons = last.get("failure_reasons") or []
        shown = "; ".join(reasons[:3])
        if len(reasons) > 3:
            shown += f"; and {len(reasons) - 3} more"
        reason = (
            f"rounds {server_round - failed + 1}-{server_round} all left the global unchanged "
            f"(server.max-failed-rounds = {limit}); round {server_round}: "
            f"{last['round_failure']}" + (f"; {shown}" if shown else "")
        )
        raise RunStopped(server_round, reason)

    # -- end ----------------------------------------------------------------------------------
    def _still_improving(self, first: int, last_round: int) -> bool | None:
        """The trend of the window's federated validation accuracy (``server.average-when``);
        None when it is not judged (``always``, or too few evaluated rounds)."""
        if self.cfg.server.average_when == "always":
            return None
        return still_improving(self._federated_curve(first, last_round))

    def _federated_curve(
        self, first: int = 1, last_round: int | None = None
    ) -> list[tuple[int, float]]:
        """The validation accuracy of the globals of rounds ``first..last_round`` (None: all),
        from the run record (a resumed run's holds the rounds before the resume too)."""
        return validation_curve(self.record.rounds, self.cfg.validation_curve, first, last_round)

    def output_model(self, last: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Load the run's output model into the evaluator's model; its final-result fields.

        The average of the tail window's globals when the run averages (evaluated once more),
        else the last global, evaluated in its round already.
        """
        labels = self.record.header["labels"]
        if self.tail is None or not self.tail.count:
            self.evaluator.load(last)
            stats = self.evaluator.last
            correct, rows = (stats.class_correct, stats.class_rows) if stats else ([], [])
            return per_class_result(correct, rows, labels)
        first, last_round = self.tail.rounds
        rounds = self.record.rounds
        rising = self._still_improving(first, last_round)
        if rising:
            log.info(
                "server.average-when = 'flat': the federated validation accuracy still rises "
                "over rounds %d-%d, so the output model is the last global, not their average",
                first,
                last_round,
            )
            self.evaluator.load(last)
            stats = self.evaluator.last
            correct, rows = (stats.class_correct, stats.class_rows) if stats else ([], [])
            return {
                "output_rule": "last (still improving)",
                "window_rounds": [first, last_round],
                "last_round_accuracy": rounds[-1]["accuracy"] if rounds else None,
                **per_class_result(correct, rows, labels),
            }
        out: dict[str, Any] = {
            "averaged_rounds": [first, last_round],
            "output_rule": (
                "average (no federated evaluation to judge the trend)"
                if rising is None and self.cfg.server.average_when == "flat"
                else "average"
            ),
            "last_round_accuracy": rounds[-1]["accuracy"] if rounds else None,
            "last_round_loss": rounds[-1]["loss"] if rounds else None,
        }
        stats = self.evaluator(self.tail.mean(like=last))
        if stats is not None:
            out.update(accuracy=stats.accuracy, loss=stats.loss)
            out.update(per_class_result(stats.class_correct, stats.class_rows, labels))
        else:
            out.update(accuracy=None, loss=None, per_class_accuracy=None, per_class_count=None)
        log.info(
            "server.average-last = %s: the output model is the average of the globals of "
            "rounds %d-%d",
            self.cfg.server.average_last,
            first,
            last_round,
        )
        return out
