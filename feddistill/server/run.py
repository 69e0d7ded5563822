"""The server's run: set up, let the strategy run the rounds, record, export.

``run_server`` is what the ServerApp's ``main`` calls, under ``flwr run`` (simulation or
deployment) and under ``feddistill simulate`` alike. After every round it saves the state a
resumed run needs (:mod:`feddistill.server.checkpoint`); with ``resume = true`` it continues
from there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from feddistill import __version__
from feddistill.codec import dense_float32_bytes
from feddistill.config import Config
from feddistill.distill.train import (
    encode_texts,
    pick_device,
    torch_threads,
    usable_cores,
)
from feddistill.models.build import Labels, count_parameters, save_student
from feddistill.node_state import folder_bytes
from feddistill.recipe import local_only_accuracies
from feddistill.records import server_config
from feddistill.run_inputs import (
    InitialModels,
    initial_models,
    partition_example_counts,
    partitions,
    server_data,
)
from feddistill.server.checkpoint import ReproducibleGrid
from feddistill.server.grids import SAMPLER, SIMULATED_PARTITIONS, private_sampling
from feddistill.server.lifecycle import Evaluator, RunStopped, ServerRun
from feddistill.server.progress import RoundWatch, WatchedGrid
from feddistill.server.results import RunRecord, summarize_local_only
from feddistill.server.tracking import Tracker
from feddistill.strategies import build_strategy

log = logging.getLogger("feddistill")


def resolve_paths(cfg: Config) -> Config:
    """Absolute output and cache folders: client workers may run in another directory."""
    out = Path(cfg.output_dir).expanduser().resolve()
    cache = Path(cfg.cache_dir).expanduser().resolve() if cfg.cache_dir else out / "cache"
    return cfg.with_overrides({"output-dir": str(out), "cache-dir": str(cache)})


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
    test_split, labels = server_data(cfg)
    _log_data(cfg, simulated, labels, test_split)
    models = initial_models(cfg, labels)
    # In deployment `train.device = "cuda"` is about the nodes: a server without a GPU still
    # evaluates (on its CPU) instead of refusing to start.
    wanted = cfg.train.device
    device = pick_device("auto" if wanted == "cuda" and not simulated else wanted)
    test = None
    if test_split is not None:
        test = encode_texts(
            models.student_tokenizer, test_split.texts, test_split.labels, cfg.data.max_length
        )
    strategy = build_strategy(
        cfg,
        cfg.data.num_clients,
        models.schema,
        models.init_arrays,
        known_examples=_known_examples(cfg) if simulated else None,
    )
    eval_threads = usable_cores() if simulated else torch.get_num_threads()
    evaluator = Evaluator(copy.deepcopy(models.student), models.names, test, device, eval_threads)
    watch = RoundWatch(cfg.rounds, display=progress)  # sees replies as they arrive
    run = ServerRun(
        cfg,
        strategy=strategy,
        record=_new_record(cfg, labels, models),
        evaluator=evaluator,
        tracker=tracker,
        watch=watch,
        dense_bytes=dense_float32_bytes(models.init_arrays),
    )
    start = run.resume_or_start(models.init_arrays)
    record = run.record
    record.header["run_id"] = run.run_id
    tracker.start(record, resumed=run.done > 0)

    run_cfg = ConfigRecord(
        server_config(cfg.to_json(), labels.names, models.digest, bytes.fromhex(run.run_id))
    )
    initial = ArrayRecord({n: Array(start[n]) for n in models.names})
    stopped: RunStopped | None = None
    with private_sampling():
        try:
            result = strategy.start(
                grid=ReproducibleGrid(WatchedGrid(grid, watch)),
                initial_arrays=initial,
                num_rounds=cfg.rounds - run.done,
                timeout=cfg.server.round_timeout,
                train_config=run_cfg,
                evaluate_config=run_cfg,
                evaluate_fn=run.end_of_round,
            )
            final_arrays = result.arrays if len(result.arrays) else initial
            last = {n: final_arrays[n].numpy() for n in models.names}
        except RunStopped as err:
            stopped = err
            log.error("stopping after round %d: %s", err.server_round, err.reason)
            last = run.last_global if run.last_global is not None else dict(start)

    extra = run.output_model(last)
    if stopped is not None:
        extra["stopped"] = {"round": stopped.server_round, "reason": stopped.reason}
    student_dir = out / "student"
    save_student(evaluator.model, models.student_tokenizer, student_dir)
    extra["student_dir"] = str(student_dir)
    if test is not None and stopped is None and _want_local_only(cfg, simulated):
        with torch_threads(eval_threads):
            extra.update(summarize_local_only(local_only_accuracies(cfg, labels, models, test)))
    else:
        extra.update({"local_only_accuracy": None})
    extra.update(_cache_usage(cfg, simulated))
    if strategy.accountant is not None:
        extra["privacy_guarantee"] = strategy.accountant.guarantee(len(record.rounds))
        log.info("privacy: %s", extra["privacy_guarantee"])
    record.finish(**extra)
    tracker.finish(record.final, student_dir)
    _log_done(record)
    return record


def _log_data(cfg: Config, simulated: bool, labels: Labels, test_split: Any) -> None:
    if not simulated:
        log.info(
            "deployment: labels %s; expecting %d SuperNodes (data.num-clients); %s",
            ",".join(labels.names),
            cfg.data.num_clients,
            "no centralized test set" if test_split is None else f"{len(test_split)} test rows",
        )
        return
    sizes = [len(p) for p in partitions(cfg)]  # rejects bad partition settings up front
    log.info(
        "data: %d clients, partition sizes %d..%d (%s)",
        len(sizes),
        min(sizes),
        max(sizes),
        cfg.data.partitioning,
    )


def _new_record(cfg: Config, labels: Labels, models: InitialModels) -> RunRecord:
    total, exchanged = count_parameters(models.student)
    t_total, _ = count_parameters(models.teacher)
    log.info(
        "teacher %s: %s parameters; student: %s total, %s exchanged",
        cfg.model.teacher,
        f"{t_total:,}",
        f"{total:,}",
        f"{exchanged:,}",
    )
    return RunRecord(
        out_dir=Path(cfg.output_dir),
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


def _log_done(record: RunRecord) -> None:
    f = record.final
    averaged = ""
    if f.get("averaged_rounds"):
        first, last_round = f["averaged_rounds"]
        averaged = (
            f" = average of the globals of rounds {first}-{last_round}; "
            f"round {last_round}'s global alone {_fmt(f['last_round_accuracy'])}"
        )
    elif f.get("window_rounds"):
        first, last_round = f["window_rounds"]
        averaged = (
            f" = round {last_round}'s global (federated validation accuracy still rising over "
            f"rounds {first}-{last_round}, so not averaged)"
        )
    log.info(
        "done: %d rounds, final accuracy %s%s (best single round %s, round %s), local-only %s; "
        "bytes up %s, down %s, evaluation %s; %.0f s. Results in %s",
        f["rounds_completed"],
        _fmt(f["accuracy"]),
        averaged,
        _fmt(f["best_accuracy"]),
        f["best_round"],
        _fmt(f.get("local_only_accuracy")),
        f["bytes_up_total"],
        f["bytes_down_total"],
        f["eval_bytes_down_total"] + f.get("eval_bytes_up_total", 0),
        f["seconds_total"],
        record.path,
    )


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
