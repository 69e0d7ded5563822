"""The training recipe one node runs on its data, federated or not.

The ClientApp's round (:mod:`feddistill.client.work`), the server's local-only baseline and the
bench's centralized references all call these functions, so a baseline is the same recipe as
the federation it is compared with, not a second set of parameters. Nothing here knows Flower.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from feddistill.config import Config
from feddistill.distill.early_stop import MIN_HOLDOUT_ROWS, Plateau, holdout_split
from feddistill.distill.terms import (
    Distillation,
    FixedTeacher,
    LocalClasses,
    LogitAdjustment,
    MutualTeacher,
    NotTrueDistillation,
    Objective,
    Proximal,
    SelfTargets,
    TeacherSource,
    Term,
    Transform,
)
from feddistill.distill.train import (
    Loop,
    Stats,
    Tokenized,
    distill,
    encode_texts,
    evaluate,
    fine_tune,
    pick_device,
    predict_logits,
    subset,
)
from feddistill.models.build import Labels
from feddistill.node_state import ClientState
from feddistill.run_inputs import (
    InitialModels,
    TextSplit,
    default_cache_dir,
    partition_split,
    teacher_cache_key,
)

log = logging.getLogger("feddistill")


@dataclass
class NodeData:
    key: str
    train: TextSplit
    val: TextSplit
    cache_root: Path


def partition_node(cfg: Config, pid: int, cache_root: Path | None = None) -> NodeData:
    """Simulated node ``pid``: its partition of ``data.source`` and the key its state lives by."""
    train, val = partition_split(cfg, pid)
    key = f"partition-{pid}-of-{cfg.data.num_clients}"
    return NodeData(key, train, val, cache_root or Path(default_cache_dir(cfg)))


@dataclass
class TeacherFit:
    """How a teacher's fine-tuning went: epochs run, the epoch kept, why it stopped, and the
    holdout accuracy after each epoch (empty without a holdout)."""

    epochs: int
    best_epoch: int
    stopped: str  # "plateau", "epochs", "time" or "no holdout"
    holdout_rows: int
    holdout_accuracy: list[float]


def fit_teacher(
    cfg: Config,
    teacher: torch.nn.Module,
    t_train: Tokenized,
    device: torch.device,
    *,
    holdout: Tokenized | None = None,
    watch: Callable[[int], None] | None = None,
    at_least: int = 0,
    timed: bool = True,
) -> TeacherFit:
    """The teacher recipe (``teacher.*``), seeded: every node and the centralized reference.

    Early stopping on ``holdout`` (the node's validation split, when it has enough rows) or
    else on a holdout carved from ``t_train`` (:class:`TeacherConfig`); the weights of the
    best holdout epoch are put back at the end. ``watch(epoch)`` is called after every epoch
    (the bench records a test curve with it) and ``at_least`` epochs run even past the stop,
    for that curve only: the weights kept are still the best epoch's. ``timed=False`` drops
    ``teacher.max-minutes`` (the bench's centralized reference: the cap bounds a client's first
    round, and on the union of ten clients' rows it would stop the reference early and make
    it weaker, which the gap to it must not gain from).
    """
    t = cfg.teacher
    fit_on = t_train
    if t.patience == 0:
        holdout = None
    elif holdout is None or len(holdout) < MIN_HOLDOUT_ROWS:
        train_idx, hold_idx = holdout_split(len(t_train), t.holdout, cfg.seed)
        holdout = subset(t_train, hold_idx) if len(hold_idx) else None
        if holdout is not None:
            fit_on = subset(t_train, train_idx)
    plateau = Plateau(t.patience)
    best: dict[str, torch.Tensor] | None = None
    stopped = {"why": "epochs" if holdout is not None else "no holdout", "at": 0}
    deadline = time.monotonic() + 60.0 * t.max_minutes if timed else float("inf")

    def after_epoch(epoch: int) -> bool:
        nonlocal best
        if watch is not None:
            watch(epoch)
        if stopped["at"]:  # the recipe has stopped; only the curve goes on
            return epoch >= at_least
        stop = False
        if holdout is not None:
            stats = evaluate(teacher, holdout, device=device, precision=cfg.train.precision)
            better, stop = plateau.update(epoch, stats.accuracy, stats.loss)
            stop = stop and epoch >= t.min_epochs
            if better:
                best = _snapshot(teacher)
            if stop:
                stopped["why"] = "plateau"
        if not stop and epoch >= t.epochs:
            stop = True  # the cap; stopped["why"] says "epochs" or "no holdout" already
        if not stop and time.monotonic() > deadline:
            stop, stopped["why"] = True, "time"
        if not stop:
            return False
        stopped["at"] = epoch
        if holdout is None and epoch < at_least:
            best = _snapshot(teacher)  # the recipe's weights, before the curve's extra epochs
        return epoch >= at_least

    with torch_seeded(cfg.seed):
        loop = Loop(max(t.epochs, at_least), t.lr, t.batch_size, cfg.seed, head_lr=t.head_lr)
        fine_tune(
            teacher,
            fit_on,
            loop,
            device=device,
            precision=cfg.train.precision,
            after_epoch=after_epoch,
        )
    epochs = stopped["at"]
    if best is not None:
        teacher.load_state_dict(best)
    fit = TeacherFit(
        epochs=epochs,
        best_epoch=plateau.best_epoch if holdout is not None else epochs,
        stopped=stopped["why"],
        holdout_rows=0 if holdout is None else len(holdout),
        holdout_accuracy=[a for a, _ in plateau.history],
    )
    log.info(
        "teacher: %d epoch(s), kept epoch %d (%s; holdout of %d rows: %s)",
        fit.epochs,
        fit.best_epoch,
        fit.stopped,
        fit.holdout_rows,
        " ".join(f"{a:.3f}" for a in fit.holdout_accuracy) or "-",
    )
    return fit


def teacher_for_round(
    cfg: Config,
    labels: Labels,
    models: InitialModels,
    data: NodeData,
    state: ClientState,
    t_train: Tokenized,
    device: torch.device,
    *,
    mutual_run: str = "",
) -> tuple[torch.nn.Module | None, torch.Tensor | None, bool]:
    """(teacher, its logits on the training split, whether it was fitted now); no teacher at
    all when the KD term has zero weight.

    Without mutual distillation a cached teacher is represented by its logits alone (teacher
    None): they are all the distillation loss needs. With it and ``mutual_run``, the teacher as
    that run's earlier rounds left it, else (first round, or no run: the local-only baseline)
    the fine-tuned teacher, which mutual training never overwrites (see
    :func:`feddistill.run_inputs.teacher_cache_key`).
    """
    if cfg.distill.alpha >= 1.0 and not cfg.distill.mutual:
        # alpha = 1 without mutual learning is plain FedAvg of the student: fine-tuning a
        # teacher and predicting its logits would be wasted work.
        return None, None, False
    key = teacher_cache_key(cfg, labels, data.train, val=data.val)
    if cfg.distill.mutual and mutual_run:
        co_trained = state.load_teacher(
            teacher_cache_key(cfg, labels, data.train, val=data.val, mutual_run=mutual_run)
        )
        if co_trained is not None:
            teacher = copy.deepcopy(models.teacher)
            teacher.load_state_dict(co_trained[0])
            return teacher, None, False
    if not cfg.distill.mutual:
        logits = state.load_logits(key)
        if logits is not None and len(logits) == len(t_train):
            return None, logits, False  # skip loading a (possibly 90 MB) teacher every round
    teacher = copy.deepcopy(models.teacher)
    cached = state.load_teacher(key)
    if cached is not None:
        teacher.load_state_dict(cached[0])
        logits = cached[1]
        if logits is None and not cfg.distill.mutual:
            logits = predict_logits(teacher, t_train, device=device)
        return teacher, logits, False
    fit_teacher(cfg, teacher, t_train, device, holdout=teacher_holdout(cfg, models, data))
    logits = None if cfg.distill.mutual else predict_logits(teacher, t_train, device=device)
    state.save_teacher(key, {k: v.cpu() for k, v in teacher.state_dict().items()}, logits)
    state.enforce_teacher_budget(int(cfg.cache.max_mb * 2**20))
    return teacher, logits, True


def teacher_holdout(cfg: Config, models: InitialModels, data: NodeData) -> Tokenized | None:
    """The node's validation split for the teacher's early stopping, if it has enough rows
    (else :func:`fit_teacher` carves a holdout from the training rows)."""
    if cfg.teacher.patience == 0 or len(data.val) < MIN_HOLDOUT_ROWS:
        return None
    tok = models.teacher_tokenizer
    return encode_texts(tok, data.val.texts, data.val.labels, cfg.data.max_length)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for the block only, restoring it afterwards.

    Dropout draws from the global generator, whose state otherwise depends on what the worker
    process did before (a Ray actor serves several clients; a resumed run starts fresh
    processes): seeding makes a client's round the same in any process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def encode_train(
    models: InitialModels, split: TextSplit, max_length: int
) -> tuple[Tokenized, Tokenized]:
    """The split tokenized for the student and for the teacher (the same object when shared)."""
    s_enc = encode_texts(models.student_tokenizer, split.texts, split.labels, max_length)
    if models.teacher_tokenizer is models.student_tokenizer:
        return s_enc, s_enc
    return s_enc, encode_texts(models.teacher_tokenizer, split.texts, split.labels, max_length)


def objective(
    cfg: Config,
    teacher: torch.nn.Module | None,
    logits: torch.Tensor | None,
    t_train: Tokenized,
    *,
    proximal_mu: float = 0.0,
    federated: bool = True,
) -> Objective:
    """The configured KD objective (``distill.*``): one line per term or transform.

    ``federated=False`` (the local-only baseline) drops the not-true distillation term: its
    starting student is the initial model, not a global one worth preserving.
    """
    d = cfg.distill
    source: TeacherSource = SelfTargets()
    if d.mutual and teacher is not None:
        source = MutualTeacher(teacher, t_train, cfg.teacher.lr, d.alpha, d.temperature)
    elif logits is not None:
        source = FixedTeacher(logits)
    transforms: list[Transform] = []
    if d.logit_adjust > 0:
        transforms.append(LogitAdjustment(d.logit_adjust))
    if d.local_classes_only:
        transforms.append(LocalClasses())
    terms: list[Term] = [Distillation(d.alpha, d.temperature)]
    if federated and d.not_true_weight > 0:
        terms.append(NotTrueDistillation(d.not_true_weight, d.temperature))
    if proximal_mu > 0:
        terms.append(Proximal(proximal_mu))
    return Objective(terms, transforms, source)


def distill_student(
    cfg: Config,
    student: torch.nn.Module,
    s_train: Tokenized,
    t_train: Tokenized,
    teacher: torch.nn.Module | None,
    logits: torch.Tensor | None,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    federated: bool = True,
) -> Stats:
    """The configured KD recipe on this node's data; seeded so any process repeats it."""
    goal = objective(cfg, teacher, logits, t_train, proximal_mu=proximal_mu, federated=federated)
    t = cfg.train
    loop = Loop(epochs, t.lr, t.batch_size, seed, t.weight_decay)
    with torch_seeded(seed):
        return distill(student, s_train, goal, loop, device=device, precision=t.precision)


def local_only_accuracies(
    cfg: Config, labels: Labels, models: InitialModels, test: Tokenized
) -> list[float]:
    """Each client's student trained on its own data only, with the same recipe (KD from its
    own teacher) for ``server.local-only-epochs`` epochs: the floor a federation must beat.
    """
    device = pick_device(cfg.train.device)
    accs = []
    for pid in range(cfg.data.num_clients):
        data = partition_node(cfg, pid)
        state = ClientState.open(data.cache_root, data.key)
        enc, t_enc = encode_train(models, data.train, cfg.data.max_length)
        teacher, logits, _ = teacher_for_round(cfg, labels, models, data, state, t_enc, device)
        student = copy.deepcopy(models.student)
        distill_student(
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
