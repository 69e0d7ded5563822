"""The server's run: set up, let the strategy run the rounds, record, export.

``run_server`` is what the ServerApp's ``main`` calls, under ``flwr run`` (simulation or
deployment) and under ``feddistill simulate`` alike. After every round it saves the state a
resumed run needs (:mod:`feddistill.server.checkpoint`); with ``resume = true`` it continues
from there.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from feddistill import __version__, keys
from feddistill.client.state import ClientState, folder_bytes
from feddistill.client.work import distill_locally, encode_train, node_data, teacher_for_round
from feddistill.codec import dense_float32_bytes
from feddistill.config import Config
from feddistill.distill.train import (
    Encoded,
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
from feddistill.server.grids import SAMPLER, private_sampling
from feddistill.server.progress import RoundWatch, WatchedGrid
from feddistill.server.results import RunRecord, summarize_local_only
from feddistill.strategies import CompressedStrategy, build_strategy
from feddistill.task import InitialModels, initial_models, partitions, server_data

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
    with torch_threads(server_threads):
        return _run_server(grid, cfg, progress, simulated)


def _run_server(grid: Grid, cfg: Config, progress: str, simulated: bool) -> RunRecord:
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
    strategy = build_strategy(cfg, cfg.data.num_clients, models.schema, models.init_arrays)
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
    watch = RoundWatch(cfg.rounds, display=progress)  # sees replies as they arrive
    done, global_arrays = _resume_or_start(cfg, strategy, record, models.init_arrays)

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
            save_file(state, str(ckpt_dir / f"round-{server_round:04d}.safetensors"))
        now = time.time()
        record.add_round(
            server_round,
            cfg.rounds,
            acc,
            loss,
            strategy.traffic[server_round],
            now - clock["t"],
            dense_bytes,
            client_state=watch.state_bytes_summary(server_round),
        )
        global_now = {n: arrays[n].numpy() for n in models.names}
        save_state(state_path(out), snapshot(server_round, global_now, strategy, record))
        clock["t"] = now
        return MetricRecord({"accuracy": acc, "loss": loss}) if test is not None else None

    run_cfg = ConfigRecord(
        {
            keys.RUN_CONFIG: cfg.to_json(),
            keys.LABELS: json.dumps(list(labels.names)),
            keys.INIT_DIGEST: models.digest,
        }
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
    set_arrays(server_student, {n: final_arrays[n].numpy() for n in models.names})
    student_dir = out / "student"
    save_student(server_student, models.student_tokenizer, student_dir)

    extra: dict[str, object] = {"student_dir": str(student_dir)}
    if test is not None and _want_local_only(cfg, simulated):
        with torch_threads(eval_threads):
            extra.update(summarize_local_only(local_only_accuracies(cfg, labels, models, test)))
    else:
        extra.update({"local_only_accuracy": None})
    extra.update(_cache_usage(cfg, simulated))
    record.finish(**extra)
    f = record.final
    log.info(
        "done: %d rounds, final accuracy %s (best %s in round %s), local-only %s; "
        "bytes up %s, down %s; %.0f s. Results in %s",
        f["rounds_completed"],
        _fmt(f["accuracy"]),
        _fmt(f["best_accuracy"]),
        f["best_round"],
        _fmt(f.get("local_only_accuracy")),
        f["bytes_up_total"],
        f["bytes_down_total"],
        f["seconds_total"],
        record.path,
    )
    return record


def _resume_or_start(
    cfg: Config, strategy: CompressedStrategy, record: RunRecord, init: dict[str, np.ndarray]
) -> tuple[int, dict[str, np.ndarray]]:
    """Rounds already completed and the global arrays to start from.

    ``resume = true`` restores the saved state (strategy, ``random``, run record) and records a
    ``resume`` event; without a saved state it starts afresh. ``resume = false`` removes any
    saved state, so a later resume never picks up an older run.
    """
    path = state_path(cfg.output_dir)
    if not cfg.resume:
        path.unlink(missing_ok=True)
        return 0, init
    saved = load_state(path)
    if saved is None:
        log.info("resume = true but %s does not exist: starting from round 1", path)
        return 0, init
    restore(saved, cfg, strategy, record)
    record.events.append({"event": "resume", "from_round": saved.round, "time": time.time()})
    record.save()
    log.info("resuming after round %d of %d (state %s)", saved.round, cfg.rounds, path)
    return saved.round, saved.global_arrays


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
