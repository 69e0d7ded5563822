"""The server's run: set up, let the strategy run the rounds, record, export.

``run_server`` is what the ServerApp's ``main`` calls, under ``flwr run`` (simulation or
deployment) and under ``feddistill simulate`` alike. After every round it saves the state a
resumed run needs (:mod:`feddistill.server.checkpoint`); with ``resume = true`` it continues
from there.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from feddistill import __version__
from feddistill.client.state import ClientState, folder_bytes
from feddistill.client.work import distill_locally, encode_train, node_data, teacher_for_round
from feddistill.codec import dense_float32_bytes
from feddistill.config import Config, ConfigError
from feddistill.distill.train import (
    Encoded,
    EvalStats,
    encode_texts,
    evaluate,
    pick_device,
    torch_threads,
    usable_cores,
)
from feddistill.models.build import Labels, count_parameters, save_student, set_arrays
from feddistill.server.checkpoint import (
    ReproducibleGrid,
    load_state,
    restore,
    save_state,
    snapshot,
    state_path,
)
from feddistill.server.grids import SAMPLER, SIMULATED_PARTITIONS, private_sampling
from feddistill.server.progress import RoundWatch, WatchedGrid
from feddistill.server.results import RunRecord, per_class_result, summarize_local_only
from feddistill.server.tail import TailAverage, window_start
from feddistill.server.tracking import Tracker
from feddistill.strategies import CompressedStrategy, build_strategy
from feddistill.task import (
    InitialModels,
    initial_models,
    partition_example_counts,
    partitions,
    server_data,
)
from feddistill.wire import RUN_ID_BYTES, server_config

log = logging.getLogger("feddistill")


def resolve_paths(cfg: Config) -> Config:
    """Absolute output and cache folders: client workers may run in another directory."""
    out = Path(cfg.output_dir).expanduser().resolve()
    cache = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else out / "cache"
    return cfg.with_overrides({"output-dir": str(out), "cache-dir": str(cache)})


def local_only_accuracies(
    cfg: Config, labels: Labels, models: InitialModels, test: Encoded
) -> list[float]:
    """Each client's student trained on its own data only, with the same recipe (KD from its
    own teacher) for ``server.local-only-epochs`` epochs: the floor a federation must beat.
    """
    device = pick_device(cfg.train.device)
    accs = []
    for pid in range(cfg.data.num_clients):
        data = node_data(cfg, labels, {"partition-id": pid})
        state = ClientState.open(data.cache_root, data.key)
        enc, t_enc = encode_train(models, data.train, cfg.data.max_length)
        teacher, logits, _ = teacher_for_round(cfg, labels, models, data, state, t_enc, device)
        student = copy.deepcopy(models.student)
        distill_locally(
            cfg,
            student,
            enc,
            t_enc,
            teacher,
            logits,
            epochs=cfg.server.local_only_epochs,
            seed=cfg.seed + pid,
            device=device,
            federated=False,
        )
        accs.append(evaluate(student, test, device=device).accuracy)
        log.info("local-only student of client %d: test accuracy %.4f", pid, accs[-1])
    return accs


def _want_local_only(cfg: Config, simulated: bool) -> bool:
    if cfg.server.local_only == "off" or not simulated:
        return False
    return cfg.server.local_only == "on" or cfg.data.num_clients <= 20


def run_server(grid: Grid, cfg: Config, *, progress: str = "off") -> RunRecord:
    """``progress``: ``off``, ``auto``, ``tty`` or ``lines`` (see :class:`RoundWatch`)."""
    cfg = resolve_paths(cfg)
    simulated = cfg.mode == "simulation"
    # In simulation the cores belong to the clients while they train (one thread each), so the
    # server keeps to one thread, except where the clients are idle: the evaluation between
    # rounds and the local-only baseline after the last one take every core (2x on 2 cores).
    server_threads = 1 if simulated else torch.get_num_threads()
    with torch_threads(server_threads), Tracker(cfg) as tracker:
        return _run_server(grid, cfg, progress, simulated, tracker)


def _run_server(
    grid: Grid, cfg: Config, progress: str, simulated: bool, tracker: Tracker
) -> RunRecord:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    SAMPLER.seed(cfg.seed)  # client sampling (see feddistill.server.grids.private_sampling)
    torch.manual_seed(cfg.seed)
    eval_threads = usable_cores() if simulated else torch.get_num_threads()
    test_split, labels = server_data(cfg)
    if not simulated:
        log.info(
            "deployment: labels %s; expecting %d SuperNodes (data.num-clients); %s",
            ",".join(labels.names),
            cfg.data.num_clients,
            "no centralized test set" if test_split is None else f"{len(test_split)} test rows",
        )
    else:
        sizes = [len(p) for p in partitions(cfg)]  # rejects bad partition settings up front
        log.info(
            "data: %d clients, partition sizes %d..%d (%s)",
            len(sizes),
            min(sizes),
            max(sizes),
            cfg.data.partitioning,
        )
    models = initial_models(cfg, labels)
    total, exchanged = count_parameters(models.student)
    t_total, _ = count_parameters(models.teacher)
    log.info(
        "teacher %s: %s parameters; student: %s total, %s exchanged",
        cfg.model.teacher,
        f"{t_total:,}",
        f"{total:,}",
        f"{exchanged:,}",
    )

    device = pick_device(cfg.train.device)
    test = None
    if test_split is not None:
        test = encode_texts(
            models.student_tokenizer, test_split.texts, test_split.labels, cfg.data.max_length
        )
    server_student = copy.deepcopy(models.student)
    strategy = build_strategy(
        cfg,
        cfg.data.num_clients,
        models.schema,
        models.init_arrays,
        known_examples=_known_examples(cfg) if simulated else None,
    )
    dense_bytes = dense_float32_bytes(models.init_arrays)
    record = RunRecord(
        out_dir=out,
        config=cfg.to_flat(),
        header={
            "feddistill_version": __version__,
            "labels": list(labels.names),
            "model": {
                "teacher": cfg.model.teacher,
                "teacher_parameters": t_total,
                "student_parameters": total,
                "exchanged_parameters": exchanged,
            },
        },
    )
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    clock = {"t": time.time()}
    last_eval: dict[str, EvalStats] = {}  # the last global's, for its per-class accuracy
    watch = RoundWatch(cfg.rounds, display=progress)  # sees replies as they arrive
    done, global_arrays, saved_tail, run_id = _resume_or_start(
        cfg, strategy, record, models.init_arrays
    )
    record.header["run_id"] = run_id
    tail = _tail_average(cfg, done, saved_tail, ckpt_dir, models.names)
    tracker.start(record, resumed=done > 0)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and done:  # resumed: the initial model was evaluated before
            clock["t"] = time.time()
            return None
        server_round += done  # Strategy.start counts from 1 again after a resume
        set_arrays(server_student, {n: arrays[n].numpy() for n in models.names})
        acc, loss = float("nan"), float("nan")
        if test is not None:
            with torch_threads(eval_threads):
                stats = evaluate(server_student, test, device=device)
            acc, loss = stats.accuracy, stats.loss
            last_eval["stats"] = stats
        if server_round == 0:
            record.initial = {
                "accuracy": acc if test is not None else None,
                "loss": loss if test is not None else None,
            }
            clock["t"] = time.time()
            return MetricRecord({"accuracy": acc, "loss": loss}) if test is not None else None
        if cfg.checkpoints:
            state = {
                k: v.detach().cpu().contiguous() for k, v in server_student.state_dict().items()
            }
            save_file(state, str(_checkpoint_path(ckpt_dir, server_round)))
        now = time.time()
        entry = record.add_round(
            server_round,
            cfg.rounds,
            acc,
            loss,
            strategy.traffic[server_round],
            now - clock["t"],
            dense_bytes,
            client_state=watch.state_bytes_summary(server_round),
            privacy=None if strategy.privacy is None else strategy.privacy.figures(server_round),
        )
        global_now = {n: arrays[n].numpy() for n in models.names}
        if tail is not None:
            tail.add(server_round, global_now)
        save_state(
            state_path(out),
            snapshot(
                server_round,
                global_now,
                strategy,
                record,
                tail=None if tail is None else tail.state(),
                run_id=run_id,
            ),
        )
        # Only now that the state holds this round may results.json claim it: a run killed in
        # between then resumes from this round, not from the one before.
        record.save()
        tracker.log_round(entry)  # the very entry results.json holds
        clock["t"] = now
        return MetricRecord({"accuracy": acc, "loss": loss}) if test is not None else None

    run_cfg = ConfigRecord(
        server_config(cfg.to_json(), labels.names, models.digest, bytes.fromhex(run_id))
    )
    initial = ArrayRecord({n: Array(global_arrays[n]) for n in models.names})
    with private_sampling():
        result = strategy.start(
            grid=ReproducibleGrid(WatchedGrid(grid, watch)),
            initial_arrays=initial,
            num_rounds=cfg.rounds - done,
            timeout=cfg.server.round_timeout,
            train_config=run_cfg,
            evaluate_config=run_cfg,
            evaluate_fn=evaluate_fn,
        )
    final_arrays = result.arrays if len(result.arrays) else initial
    last = {n: final_arrays[n].numpy() for n in models.names}
    extra: dict[str, object] = {}
    if tail is not None and tail.count:
        set_arrays(server_student, tail.mean(like=last))
        extra.update(
            _averaged_result(cfg, tail, record, server_student, test, device, eval_threads)
        )
    else:  # the output model is the last global, evaluated in its round: no second pass
        set_arrays(server_student, last)
        stats = last_eval.get("stats")
        correct, rows = (stats.class_correct, stats.class_rows) if stats else ([], [])
        extra.update(per_class_result(correct, rows, list(labels.names)))
    student_dir = out / "student"
    save_student(server_student, models.student_tokenizer, student_dir)

    extra["student_dir"] = str(student_dir)
    if test is not None and _want_local_only(cfg, simulated):
        with torch_threads(eval_threads):
            extra.update(summarize_local_only(local_only_accuracies(cfg, labels, models, test)))
    else:
        extra.update({"local_only_accuracy": None})
    extra.update(_cache_usage(cfg, simulated))
    if strategy.privacy is not None:
        extra["privacy_guarantee"] = strategy.privacy.guarantee(len(record.rounds))
        log.info("privacy: %s", extra["privacy_guarantee"])
    record.finish(**extra)
    tracker.finish(record.final, student_dir)
    f = record.final
    averaged = ""
    if f.get("averaged_rounds"):
        first, last_round = f["averaged_rounds"]
        averaged = (
            f" = average of the globals of rounds {first}-{last_round}; "
            f"round {last_round}'s global alone {_fmt(f['last_round_accuracy'])}"
        )
    log.info(
        "done: %d rounds, final accuracy %s%s (best single round %s, round %s), local-only %s; "
        "bytes up %s, down %s; %.0f s. Results in %s",
        f["rounds_completed"],
        _fmt(f["accuracy"]),
        averaged,
        _fmt(f["best_accuracy"]),
        f["best_round"],
        _fmt(f.get("local_only_accuracy")),
        f["bytes_up_total"],
        f["bytes_down_total"],
        f["seconds_total"],
        record.path,
    )
    return record


def _known_examples(cfg: Config) -> Callable[[int], tuple[int, int] | None]:
    """Node id -> (training, validation) examples of its partition, for admission control.

    Known only for nodes of a simulation in this process (``feddistill simulate``); under
    ``flwr run`` the simulated SuperLink lives in another process, the mapping stays empty, and
    ``num-examples`` falls back to the deployment cap (``server.max-examples-factor``).
    """
    counts = partition_example_counts(cfg)

    def lookup(node: int) -> tuple[int, int] | None:
        pid = SIMULATED_PARTITIONS.get(node)
        return counts[pid] if pid is not None and 0 <= pid < len(counts) else None

    return lookup


def _checkpoint_path(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round:04d}.safetensors"


def _averaged_result(
    cfg: Config,
    tail: TailAverage,
    record: RunRecord,
    model: torch.nn.Module,
    test: Encoded | None,
    device: torch.device,
    threads: int,
) -> dict[str, object]:
    """Final-result fields of the averaged model (already in ``model``); the rounds keep theirs."""
    first, last = tail.rounds
    out: dict[str, object] = {
        "averaged_rounds": [first, last],
        "last_round_accuracy": record.rounds[-1]["accuracy"] if record.rounds else None,
        "last_round_loss": record.rounds[-1]["loss"] if record.rounds else None,
    }
    if test is not None:
        with torch_threads(threads):
            stats = evaluate(model, test, device=device)
        out.update(accuracy=stats.accuracy, loss=stats.loss)
        out.update(per_class_result(stats.class_correct, stats.class_rows, record.header["labels"]))
    else:
        out.update(accuracy=None, loss=None, per_class_accuracy=None, per_class_count=None)
    log.info(
        "server.average-last = %s: the output model is the average of the globals of rounds %d-%d",
        cfg.server.average_last,
        first,
        last,
    )
    return out


def _tail_average(
    cfg: Config,
    done: int,
    saved: dict[str, Any] | None,
    checkpoints: Path,
    names: Sequence[str],
) -> TailAverage | None:
    """The running average for ``server.average-last``, continued after a resume.

    The saved sum is kept when it covers exactly the window's rounds done so far. A resume that
    moved the window (``rounds`` changed) re-sums those rounds from their checkpoints; without
    them it is refused.
    """
    if cfg.server.average_last == 0:
        return None
    first = window_start(cfg.rounds, cfg.server.average_last)
    if saved is not None:
        tail = TailAverage.from_state(saved)
        if tail.count and tail.first == first and tail.first + tail.count == done + 1:
            return tail
    tail = TailAverage(first)
    for r in range(first, done + 1):
        path = _checkpoint_path(checkpoints, r)
        if not path.exists():
            raise ConfigError(
                f"invalid config rounds = {cfg.rounds}: server.average-last = "
                f"{cfg.server.average_last} now averages rounds {first}-{cfg.rounds}, but the "
                f"saved run did not sum round {r} and its checkpoint {path} is missing; resume "
                "with the rounds the run was started with"
            )
        arrays = load_numpy(str(path))
        tail.add(r, {n: arrays[n] for n in names})
    return tail


def _resume_or_start(
    cfg: Config, strategy: CompressedStrategy, record: RunRecord, init: dict[str, np.ndarray]
) -> tuple[int, dict[str, np.ndarray], dict[str, Any] | None, str]:
    """Rounds already completed, the global arrays to start from, the saved tail average and
    the run id (hex).

    ``resume = true`` restores the saved state (strategy, ``random``, run record, run id) and
    records a ``resume`` event; without a saved state it starts afresh. ``resume = false``
    removes any saved state, so a later resume never picks up an older run. A fresh run draws a
    new run id: clients never continue another run's residuals or co-trained teacher.
    """
    path = state_path(cfg.output_dir)
    fresh = secrets.token_bytes(RUN_ID_BYTES).hex()
    if not cfg.resume:
        path.unlink(missing_ok=True)
        return 0, init, None, fresh
    saved = load_state(path)
    if saved is None:
        log.info("resume = true but %s does not exist: starting from round 1", path)
        return 0, init, None, fresh
    restore(saved, cfg, strategy, record)
    record.events.append({"event": "resume", "from_round": saved.round, "time": time.time()})
    record.save()
    log.info("resuming after round %d of %d (state %s)", saved.round, cfg.rounds, path)
    return saved.round, saved.global_arrays, saved.tail, saved.run_id


def _cache_usage(cfg: Config, simulated: bool) -> dict[str, int | None]:
    """Disk held by client state at the end (simulation: every virtual node shares one cache)."""
    clients = Path(cfg.cache_dir) / "clients"
    if not simulated or not clients.is_dir():
        return {"cache_bytes": None, "clients_with_state": None}
    return {
        "cache_bytes": folder_bytes(Path(cfg.cache_dir)),
        "clients_with_state": sum(1 for p in clients.iterdir() if p.is_dir() and any(p.iterdir())),
    }


def _fmt(x: object) -> str:
    return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)
