"""The local objective as a list of loss terms, logit transforms and one teacher source.

:func:`feddistill.distill.train.distill` runs one loop; what it minimizes is composed here, the
way torchtune keeps each distillation loss a small module: a term is one summand of the loss, a
transform rewrites logits before the terms see them, and the teacher source says where the
soft targets of a batch come from. A new idea is one class here and one line where the recipe
builds the objective (:func:`feddistill.recipe.objective`), not another flag through the loop.

Each part may prepare itself once before the first step (``start``: the received model's
logits, an anchor copy of its weights, label priors); the loop then calls it per batch. The
maths stay in :mod:`feddistill.distill.losses` (pure functions, unit-tested there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from feddistill.distill.losses import (
    KDLoss,
    cross_entropy,
    kd_objective,
    not_true_kd,
    present_classes,
    prior_offset,
    restrict_logits,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from feddistill.distill.train import Tokenized


@dataclass
class Start:
    """What the parts may look at before training: the student as received, its trainable
    parameters, the local data and where the loop runs."""

    student: PreTrainedModel
    params: list[torch.nn.Parameter]
    data: Tokenized
    device: torch.device
    precision: str


@dataclass
class Step:
    """One batch as the terms see it.

    ``student_logits`` is the model's output; ``fitted`` the same after the student's
    transforms (what the labels and the teacher are fitted to); ``teacher_logits`` the soft
    targets after the transforms shared by both sides.
    """

    idx: torch.Tensor
    labels: torch.Tensor
    student_logits: torch.Tensor
    fitted: torch.Tensor
    teacher_logits: torch.Tensor
    params: list[torch.nn.Parameter]


class Term(Protocol):
    def start(self, ctx: Start) -> None: ...

    def __call__(self, step: Step) -> torch.Tensor: ...


class Transform(Protocol):
    """Rewrites ``[B, C]`` logits; ``teacher`` says whether the soft targets get it too."""

    teacher: bool

    def start(self, ctx: Start) -> None: ...

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...


class TeacherSource(Protocol):
    def start(self, ctx: Start) -> None: ...

    def logits(self, idx: torch.Tensor, step: Step) -> torch.Tensor:
        """The batch's teacher logits (``step.teacher_logits`` is not set yet)."""
        ...

    def finish(self) -> None: ...


# -- Terms ------------------------------------------------------------------------------------


@dataclass
class CrossEntropy:
    """Plain supervised loss on the labels (the teacher's own fine-tuning)."""

    def start(self, ctx: Start) -> None:
        pass

    def __call__(self, step: Step) -> torch.Tensor:
        # KDLoss's own cross-entropy, without computing a KL part nobody reads
        return cross_entropy(step.fitted.float(), step.labels)


