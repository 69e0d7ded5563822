"""Knowledge-distillation loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", eq. 2 and the T^2 gradient scaling of section 2).

The module returns the two parts separately; the caller mixes them as
``alpha * ce + (1 - alpha) * temperature**2 * kd`` (see :func:`kd_objective`), the same split as
torchtune's ``ForwardKLLoss``, so logging and mutual distillation can reuse the parts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class KDParts(NamedTuple):
    ce: torch.Tensor
    kd: torch.Tensor


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy over the rows whose label is not ``ignore_index`` (0 when none is).

    The ignored rows are left out before the mean is taken (a sum over the kept rows over their
    count), so a batch without labels gives 0, not ``0 / 0``, and no step waits on the host to
    look for a NaN. ``logits`` ``[N, C]`` in float32, ``labels`` ``[N]``.
    """
    kept = (labels != ignore_index).sum().clamp(min=1)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / kept


class KDLoss(nn.Module):
    """Cross-entropy on labels and KL(teacher_T || student_T) on softened logits.

    Shapes: ``student_logits`` and ``teacher_logits`` are ``[..., C]`` (``[B, C]`` for sequence
    classification, ``[B, L, C]`` for token-level tasks); ``labels`` is ``[...]`` with
    ``ignore_index`` marking positions without a label, which the cross-entropy leaves out (the
    KL part covers every position: the teacher has a view on each). Softmax is taken in float32
    so bf16/fp16 autocast does not distort the soft targets.
    """

    def __init__(self, temperature: float = 2.0, ignore_index: int = -100) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = temperature
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> KDParts:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ: both models need the same label set"
            )
        num_classes = student_logits.shape[-1]
        s = student_logits.float().reshape(-1, num_classes)
        t = teacher_logits.detach().float().reshape(-1, num_classes)

        log_p_s = F.log_softmax(s / self.temperature, dim=-1)
        log_p_t = F.log_softmax(t / self.temperature, dim=-1)
        # KL(p_t || p_s) per row = sum p_t * (log p_t - log p_s)
        kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()

        if labels is None:
            ce = torch.zeros((), device=s.device)
        else:
            ce = cross_entropy(s, labels.reshape(-1), self.ignore_index)
        return KDParts(ce=ce, kd=kd)


def prior_offset(labels: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """``tau * log p(y)`` of the local labels (add-one smoothed), shape ``[num_classes]``.

    Logit adjustment for label skew (Menon et al. 2021, "Long-tail learning via logit
    adjustment"; FedLC, Zhang et al. 2022): a client trains ``logits + tau * log p_local(y)``
    against its labels and its teacher, so the logits it learns, and sends, are those of a
    balanced label distribution instead of its own skewed one. Under Dirichlet label skew each
    client otherwise pulls the global head toward its majority classes, and the global model
    swings with whichever clients were sampled. A class absent locally gets a strongly
    negative offset, which leaves that class's logit nearly untouched by this client.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes)[:num_classes]
    prior = (counts.double() + 1.0) / (counts.sum().double() + num_classes)
    return (tau * prior.log()).float()


_ABSENT = -1.0e4  # finite: 0 * (log 0 - log 0) would be NaN in the KL sum; exp(-1e4) == 0


def present_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes]`` bool: which classes occur among ``labels``."""
    counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes)
    return counts[:num_classes] > 0


def restrict_logits(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Logits with the classes not in ``present`` taken out of the softmax (restricted softmax).

    Under label skew a client that never sees a class otherwise learns, from its labels and from
    its teacher (fine-tuned on the same data), to push that class's logit down everywhere; the
    averaged global model then forgets the class whenever such clients dominate a round (FedRS,
    Li & Zhan 2021, scales those logits; this is its limit, a scale of zero inside the softmax).
    Applied to student and teacher alike, the KD target becomes the teacher's distribution over
    the locally present classes. The filled entries carry no gradient.
    """
    return logits.masked_fill(~present.to(logits.device), _ABSENT)


def not_true_kd(
    student_logits: torch.Tensor,
    global_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2 * KL(global_T || student_T)`` over each row's not-true classes (FedNTD).

    Lee et al. 2022 ("Preservation of the Global Knowledge by Not-True Distillation in
    Federated Learning"): under label skew local training overwrites what the received global
    model knows about the classes a client lacks. Distilling the global model's distribution over
    the classes other than the label (the true class taken out of both softmaxes) keeps that
    knowledge without fighting the label. Rows are ``[B, C]`` logits; the mean over rows.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    true = F.one_hot(labels.reshape(-1).long(), student_logits.shape[-1]).bool()
    s = student_logits.float().masked_fill(true, _ABSENT) / temperature
    g = global_logits.detach().float().masked_fill(true, _ABSENT) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_g = F.log_softmax(g, dim=-1)
    kl_rows = (log_p_g.exp() * (log_p_g - log_p_s)).sum(dim=-1)
    return temperature**2 * kl_rows.mean()


def kd_objective(parts: KDParts, alpha: float, temperature: float) -> torch.Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL``; T^2 keeps KD gradients on the CE scale."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return alpha * parts.ce + (1.0 - alpha) * temperature**2 * parts.kd