@dataclass
class Distillation:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` (Hinton et al. 2015)."""

    alpha: float
    temperature: float

    def start(self, ctx: Start) -> None:
        self._loss = KDLoss(self.temperature)

    def __call__(self, step: Step) -> torch.Tensor:
        parts = self._loss(step.fitted, step.teacher_logits, step.labels)
        return kd_objective(parts, self.alpha, self.temperature)


@dataclass
class NotTrueDistillation:
    """``weight * T^2 * KL`` from the student as received, over the not-true classes (FedNTD;
    :func:`~feddistill.distill.losses.not_true_kd`). The received model's view is fixed for the
    whole local round, so it is computed once in ``start``."""

    weight: float
    temperature: float
    _global: torch.Tensor | None = field(default=None, repr=False)

    def start(self, ctx: Start) -> None:
        from feddistill.distill.train import predict_logits

        self._global = predict_logits(
            ctx.student, ctx.data, device=ctx.device, precision=ctx.precision
        )

    def __call__(self, step: Step) -> torch.Tensor:
        assert self._global is not None, "start() first"
        target = self._global[step.idx].to(step.student_logits.device)
        return self.weight * not_true_kd(step.student_logits, target, step.labels, self.temperature)


@dataclass
class Proximal:
    """FedProx's ``mu/2 * ||w - w_received||^2`` (Li et al. 2020, eq. 2)."""

    mu: float
    _anchor: list[torch.Tensor] = field(default_factory=list, repr=False)

    def start(self, ctx: Start) -> None:
        self._anchor = [p.detach().clone() for p in ctx.params]

    def __call__(self, step: Step) -> torch.Tensor:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(step.params, self._anchor, strict=True))
        return 0.5 * self.mu * prox


# -- Transforms -------------------------------------------------------------------------------


@dataclass
class LogitAdjustment:
    """The student trains ``logits + tau * log p(y)`` of the local labels (Menon et al. 2021;
    :func:`~feddistill.distill.losses.prior_offset`); the teacher's targets are left alone."""

    tau: float
    teacher: bool = False
    _offset: torch.Tensor | None = field(default=None, repr=False)

    def start(self, ctx: Start) -> None:
        num_classes = ctx.student.config.num_labels
        self._offset = prior_offset(ctx.data.labels, num_classes, self.tau).to(ctx.device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self._offset


@dataclass
class LocalClasses:
    """Both softmaxes over the classes present in the local data only (restricted softmax;
    :func:`~feddistill.distill.losses.restrict_logits`); nothing to do when all occur."""

    teacher: bool = True
    _present: torch.Tensor | None = field(default=None, repr=False)

    def start(self, ctx: Start) -> None:
        present = present_classes(ctx.data.labels, ctx.student.config.num_labels)
        self._present = None if bool(present.all()) else present.to(ctx.device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self._present is None else restrict_logits(logits, self._present)


# -- Teacher sources --------------------------------------------------------------------------


class SelfTargets:
    """No teacher: the student's own detached logits, so any KL part is zero."""

    def start(self, ctx: Start) -> None:
        pass

    def logits(self, idx: torch.Tensor, step: Step) -> torch.Tensor:
        return step.student_logits.detach()

    def finish(self) -> None:
        pass


@dataclass
class FixedTeacher:
    """``[N, C]`` logits of a frozen teacher, computed once in eval mode."""

    table: torch.Tensor

    def start(self, ctx: Start) -> None:
        pass

    def logits(self, idx: torch.Tensor, step: Step) -> torch.Tensor:
        return self.table[idx].to(step.student_logits.device)

    def finish(self) -> None:
        pass


@dataclass
class MutualTeacher:
    """A teacher trained in the same loop (FedKD, Wu et al. 2022) on ``alpha * CE + (1 - alpha)
    * T^2 * KL(student || teacher)``; ``data`` is the batch in the teacher's tokenization."""

    model: PreTrainedModel
    data: Tokenized
    lr: float
    alpha: float
    temperature: float

    def start(self, ctx: Start) -> None:
        from feddistill.distill.train import grad_scaler

        self._ctx = ctx
        self._loss = KDLoss(self.temperature)
        self.model.to(ctx.device).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._opt = torch.optim.AdamW(trainable, lr=self.lr)
        self._scaler = grad_scaler(ctx.device, ctx.precision)

    def logits(self, idx: torch.Tensor, step: Step) -> torch.Tensor:
        from feddistill.distill.train import autocast, batch_inputs

        ctx = self._ctx
        with autocast(ctx.device, ctx.precision):
            t_logits = self.model(**batch_inputs(self.data, idx, ctx.device)).logits
        parts = self._loss(t_logits, step.student_logits.detach(), step.labels)
        loss = kd_objective(parts, self.alpha, self.temperature)
        self._opt.zero_grad(set_to_none=True)
        self._scaler.scale(loss).backward()
        self._scaler.step(self._opt)
        self._scaler.update()
        return t_logits.detach()

    def finish(self) -> None:
        self.model.eval()


@dataclass
class Objective:
    """What :func:`~feddistill.distill.train.distill` minimizes: the sum of ``terms`` (in
    order) on logits rewritten by ``transforms`` (in order), with targets from ``teacher``."""

    terms: Sequence[Term]
    transforms: Sequence[Transform] = ()
    teacher: TeacherSource = field(default_factory=SelfTargets)

    def parts(self) -> list[Term | Transform | TeacherSource]:
        return [self.teacher, *self.transforms, *self.terms]
